// Channel-blocked float buffers for the CPU kernels: AVX-512 copies between NCHW planes and
// [pixel][16 channels] blocks, the layout in which one vector holds 16 channels of one pixel (as
// oneDNN's nChw16c). Kernels whose natural vector runs along channels (depthwise convolution on
// small planes, where rows are shorter than a vector) compute on blocks; moving NCHW data in and
// out takes one in-register 16x16 transpose per 16 pixels instead of 256 scalar strided copies.
//
// Everything here is AVX-512 only: callers check cpu::has_avx512() and keep a portable path. The
// functions are `inline`, not always_inline, so that callers compiled for another ISA may call them.
#pragma once

#include "cnnkernels/activation.h"
#include "cnnkernels/cpu/map.h"

#if CNNKERNELS_X86
namespace cnnkernels::cpu {

constexpr int64_t kBlock = 16;  // floats per block pixel: one 512-bit vector

// Mask of the first n (0..16) lanes.
CNNKERNELS_ALWAYS_INLINE __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
}

// r[i][j] -> r[j][i] for a 16x16 tile held in 16 vectors: unpack pairs of rows, then shuffle
// 4-float, 128-bit and 256-bit groups (4 stages, 64 shuffles).
CNNKERNELS_TARGET_AVX512 CNNKERNELS_ALWAYS_INLINE void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int q = 0; q < 16; q += 2) {
    t[q] = _mm512_unpacklo_ps(r[q], r[q + 1]);      // a0 b0 a1 b1 per 128-bit lane
    t[q + 1] = _mm512_unpackhi_ps(r[q], r[q + 1]);  // a2 b2 a3 b3
  }
  for (int q = 0; q < 16; q += 4) {  // rows q..q+3, element m of each 128-bit lane in r[q + m]
    r[q] = _mm512_shuffle_ps(t[q], t[q + 2], 0x44);
    r[q + 1] = _mm512_shuffle_ps(t[q], t[q + 2], 0xEE);
    r[q + 2] = _mm512_shuffle_ps(t[q + 1], t[q + 3], 0x44);
    r[q + 3] = _mm512_shuffle_ps(t[q + 1], t[q + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {
    t[m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88);
    t[4 + m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
    t[8 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
    t[12 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
  }
  for (int m = 0; m < 4; ++m) {
    r[m] = _mm512_shuffle_f32x4(t[m], t[8 + m], 0x88);
    r[8 + m] = _mm512_shuffle_f32x4(t[m], t[8 + m], 0xDD);
    r[4 + m] = _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0x88);
    r[12 + m] = _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0xDD);
  }
}

// act(x) on 16 floats, bit-identical to the scalar functors of activation.h (the same comparisons,
// so NaN propagates the same way, and the division by 6 of ATen's CPU kernels).
CNNKERNELS_TARGET_AVX512 CNNKERNELS_ALWAYS_INLINE __m512 max_like_std16(__m512 a, __m512 b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), a, b);  // a < b ? b : a
}
CNNKERNELS_TARGET_AVX512 CNNKERNELS_ALWAYS_INLINE __m512 min_like_std16(__m512 a, __m512 b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(b, a, _CMP_LT_OQ), a, b);  // b < a ? b : a
}

template <typename Act>
CNNKERNELS_TARGET_AVX512 CNNKERNELS_ALWAYS_INLINE __m512 activation16(const Act& act, __m512 x) {
  const __m512 zero = _mm512_setzero_ps(), three = _mm512_set1_ps(3.f), six = _mm512_set1_ps(6.f);
  if constexpr (std::is_same_v<Act, Identity>) {
    return x;
  } else if constexpr (std::is_same_v<Act, ReLU>) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, zero, _CMP_LE_OQ), x, zero);
  } else if constexpr (std::is_same_v<Act, ReLU6>) {
    return min_like_std16(max_like_std16(x, zero), six);
  } else if constexpr (std::is_same_v<Act, LeakyReLU>) {
    const __m512 scaled = _mm512_mul_ps(x, _mm512_set1_ps(static_cast<float>(act.negative_slope)));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), scaled, x);
  } else if constexpr (std::is_same_v<Act, HardSwish>) {
    const __m512 gate = min_like_std16(max_like_std16(_mm512_add_ps(x, three), zero), six);
    return _mm512_div_ps(_mm512_mul_ps(x, gate), six);
  } else {
    static_assert(std::is_same_v<Act, HardSigmoid>, "an activation without a vector form");
    return _mm512_div_ps(min_like_std16(max_like_std16(_mm512_add_ps(x, three), zero), six), six);
  }
}

// dst[e][l] = src[l * plane_stride + e] for e < count, l < 16 (lanes >= `lanes` are zero): the
// runs of `lanes` planes, each `count` contiguous values, into `count` block pixels.
CNNKERNELS_TARGET_AVX512 inline void planes_to_block(
    const float* src, int64_t plane_stride, int64_t lanes, int64_t count, float* dst) {
  for (int64_t e0 = 0; e0 < count; e0 += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, count - e0);
    const __mmask16 mask = first_lanes(n);
    __m512 r[16];
    for (int64_t l = 0; l < 16; ++l) {
      r[l] = l < lanes ? _mm512_maskz_loadu_ps(mask, src + l * plane_stride + e0)
                       : _mm512_setzero_ps();
    }
    transpose16x16(r);
    for (int64_t j = 0; j < n; ++j) _mm512_storeu_ps(dst + (e0 + j) * kBlock, r[j]);
  }
}

// The inverse: dst[l * plane_stride + e] = src[e][l] for e < count, l < lanes.
CNNKERNELS_TARGET_AVX512 inline void block_to_planes(
    const float* src, int64_t count, float* dst, int64_t plane_stride, int64_t lanes) {
  for (int64_t e0 = 0; e0 < count; e0 += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, count - e0);
    const __mmask16 mask = first_lanes(n);
    __m512 r[16];
    for (int64_t j = 0; j < 16; ++j) {
      r[j] = j < n ? _mm512_loadu_ps(src + (e0 + j) * kBlock) : _mm512_setzero_ps();
    }
    transpose16x16(r);
    for (int64_t l = 0; l < lanes; ++l) _mm512_mask_storeu_ps(dst + l * plane_stride + e0, mask, r[l]);
  }
}

// dst[e][l] = src[e * pixel_stride + l] for e < count, l < lanes (zero above): channels_last
// pixels (pixel_stride = C) into block pixels.
CNNKERNELS_TARGET_AVX512 inline void pixels_to_block(
    const float* src, int64_t pixel_stride, int64_t lanes, int64_t count, float* dst) {
  const __mmask16 mask = first_lanes(lanes);
  for (int64_t e = 0; e < count; ++e) {
    _mm512_storeu_ps(dst + e * kBlock, _mm512_maskz_loadu_ps(mask, src + e * pixel_stride));
  }
}

// The inverse: dst[e * pixel_stride + l] = src[e][l] for e < count, l < lanes.
CNNKERNELS_TARGET_AVX512 inline void block_to_pixels(
    const float* src, int64_t count, float* dst, int64_t pixel_stride, int64_t lanes) {
  const __mmask16 mask = first_lanes(lanes);
  for (int64_t e = 0; e < count; ++e) {
    _mm512_mask_storeu_ps(dst + e * pixel_stride, mask, _mm512_loadu_ps(src + e * kBlock));
  }
}

CNNKERNELS_TARGET_AVX512 inline void zero_block(float* dst, int64_t count) {
  for (int64_t e = 0; e < count; ++e) _mm512_storeu_ps(dst + e * kBlock, _mm512_setzero_ps());
}

}  // namespace cnnkernels::cpu
#endif  // CNNKERNELS_X86
