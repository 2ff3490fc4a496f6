// CPU kernel of squeeze_excite_backward: dx = grad · gate[n, c] and Σ_hw grad · x, one pass.
//
// NCHW: one task per (n, c) plane: a vectorised loop writes dx and sums grad · x (OpenMP SIMD
// reduction, chunks of 256 added in double). channels_last: one task per image: its H·W rows of C
// values, dx written along the channels and the sums kept per channel (float over 16 rows, then
// double). Half and bfloat16 go through float chunks in L1 (cpu/map.h conversions).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../squeeze_excite.h"
#include "cnnkernels/cpu/map.h"

namespace cnnkernels {
namespace {

using cpu::kChunk;
constexpr int64_t kRowBlock = 16;

template <typename T>
using opmath = at::opmath_type<T>;

// count ≤ kChunk values: dx = grad · gate (gate per value: gate[j * kStride]); returns Σ grad · x
// in one float chunk for planes, or adds grad · x into sums[j] for rows.
template <bool kAvx2, bool kRows, typename T, typename F>
CNNKERNELS_ALWAYS_INLINE F scale_and_reduce(const T* grad, const T* x, T* dx, int64_t count,
                                            const F* gate, F* sums) {
  alignas(64) F g_buf[cpu::is_reduced_float<T> ? kChunk : 1];
  alignas(64) F x_buf[cpu::is_reduced_float<T> ? kChunk : 1];
  alignas(64) F out_buf[cpu::is_reduced_float<T> ? kChunk : 1];
  const F* g;
  const F* xv;
  F* out;
  if constexpr (cpu::is_reduced_float<T>) {
    cpu::load_floats<kAvx2>(grad, g_buf, count);
    cpu::load_floats<kAvx2>(x, x_buf, count);
    g = g_buf;
    xv = x_buf;
    out = out_buf;
  } else {
    g = grad;
    xv = x;
    out = dx;
  }
  F total = 0;
  if constexpr (kRows) {
    for (int64_t j = 0; j < count; ++j) {
      out[j] = g[j] * gate[j];
      sums[j] += g[j] * xv[j];
    }
  } else {
    const F s = gate[0];
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < count; ++j) {
      out[j] = g[j] * s;
      total += g[j] * xv[j];
    }
  }
  if constexpr (cpu::is_reduced_float<T>) cpu::store_floats<kAvx2>(out_buf, dx, count);
  return total;
}

template <typename T>
void backward_planes(const T* grad, const T* x, const opmath<T>* gate, T* dx,
                     opmath<T>* grad_gate, int64_t planes, int64_t plane) {
  using F = opmath<T>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, plane));
  at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
    cpu::run_with_best_isa_flag([&](auto avx2) {
      constexpr bool kAvx2 = decltype(avx2)::value;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t base = p * plane;
        double total = 0;
        for (int64_t s = 0; s < plane; s += kChunk) {
          const int64_t m = std::min(kChunk, plane - s);
          total += scale_and_reduce<kAvx2, false>(grad + base + s, x + base + s, dx + base + s, m,
                                                  gate + p, static_cast<F*>(nullptr));
        }
        grad_gate[p] = static_cast<F>(total);
      }
    });
  });
}

template <typename T>
void backward_rows(const T* grad, const T* x, const opmath<T>* gate, T* dx, opmath<T>* grad_gate,
                   int64_t batch, int64_t rows, int64_t channels) {
  using F = opmath<T>;
  at::parallel_for(0, batch, 1, [&](int64_t n0, int64_t n1) {
    std::vector<F> block_sums(channels);
    std::vector<double> sums(channels);
    cpu::run_with_best_isa_flag([&](auto avx2) {
      constexpr bool kAvx2 = decltype(avx2)::value;
      for (int64_t n = n0; n < n1; ++n) {
        std::fill(sums.begin(), sums.end(), 0.0);
        const int64_t image = n * rows * channels;
        for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
          std::fill(block_sums.begin(), block_sums.end(), F(0));
          for (int64_t r = r0; r < std::min(rows, r0 + kRowBlock); ++r) {
            for (int64_t c0 = 0; c0 < channels; c0 += kChunk) {
              const int64_t m = std::min(kChunk, channels - c0), at = image + r * channels + c0;
              scale_and_reduce<kAvx2, true>(grad + at, x + at, dx + at, m,
                                            gate + n * channels + c0, block_sums.data() + c0);
            }
          }
          for (int64_t c = 0; c < channels; ++c) sums[c] += block_sums[c];
        }
        for (int64_t c = 0; c < channels; ++c) grad_gate[n * channels + c] = static_cast<F>(sums[c]);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> squeeze_excite_backward_cpu(const at::Tensor& grad_in,
                                                               const at::Tensor& x_in,
                                                               const at::Tensor& gate_in) {
  check_squeeze_excite_backward(grad_in, x_in, gate_in, "squeeze_excite_backward");
  const bool rows = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto format = rows ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(format), grad = grad_in.contiguous(format);
  const at::Tensor gate = gate_in.contiguous();
  at::Tensor dx = at::empty_like(x, format);
  at::Tensor grad_gate = at::zeros_like(gate);
  const int64_t batch = x.size(0), channels = x.size(1), plane = x.size(2) * x.size(3);
  if (x.numel() == 0) return {dx, grad_gate};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cnnkernels_squeeze_excite_backward", [&] {
        using F = opmath<scalar_t>;
        const auto* g = grad.const_data_ptr<scalar_t>();
        const auto* xp = x.const_data_ptr<scalar_t>();
        auto* out = dx.mutable_data_ptr<scalar_t>();
        const F* gp = gate.const_data_ptr<F>();
        F* sums = grad_gate.mutable_data_ptr<F>();
        if (rows) {
          backward_rows(g, xp, gp, out, sums, batch, plane, channels);
        } else {
          backward_planes(g, xp, gp, out, sums, batch * channels, plane);
        }
      });
  return {dx, grad_gate};
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("squeeze_excite_backward", &cnnkernels::squeeze_excite_backward_cpu);
}
