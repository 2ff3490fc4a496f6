// CUDA kernels of batch_norm_act's statistics and backward passes (schemas and the math:
// ../batch_norm_act.cpp; the CPU twin: ../cpu/batch_norm_act_kernel.cpp).
//
// Both reductions are one kernel template, sum_pairs_*, computing a pair (a, b) per element and
// summing both per channel:
//   statistics:     (x − K, (x − K)²), K the channel's first value (stable one-pass variance);
//   backward sums:  (dz, dz·(x − mean)), dz = act'(fma(x, scale, shift) + residual)·grad.
// NCHW: a block per (channel, range of images) walks its planes with contiguous, coalesced loads.
// channels_last: a block of 32 channels × 8 rows walks a range of rows, each warp reading 32
// consecutive channels of a row. Each block writes one float partial per channel; the partials are
// added in double by ATen (a [blocks, C] tensor: small), then finished on the host side.
// The elementwise pass is one thread per element (grid-stride, 64-bit indices) like affine_act's.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../batch_norm_act.h"
#include "cnnkernels/activation.h"

namespace cnnkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlockCl = 8;  // channels_last blocks: 32 channels × 8 rows

template <typename F>
__device__ F warp_sum(F v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// The per-element pair of each reduction. `center` is K (statistics) or the mean (backward).
template <bool kGrads, bool kResidual, typename scalar_t, typename Act>
struct PairOp {
  using F = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ grad;
  const scalar_t* __restrict__ residual;
  const F* __restrict__ scale;
  const F* __restrict__ shift;
  const F* __restrict__ center;
  Act act;

  __device__ void operator()(int64_t i, int64_t c, F& a, F& b) const {
    const F xv = static_cast<F>(x[i]);
    if constexpr (!kGrads) {
      const F d = xv - center[c];
      a = d;
      b = d * d;
    } else {
      F pre = fma(xv, scale[c], shift[c]);
      if constexpr (kResidual) pre += static_cast<F>(residual[i]);
      const F dz = act.backward(static_cast<F>(grad[i]), pre);
      a = dz;
      b = dz * (xv - center[c]);
    }
  }
};

// NCHW: block (c, split) sums images [n0, n1) of channel c; partials[split][c]. Channels on
// grid.x (up to 2^31 − 1 blocks), splits on grid.y (at most 4 per SM in all).
template <typename F, typename Op>
__global__ void sum_pairs_planes(Op op, int64_t batch, int64_t channels, int64_t plane,
                                 int64_t images_per_split, F* part_a, F* part_b) {
  const int64_t c = blockIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * images_per_split;
  const int64_t n1 = n0 + images_per_split < batch ? n0 + images_per_split : batch;
  F a = 0, b = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t base = (n * channels + c) * plane;
    for (int64_t i = threadIdx.x; i < plane; i += blockDim.x) {
      F da, db;
      op(base + i, c, da, db);
      a += da;
      b += db;
    }
  }
  __shared__ F shared_a[kThreads / 32], shared_b[kThreads / 32];
  a = warp_sum(a);
  b = warp_sum(b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_a[warp] = a;
    shared_b[warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    F ta = 0, tb = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) {
      ta += shared_a[w];
      tb += shared_b[w];
    }
    part_a[blockIdx.y * channels + c] = ta;
    part_b[blockIdx.y * channels + c] = tb;
  }
}

// channels_last: block (split, channel block) sums rows [r0, r1) of 32 channels.
template <typename F, typename Op>
__global__ void sum_pairs_rows(Op op, int64_t rows, int64_t channels, int64_t rows_per_split,
                               F* part_a, F* part_b) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < rows ? r0 + rows_per_split : rows;
  F a = 0, b = 0;
  if (c < channels) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowsPerBlockCl) {
      F da, db;
      op(r * channels + c, c, da, db);
      a += da;
      b += db;
    }
  }
  __shared__ F shared_a[kRowsPerBlockCl][32], shared_b[kRowsPerBlockCl][32];
  shared_a[threadIdx.y][threadIdx.x] = a;
  shared_b[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    F ta = 0, tb = 0;
    for (int y = 0; y < kRowsPerBlockCl; ++y) {
      ta += shared_a[y][threadIdx.x];
      tb += shared_b[y][threadIdx.x];
    }
    part_a[blockIdx.x * channels + c] = ta;
    part_b[blockIdx.x * channels + c] = tb;
  }
}

struct Geometry {
  bool rows;  // channels_last (or 2-D): rows of C values
  int64_t batch, channels, plane;
  int64_t count() const { return batch * plane; }
};

Geometry geometry_of(const at::Tensor& x) {
  const int64_t batch = x.size(0), channels = x.size(1);
  const int64_t plane = batch * channels == 0 ? 0 : x.numel() / (batch * channels);
  const bool rows = x.dim() == 2 || kernel_memory_format(x) == at::MemoryFormat::ChannelsLast;
  return {rows, batch, channels, plane};
}

int64_t target_blocks() {
  return 4 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// Per-channel (Σa, Σb) as float64 tensors.
template <typename scalar_t, typename Op>
std::pair<at::Tensor, at::Tensor> sum_pairs(const Op& op, const Geometry& g, const at::Tensor& x) {
  using F = at::opmath_type<scalar_t>;
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto options = x.options().dtype(c10::CppTypeToScalarType<F>::value);
  if (!g.rows) {
    const int64_t per_channel = std::max<int64_t>(1, target_blocks() / std::max<int64_t>(1, g.channels));
    const int64_t splits = std::min<int64_t>(g.batch, per_channel);
    const int64_t images = (g.batch + splits - 1) / splits;
    const int64_t used = (g.batch + images - 1) / images;
    at::Tensor part_a = at::empty({used, g.channels}, options), part_b = at::empty_like(part_a);
    const dim3 grid(static_cast<unsigned>(g.channels), static_cast<unsigned>(used));
    sum_pairs_planes<F><<<grid, kThreads, 0, stream>>>(op, g.batch, g.channels, g.plane, images,
                                                       part_a.mutable_data_ptr<F>(),
                                                       part_b.mutable_data_ptr<F>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {part_a.to(at::kDouble).sum(0), part_b.to(at::kDouble).sum(0)};
  }
  const int64_t rows = g.count();
  const int64_t channel_blocks = (g.channels + 31) / 32;
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>((rows + kRowsPerBlockCl - 1) / kRowsPerBlockCl,
                           target_blocks() / channel_blocks));
  const int64_t rows_per_split = (rows + splits - 1) / splits;
  const int64_t used = (rows + rows_per_split - 1) / rows_per_split;
  at::Tensor part_a = at::empty({used, g.channels}, options), part_b = at::empty_like(part_a);
  const dim3 grid(static_cast<unsigned>(used), static_cast<unsigned>(channel_blocks));
  const dim3 block(32, kRowsPerBlockCl);
  sum_pairs_rows<F><<<grid, block, 0, stream>>>(op, rows, g.channels, rows_per_split,
                                                part_a.mutable_data_ptr<F>(),
                                                part_b.mutable_data_ptr<F>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {part_a.to(at::kDouble).sum(0), part_b.to(at::kDouble).sum(0)};
}

// K: each channel's first value, x[0, c, 0, ...], 0 where that is not finite (an infinite K would
// make x − K NaN, and the mean NaN where torch's is ±inf).
at::Tensor anchors(const at::Tensor& x) {
  at::Tensor t = x.select(0, 0);
  while (t.dim() > 1) t = t.select(1, 0);
  t = t.to(at::toOpMathType(x.scalar_type()));
  return at::where(at::isfinite(t), t, at::zeros_like(t)).contiguous();
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_stats_cuda(const at::Tensor& x_in) {
  check_batch_norm_act_args(x_in, nullptr, std::nullopt, {}, "batch_norm_act_stats");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(kernel_memory_format(x_in));
  const auto opmath = at::toOpMathType(x.scalar_type());
  const Geometry g = geometry_of(x);
  if (g.count() == 0 || g.channels == 0) {
    at::Tensor nan = at::full({g.channels}, std::numeric_limits<double>::quiet_NaN(),
                              x.options().dtype(opmath));
    return {nan, nan.clone()};
  }
  const at::Tensor anchor = anchors(x);
  at::Tensor s1, s2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnnkernels_batch_norm_act_stats", [&] {
    using F = at::opmath_type<scalar_t>;
    const PairOp<false, false, scalar_t, Identity> op{x.const_data_ptr<scalar_t>(), nullptr, nullptr,
                                                      nullptr, nullptr, anchor.const_data_ptr<F>(),
                                                      Identity{}};
    std::tie(s1, s2) = sum_pairs<scalar_t>(op, g, x);
  });
  const double count = static_cast<double>(g.count());
  const at::Tensor shifted_mean = s1 / count;
  const at::Tensor mean = (anchor.to(at::kDouble) + shifted_mean).to(opmath);
  const at::Tensor var = (s2 / count - shifted_mean * shifted_mean).clamp_min(0).to(opmath);
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_backward_reduce_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale_in,
    const at::Tensor& shift_in, const at::Tensor& mean_in,
    const std::optional<at::Tensor>& residual_in, int64_t activation, double negative_slope) {
  c10::cuda::CUDAGuard guard(x_in.device());
  const BackwardInputs in_ = backward_inputs(
      grad_in, x_in, residual_in, {{&scale_in, "scale"}, {&shift_in, "shift"}, {&mean_in, "mean"}},
      activation, "batch_norm_act_backward_reduce");
  const at::Tensor &x = in_.x, &grad = in_.grad;
  const auto& residual = in_.residual;
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous(),
                   mean = mean_in.contiguous();
  const Geometry g = geometry_of(x);
  if (g.count() == 0 || g.channels == 0) return {at::zeros_like(scale), at::zeros_like(scale)};
  at::Tensor a, b;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnnkernels_batch_norm_act_backward_reduce", [&] {
    using F = at::opmath_type<scalar_t>;
    dispatch_activation(activation, negative_slope, [&](auto act) {
      using Act = decltype(act);
      const auto* r = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
      if (residual) {
        const PairOp<true, true, scalar_t, Act> op{
            x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), r,
            scale.const_data_ptr<F>(), shift.const_data_ptr<F>(), mean.const_data_ptr<F>(), act};
        std::tie(a, b) = sum_pairs<scalar_t>(op, g, x);
      } else {
        const PairOp<true, false, scalar_t, Act> op{
            x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), r,
            scale.const_data_ptr<F>(), shift.const_data_ptr<F>(), mean.const_data_ptr<F>(), act};
        std::tie(a, b) = sum_pairs<scalar_t>(op, g, x);
      }
    });
  });
  return {a.to(scale.scalar_type()), b.to(scale.scalar_type())};
}

template <typename scalar_t, bool kResidual, bool kChannelsLast, typename Act>
__global__ void elemt_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad,
                             const scalar_t* __restrict__ residual, scalar_t* __restrict__ dx,
                             scalar_t* __restrict__ dresidual,
                             const at::opmath_type<scalar_t>* __restrict__ scale,
                             const at::opmath_type<scalar_t>* __restrict__ shift,
                             const at::opmath_type<scalar_t>* __restrict__ mean,
                             const at::opmath_type<scalar_t>* __restrict__ k_dz,
                             const at::opmath_type<scalar_t>* __restrict__ k_xmu,
                             const at::opmath_type<scalar_t>* __restrict__ k_1, int64_t n,
                             int64_t channels, int64_t inner, Act act) {
  using F = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t c = kChannelsLast ? i % channels : (i / inner) % channels;
    const F xv = static_cast<F>(x[i]);
    F pre = fma(xv, scale[c], shift[c]);
    if constexpr (kResidual) pre += static_cast<F>(residual[i]);
    const F dz = act.backward(static_cast<F>(grad[i]), pre);
    dx[i] = static_cast<scalar_t>(k_dz[c] * dz + k_xmu[c] * (xv - mean[c]) + k_1[c]);
    if constexpr (kResidual) dresidual[i] = static_cast<scalar_t>(dz);
  }
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_backward_elemt_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& k_dz,
    const at::Tensor& k_xmu, const at::Tensor& k_1, const std::optional<at::Tensor>& residual_in,
    int64_t activation, double negative_slope, bool residual_grad) {
  c10::cuda::CUDAGuard guard(x_in.device());
  const BackwardInputs in_ = backward_inputs(
      grad_in, x_in, residual_in,
      {{&scale, "scale"}, {&shift, "shift"}, {&mean, "mean"}, {&k_dz, "coef_dz"}, {&k_xmu, "coef_xmu"},
       {&k_1, "coef_1"}},
      activation, "batch_norm_act_backward_elemt");
  const at::Tensor &x = in_.x, &grad = in_.grad;
  const auto& residual = in_.residual;
  const auto format = in_.format;
  at::Tensor dx = at::empty_like(x, format);
  at::Tensor dresidual = residual ? at::empty_like(x, format) : no_residual_grad(x);
  const int64_t n = x.numel();
  if (n > 0) {
    const Geometry g = geometry_of(x);
    const int64_t inner = g.rows ? 1 : g.plane;
    const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
    auto stream = at::cuda::getCurrentCUDAStream();
    const at::Tensor p[6] = {scale.contiguous(), shift.contiguous(), mean.contiguous(),
                             k_dz.contiguous(),  k_xmu.contiguous(), k_1.contiguous()};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnnkernels_batch_norm_act_backward_elemt", [&] {
      using F = at::opmath_type<scalar_t>;
      dispatch_activation(activation, negative_slope, [&](auto act) {
        const auto* xp = x.const_data_ptr<scalar_t>();
        const auto* gp = grad.const_data_ptr<scalar_t>();
        const auto* rp = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
        auto* dxp = dx.mutable_data_ptr<scalar_t>();
        auto* drp = residual ? dresidual.mutable_data_ptr<scalar_t>() : nullptr;
        auto launch = [&](auto residual_flag, auto cl_flag) {
          constexpr bool kRes = decltype(residual_flag)::value, kCl = decltype(cl_flag)::value;
          elemt_kernel<scalar_t, kRes, kCl><<<blocks, kThreads, 0, stream>>>(
              xp, gp, rp, dxp, drp, p[0].const_data_ptr<F>(), p[1].const_data_ptr<F>(),
              p[2].const_data_ptr<F>(), p[3].const_data_ptr<F>(), p[4].const_data_ptr<F>(),
              p[5].const_data_ptr<F>(), n, g.channels, inner, act);
        };
        if (residual) {
          g.rows ? launch(std::true_type{}, std::true_type{}) : launch(std::true_type{}, std::false_type{});
        } else {
          g.rows ? launch(std::false_type{}, std::true_type{}) : launch(std::false_type{}, std::false_type{});
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (!residual_grad && residual) dresidual = no_residual_grad(x);
  return {dx, dresidual};
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) {
  m.impl("batch_norm_act_stats", &cnnkernels::batch_norm_act_stats_cuda);
  m.impl("batch_norm_act_backward_reduce", &cnnkernels::batch_norm_act_backward_reduce_cuda);
  m.impl("batch_norm_act_backward_elemt", &cnnkernels::batch_norm_act_backward_elemt_cuda);
}
