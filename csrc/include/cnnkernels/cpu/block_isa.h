// The vector operations of the channel-blocked CPU kernels, for two instruction sets. A block pixel
// is 16 floats (cpu::kBlock) in both: one 512-bit register with AVX-512, two 256-bit halves with
// AVX2. Kernels written against these structs (Isa::load, Isa::fmadd, ...) are compiled once per
// struct, each copy with its own target attribute, and picked at run time with cpu::has_avx512() /
// cpu::has_avx2(); the block layout, the work split and the order of every sum are the same in
// both, so their results are bit-identical.
//
// Register budgets differ: AVX-512 has 32 vector registers of 16 floats, AVX2 16 of 8, i.e. 8 block
// pixels' worth. kRun (output pixels accumulated at once) and kAccumulators (sums a kernel may keep
// in registers) say how many block vectors a kernel may hold without spilling.
#pragma once

#include <algorithm>

#include "cnnkernels/cpu/channel_blocks.h"

#if CNNKERNELS_X86
namespace cnnkernels::cpu {

struct Avx512Block {
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int kRun = 8;
  static constexpr int kAccumulators = 25;

#define CNNKERNELS_OP CNNKERNELS_TARGET_AVX512 CNNKERNELS_ALWAYS_INLINE static
  CNNKERNELS_OP Vec zero() { return _mm512_setzero_ps(); }
  CNNKERNELS_OP Vec load(const float* p) { return _mm512_loadu_ps(p); }
  CNNKERNELS_OP void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  CNNKERNELS_OP Mask first_lanes(int64_t n) { return cpu::first_lanes(n); }
  CNNKERNELS_OP Vec load_lanes(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  CNNKERNELS_OP void store_lanes(float* p, Mask m, Vec v) { _mm512_mask_storeu_ps(p, m, v); }
  CNNKERNELS_OP Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  CNNKERNELS_OP Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  CNNKERNELS_OP Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  template <typename Act>
  CNNKERNELS_OP Vec activation(const Act& act, Vec x) { return cpu::activation16(act, x); }
#undef CNNKERNELS_OP

  CNNKERNELS_TARGET_AVX512 static void planes_to_block(const float* src, int64_t plane_stride,
                                                       int64_t lanes, int64_t count, float* dst) {
    cpu::planes_to_block(src, plane_stride, lanes, count, dst);
  }
  CNNKERNELS_TARGET_AVX512 static void block_to_planes(const float* src, int64_t count, float* dst,
                                                       int64_t plane_stride, int64_t lanes) {
    cpu::block_to_planes(src, count, dst, plane_stride, lanes);
  }
  CNNKERNELS_TARGET_AVX512 static void zero_block(float* dst, int64_t count) {
    cpu::zero_block(dst, count);
  }
};

namespace avx2 {

// Lanes [0, n) of 8 set (all bits), the rest clear: the masks of maskload/maskstore and blendv.
CNNKERNELS_TARGET_AVX2 CNNKERNELS_ALWAYS_INLINE __m256i first_lanes8(int64_t n) {
  const int32_t count = static_cast<int32_t>(std::clamp<int64_t>(n, 0, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// r[i][j] -> r[j][i] for an 8x8 tile: unpack pairs of rows, shuffle 4-float groups, then swap
// 128-bit halves (24 shuffles).
CNNKERNELS_TARGET_AVX2 CNNKERNELS_ALWAYS_INLINE void transpose8x8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int q = 0; q < 8; q += 2) {
    t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
    t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
  }
  for (int q = 0; q < 8; q += 4) {
    u[q] = _mm256_shuffle_ps(t[q], t[q + 2], 0x44);
    u[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], 0xEE);
    u[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0x44);
    u[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {
    r[m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
    r[4 + m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
  }
}

// The activations of activation.h on 8 floats, with the same comparisons as activation16 (so NaN
// propagates the same way). blendv(a, b, m) = m ? b : a.
CNNKERNELS_TARGET_AVX2 CNNKERNELS_ALWAYS_INLINE __m256 max_like_std8(__m256 a, __m256 b) {
  return _mm256_blendv_ps(a, b, _mm256_cmp_ps(a, b, _CMP_LT_OQ));  // a < b ? b : a
}
CNNKERNELS_TARGET_AVX2 CNNKERNELS_ALWAYS_INLINE __m256 min_like_std8(__m256 a, __m256 b) {
  return _mm256_blendv_ps(a, b, _mm256_cmp_ps(b, a, _CMP_LT_OQ));  // b < a ? b : a
}

template <typename Act>
CNNKERNELS_TARGET_AVX2 CNNKERNELS_ALWAYS_INLINE __m256 activation8(const Act& act, __m256 x) {
  const __m256 zero = _mm256_setzero_ps(), three = _mm256_set1_ps(3.f), six = _mm256_set1_ps(6.f);
  if constexpr (std::is_same_v<Act, Identity>) {
    return x;
  } else if constexpr (std::is_same_v<Act, ReLU>) {
    return _mm256_blendv_ps(x, zero, _mm256_cmp_ps(x, zero, _CMP_LE_OQ));
  } else if constexpr (std::is_same_v<Act, ReLU6>) {
    return min_like_std8(max_like_std8(x, zero), six);
  } else if constexpr (std::is_same_v<Act, LeakyReLU>) {
    const __m256 scaled = _mm256_mul_ps(x, _mm256_set1_ps(static_cast<float>(act.negative_slope)));
    return _mm256_blendv_ps(scaled, x, _mm256_cmp_ps(x, zero, _CMP_GT_OQ));
  } else if constexpr (std::is_same_v<Act, HardSwish>) {
    const __m256 gate = min_like_std8(max_like_std8(_mm256_add_ps(x, three), zero), six);
    return _mm256_div_ps(_mm256_mul_ps(x, gate), six);
  } else {
    static_assert(std::is_same_v<Act, HardSigmoid>, "an activation without a vector form");
    return _mm256_div_ps(min_like_std8(max_like_std8(_mm256_add_ps(x, three), zero), six), six);
  }
}

}  // namespace avx2

struct Avx2Block {
  struct Vec {
    __m256 lo, hi;  // lanes 0-7, 8-15
  };
  // Masked stores are microcoded and slow on AMD CPUs (vmaskmovps, ~20x a plain store on Zen 2/3),
  // so whole halves go through plain loads and stores, and only a partial half through the mask.
  struct Mask {
    __m256i lo, hi;
    int64_t lanes;
  };
  static constexpr int kRun = 4;
  static constexpr int kAccumulators = 7;

#define CNNKERNELS_OP CNNKERNELS_TARGET_AVX2 CNNKERNELS_ALWAYS_INLINE static
  CNNKERNELS_OP Vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  CNNKERNELS_OP Vec load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  CNNKERNELS_OP void store(float* p, Vec v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
  }
  CNNKERNELS_OP Mask first_lanes(int64_t n) {
    return {avx2::first_lanes8(n), avx2::first_lanes8(n - 8), n};
  }
  // lanes past `lanes` are neither read nor written; a half without lanes is not touched at all
  CNNKERNELS_OP Vec load_lanes(Mask m, const float* p) {
    if (m.lanes >= 16) return load(p);
    if (m.lanes <= 8) {  // no access past the lanes at all (AMD leaves faults on masked-off
                         // elements implementation-defined)
      return {m.lanes == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m.lo), _mm256_setzero_ps()};
    }
    return {_mm256_loadu_ps(p), _mm256_maskload_ps(p + 8, m.hi)};
  }
  CNNKERNELS_OP void store_lanes(float* p, Mask m, Vec v) {
    if (m.lanes >= 16) return store(p, v);
    if (m.lanes >= 8) {
      _mm256_storeu_ps(p, v.lo);
      if (m.lanes > 8) _mm256_maskstore_ps(p + 8, m.hi, v.hi);
    } else {
      _mm256_maskstore_ps(p, m.lo, v.lo);
    }
  }
  CNNKERNELS_OP Vec add(Vec a, Vec b) {
    return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
  }
  CNNKERNELS_OP Vec mul(Vec a, Vec b) {
    return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
  }
  CNNKERNELS_OP Vec fmadd(Vec a, Vec b, Vec c) {
    return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
  }
  template <typename Act>
  CNNKERNELS_OP Vec activation(const Act& act, Vec x) {
    return {avx2::activation8(act, x.lo), avx2::activation8(act, x.hi)};
  }
#undef CNNKERNELS_OP

  // As cpu::planes_to_block: dst[e][l] = src[l * plane_stride + e] for e < count, l < 16 (lanes >=
  // `lanes` zero), as four 8x8 transposes per 8 pixels.
  CNNKERNELS_TARGET_AVX2 static void planes_to_block(const float* src, int64_t plane_stride,
                                                     int64_t lanes, int64_t count, float* dst) {
    for (int64_t e0 = 0; e0 < count; e0 += 8) {
      const int64_t n = std::min<int64_t>(8, count - e0);
      const __m256i mask = avx2::first_lanes8(n);
      for (int64_t half = 0; half < 2; ++half) {
        __m256 r[8];
        for (int64_t q = 0; q < 8; ++q) {
          const int64_t l = half * 8 + q;
          const float* row = src + l * plane_stride + e0;
          r[q] = l >= lanes ? _mm256_setzero_ps()
                 : n == 8   ? _mm256_loadu_ps(row)
                            : _mm256_maskload_ps(row, mask);
        }
        avx2::transpose8x8(r);
        for (int64_t j = 0; j < n; ++j) _mm256_storeu_ps(dst + (e0 + j) * kBlock + half * 8, r[j]);
      }
    }
  }

  // The inverse: dst[l * plane_stride + e] = src[e][l] for e < count, l < lanes.
  CNNKERNELS_TARGET_AVX2 static void block_to_planes(const float* src, int64_t count, float* dst,
                                                     int64_t plane_stride, int64_t lanes) {
    for (int64_t e0 = 0; e0 < count; e0 += 8) {
      const int64_t n = std::min<int64_t>(8, count - e0);
      const __m256i mask = avx2::first_lanes8(n);
      for (int64_t half = 0; half * 8 < lanes; ++half) {
        __m256 r[8];
        for (int64_t j = 0; j < 8; ++j) {
          r[j] = j < n ? _mm256_loadu_ps(src + (e0 + j) * kBlock + half * 8) : _mm256_setzero_ps();
        }
        avx2::transpose8x8(r);
        for (int64_t q = 0; q < 8 && half * 8 + q < lanes; ++q) {
          float* row = dst + (half * 8 + q) * plane_stride + e0;
          if (n == 8) {
            _mm256_storeu_ps(row, r[q]);
          } else {
            _mm256_maskstore_ps(row, mask, r[q]);
          }
        }
      }
    }
  }

  CNNKERNELS_TARGET_AVX2 static void zero_block(float* dst, int64_t count) {
    for (int64_t e = 0; e < count * 2; ++e) _mm256_storeu_ps(dst + e * 8, _mm256_setzero_ps());
  }
};

}  // namespace cnnkernels::cpu
#endif  // CNNKERNELS_X86
