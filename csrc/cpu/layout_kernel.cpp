// CPU kernels of contiguous_from_channels_last and copy_to_channels_last_ (schemas: ../layout.cpp).
//
// Per image, a [pixels, channels] matrix (rows `row_stride` apart) becomes [channels, pixels]:
// 16x16 tiles loaded as 16 pixel rows of 16 channels, transposed in registers, stored as 16
// channel rows of 16 pixels. Tasks are (image, block of 16 channels); each walks all pixels, so
// it reads one cache line per pixel row and writes whole lines of 16 pixels. copy_to_channels_last_
// runs the same tiles the other way. float32 with AVX-512 or AVX2 (8x8 tiles, two per block of 16
// channels); other dtypes and CPUs use ATen's copy.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cnnkernels/cpu/block_isa.h"
#include "cnnkernels/cpu/rows.h"
#include "cnnkernels/cpu/map.h"

namespace cnnkernels {
namespace {

#if CNNKERNELS_X86
// Channels [0, channels ≤ 16) of `pixels` rows `row_stride` apart, into `channels` rows of `dst`
// `plane` apart.
CNNKERNELS_TARGET_AVX512 void transpose_block(const float* src, int64_t row_stride, float* dst,
                                              int64_t plane, int64_t channels, int64_t pixels) {
  const __mmask16 lanes = cpu::first_lanes(channels);
  __m512 r[16];
  int64_t p = 0;
  for (; p + 16 <= pixels; p += 16) {
    for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_ps(lanes, src + (p + i) * row_stride);
    cpu::transpose16x16(r);
    for (int64_t c = 0; c < channels; ++c) _mm512_storeu_ps(dst + c * plane + p, r[c]);
  }
  if (p < pixels) {
    const int64_t rest = pixels - p;
    for (int i = 0; i < 16; ++i) {
      r[i] = i < rest ? _mm512_maskz_loadu_ps(lanes, src + (p + i) * row_stride)
                      : _mm512_setzero_ps();
    }
    cpu::transpose16x16(r);
    const __mmask16 tail = cpu::first_lanes(rest);
    for (int64_t c = 0; c < channels; ++c) _mm512_mask_storeu_ps(dst + c * plane + p, tail, r[c]);
  }
}

// The inverse: `channels` ≤ 16 planes of `pixels` values `plane` apart, into `pixels` rows
// `row_stride` apart (channels [0, channels) of each row).
// With `stream`, whole aligned 64-byte rows are written with streaming stores (no read for
// ownership of lines the copy overwrites entirely; see cpu/map.h).
CNNKERNELS_TARGET_AVX512 void transpose_block_to_rows(const float* src, int64_t plane, float* dst,
                                                      int64_t row_stride, int64_t channels,
                                                      int64_t pixels, bool stream) {
  const __mmask16 lanes = cpu::first_lanes(channels);
  stream = stream && channels == 16 && reinterpret_cast<uintptr_t>(dst) % 64 == 0 &&
           row_stride % 16 == 0;
  __m512 r[16];
  for (int64_t p = 0; p < pixels; p += 16) {
    const int64_t count = std::min<int64_t>(16, pixels - p);
    const __mmask16 tail = cpu::first_lanes(count);
    for (int64_t c = 0; c < 16; ++c) {
      r[c] = c < channels ? _mm512_maskz_loadu_ps(tail, src + c * plane + p) : _mm512_setzero_ps();
    }
    cpu::transpose16x16(r);
    for (int64_t i = 0; i < count; ++i) {
      if (stream) {
        _mm512_stream_ps(dst + (p + i) * row_stride, r[i]);
      } else {
        _mm512_mask_storeu_ps(dst + (p + i) * row_stride, lanes, r[i]);
      }
    }
  }
  if (stream) _mm_sfence();
}

// The same two transposes with AVX2: a 16-channel block as two halves of 8, 8x8 tiles. Whole
// tiles use plain loads and stores: vmaskmovps stores are microcoded and slow on AMD CPUs.
CNNKERNELS_TARGET_AVX2 void transpose_block_avx2(const float* src, int64_t row_stride, float* dst,
                                                 int64_t plane, int64_t channels, int64_t pixels) {
  __m256 r[8];
  for (int64_t p = 0; p < pixels; p += 8) {
    const int64_t count = std::min<int64_t>(8, pixels - p);
    const __m256i tail = cpu::avx2::first_lanes8(count);
    for (int64_t half = 0; half * 8 < channels; ++half) {
      const int64_t lanes = std::min<int64_t>(8, channels - half * 8);
      const __m256i lane_mask = cpu::avx2::first_lanes8(lanes);
      for (int64_t i = 0; i < 8; ++i) {
        const float* row = src + (p + i) * row_stride + half * 8;
        r[i] = i >= count  ? _mm256_setzero_ps()
               : lanes == 8 ? _mm256_loadu_ps(row)
                            : _mm256_maskload_ps(row, lane_mask);
      }
      cpu::avx2::transpose8x8(r);
      for (int64_t c = 0; c < lanes; ++c) {
        float* out = dst + (half * 8 + c) * plane + p;
        if (count == 8) {
          _mm256_storeu_ps(out, r[c]);
        } else {
          _mm256_maskstore_ps(out, tail, r[c]);
        }
      }
    }
  }
}

// Both halves of a pixel's 16 channels are stored one after the other, so that each 64-byte row is
// written whole (a streamed line written in two far-apart halves is flushed partially, and slowly).
CNNKERNELS_TARGET_AVX2 void transpose_block_to_rows_avx2(const float* src, int64_t plane, float* dst,
                                                         int64_t row_stride, int64_t channels,
                                                         int64_t pixels, bool stream) {
  stream = stream && channels == 16 && reinterpret_cast<uintptr_t>(dst) % 64 == 0 &&
           row_stride % 16 == 0;
  __m256 r[2][8];
  const int64_t halves = channels > 8 ? 2 : 1;
  for (int64_t p = 0; p < pixels; p += 8) {
    const int64_t count = std::min<int64_t>(8, pixels - p);
    const __m256i tail = cpu::avx2::first_lanes8(count);
    for (int64_t half = 0; half < halves; ++half) {
      const int64_t lanes = std::min<int64_t>(8, channels - half * 8);
      for (int64_t c = 0; c < 8; ++c) {
        const float* in = src + (half * 8 + c) * plane + p;
        r[half][c] = c >= lanes   ? _mm256_setzero_ps()
                     : count == 8 ? _mm256_loadu_ps(in)
                                  : _mm256_maskload_ps(in, tail);
      }
      cpu::avx2::transpose8x8(r[half]);
    }
    for (int64_t i = 0; i < count; ++i) {
      float* out = dst + (p + i) * row_stride;
      for (int64_t half = 0; half < halves; ++half) {
        const int64_t lanes = std::min<int64_t>(8, channels - half * 8);
        if (stream) {
          _mm256_stream_ps(out + half * 8, r[half][i]);
        } else if (lanes == 8) {
          _mm256_storeu_ps(out + half * 8, r[half][i]);
        } else {
          _mm256_maskstore_ps(out + half * 8, cpu::avx2::first_lanes8(lanes), r[half][i]);
        }
      }
    }
  }
  if (stream) _mm_sfence();
}
#endif

// Tasks (image, block of 16 channels), each over all pixels: `block(n, c0, channels)`.
template <typename Block>
void for_each_channel_block(int64_t batch, int64_t channels, const Block& block) {
  const int64_t blocks = (channels + cpu::kBlock - 1) / cpu::kBlock;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / blocks, c0 = (t % blocks) * cpu::kBlock;
      block(n, c0, std::min<int64_t>(cpu::kBlock, channels - c0));
    }
  });
}

void copy_to_channels_last_cpu(const at::Tensor& out, const at::Tensor& x) {
  const char* op = "copy_to_channels_last_";
  TORCH_CHECK(x.dim() == 4 && out.dim() == 4, op, ": expected 4-D [N, C, H, W] tensors, got 'out' ",
              out.sizes(), " and 'x' ", x.sizes());
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": 'out' ", out.sizes(), " and 'x' ", x.sizes(),
              " must have the same shape");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.device() == x.device(), op,
              ": 'out' and 'x' must have the same dtype and device, got ", out.scalar_type(), " on ",
              out.device(), " and ", x.scalar_type(), " on ", x.device());
  at::assert_no_internal_overlap(out);
  at::assert_no_partial_overlap(out, x);
#if CNNKERNELS_X86
  const int64_t row_stride = cpu::pixel_row_stride(out);
  const bool fast = x.scalar_type() == at::kFloat && x.is_contiguous() && row_stride > 0 &&
                    (cpu::has_avx512() || cpu::has_avx2()) && x.numel() > 0 && x.size(1) > 1;
#else
  const bool fast = false;
#endif
  if (!fast) {
    out.copy_(x);
    return;
  }
#if CNNKERNELS_X86
  const int64_t channels = x.size(1), plane = x.size(2) * x.size(3);
  const int64_t image_stride = plane * row_stride;  // not stride(0): N may be 1
  const float* src = x.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  const bool stream = cpu::streaming_pays_off(2 * x.numel() * int64_t(sizeof(float)));
  for_each_channel_block(x.size(0), channels, [&](int64_t n, int64_t c0, int64_t count) {
    const float* from = src + (n * channels + c0) * plane;
    float* to = dst + n * image_stride + c0;
    if (cpu::has_avx512()) {
      transpose_block_to_rows(from, plane, to, row_stride, count, plane, stream);
    } else {
      transpose_block_to_rows_avx2(from, plane, to, row_stride, count, plane, stream);
    }
  });
#endif
}

at::Tensor contiguous_from_channels_last_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "contiguous_from_channels_last: expected argument 'x' to be a 4-D "
              "[N, C, H, W] tensor, got ", x.dim(), " dimensions");
#if CNNKERNELS_X86
  const int64_t row_stride = cpu::pixel_row_stride(x);
  const bool fast = x.scalar_type() == at::kFloat && row_stride > 0 &&
                    (cpu::has_avx512() || cpu::has_avx2()) && x.numel() > 0 && !x.is_contiguous();
#else
  const bool fast = false;
#endif
  if (!fast) return x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
#if CNNKERNELS_X86
  const int64_t channels = x.size(1), plane = x.size(2) * x.size(3);
  const int64_t image_stride = plane * row_stride;  // not stride(0): N may be 1
  const float* src = x.const_data_ptr<float>();
  float* dst = y.mutable_data_ptr<float>();
  for_each_channel_block(x.size(0), channels, [&](int64_t n, int64_t c0, int64_t count) {
    const float* from = src + n * image_stride + c0;
    float* to = dst + (n * channels + c0) * plane;
    if (cpu::has_avx512()) {
      transpose_block(from, row_stride, to, plane, count, plane);
    } else {
      transpose_block_avx2(from, row_stride, to, plane, count, plane);
    }
  });
#endif
  return y;
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("contiguous_from_channels_last", &cnnkernels::contiguous_from_channels_last_cpu);
  m.impl("copy_to_channels_last_", &cnnkernels::copy_to_channels_last_cpu);
}
