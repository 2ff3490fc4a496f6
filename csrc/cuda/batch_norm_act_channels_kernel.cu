// CUDA kernels of batch_norm_act's per-channel steps: batch_norm_act_fold and
// batch_norm_act_backward_coefs (schemas and the math: ../batch_norm_act.cpp; the CPU twin with
// the same rounding: ../cpu/batch_norm_act_channels_kernel.cpp). One thread per channel, one launch
// each: they replace about a dozen per-channel torch ops (a launch each) per forward and backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../batch_norm_act.h"

namespace cnnkernels {
namespace {

constexpr int kThreads = 256;

template <typename F>
const F* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<F>() : nullptr;
}

int blocks_for(int64_t channels) {
  return static_cast<int>(std::max<int64_t>(1, (channels + kThreads - 1) / kThreads));
}

template <typename R, typename F>
__device__ __forceinline__ R moved_average(R running, F batch, at::opmath_type<R> momentum) {
  using O = at::opmath_type<R>;
  const O value = static_cast<O>(static_cast<R>(batch));
  return static_cast<R>(momentum * value + (O(1) - momentum) * static_cast<O>(running));
}

template <typename F, typename R>
__global__ void fold_kernel(const F* __restrict__ mean, const F* __restrict__ var,
                            const F* __restrict__ weight, const F* __restrict__ bias,
                            R* __restrict__ running_mean, R* __restrict__ running_var,
                            F* __restrict__ scale, F* __restrict__ shift, F* __restrict__ invstd,
                            int64_t channels, F eps, F unbias, at::opmath_type<R> momentum,
                            int64_t count) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const F inv = count == 0 ? F(0) : F(1) / sqrt(var[c] + eps);
  const F s = weight != nullptr ? inv * weight[c] : inv;
  const F b = bias != nullptr ? bias[c] : F(0);
  invstd[c] = inv;
  scale[c] = s;
  shift[c] = count == 0 ? b : b - mean[c] * s;
  if (running_mean != nullptr && count > 0) {
    running_mean[c] = moved_average(running_mean[c], mean[c], momentum);
    running_var[c] = moved_average(running_var[c], var[c] * unbias, momentum);
  }
}

template <typename F>
__global__ void coefs_kernel(const F* __restrict__ sum_dz, const F* __restrict__ sum_dz_xmu,
                             const F* __restrict__ scale, const F* __restrict__ invstd,
                             F* __restrict__ dz_xhat, F* __restrict__ k_xmu, F* __restrict__ k_1,
                             int64_t channels, F minus_one_over_n) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const F xhat_sum = sum_dz_xmu[c] * invstd[c];
  dz_xhat[c] = xhat_sum;
  k_xmu[c] = scale[c] * xhat_sum * invstd[c] * minus_one_over_n;
  k_1[c] = scale[c] * sum_dz[c] * minus_one_over_n;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_fold_cuda(
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps, int64_t count) {
  const FoldArgs a = fold_args(mean, var, weight, bias, running_mean, running_var, momentum, eps,
                               count);
  const c10::cuda::CUDAGuard guard(a.mean.device());
  at::Tensor scale = at::empty_like(a.mean), shift = at::empty_like(a.mean),
             invstd = at::empty_like(a.mean);
  const int64_t channels = a.mean.size(0);
  if (channels == 0) return {scale, shift, invstd};
  const at::ScalarType running_type =
      a.running_mean.defined() ? a.running_mean.scalar_type() : a.mean.scalar_type();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.mean.scalar_type(), "cnnkernels_batch_norm_act_fold_cuda", [&] {
    using F = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_type,
                                    "cnnkernels_batch_norm_act_fold_running_cuda", [&] {
      using R = scalar_t;
      fold_kernel<F, R><<<blocks_for(channels), kThreads, 0, stream>>>(
          a.mean.const_data_ptr<F>(), a.var.const_data_ptr<F>(), data_or_null<F>(a.weight),
          data_or_null<F>(a.bias),
          a.running_mean.defined() ? a.running_mean.mutable_data_ptr<R>() : nullptr,
          a.running_var.defined() ? a.running_var.mutable_data_ptr<R>() : nullptr,
          scale.mutable_data_ptr<F>(), shift.mutable_data_ptr<F>(), invstd.mutable_data_ptr<F>(),
          channels, static_cast<F>(eps),
          static_cast<F>(static_cast<double>(count) / std::max<int64_t>(count - 1, 1)),
          static_cast<at::opmath_type<R>>(momentum), count);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {scale, shift, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_coefs_cuda(
    const at::Tensor& sum_dz_in, const at::Tensor& sum_dz_xmu_in, const at::Tensor& scale_in,
    const at::Tensor& invstd_in, int64_t count) {
  check_coefs_args(sum_dz_in, sum_dz_xmu_in, scale_in, invstd_in, count);
  const c10::cuda::CUDAGuard guard(sum_dz_in.device());
  const at::Tensor sum_dz = sum_dz_in.contiguous(), sum_dz_xmu = sum_dz_xmu_in.contiguous(),
                   scale = scale_in.contiguous(), invstd = invstd_in.contiguous();
  at::Tensor dz_xhat = at::empty_like(sum_dz), k_xmu = at::empty_like(sum_dz),
             k_1 = at::empty_like(sum_dz);
  const int64_t channels = sum_dz.size(0);
  if (channels == 0) return {dz_xhat, k_xmu, k_1};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(sum_dz.scalar_type(), "cnnkernels_batch_norm_act_backward_coefs_cuda",
                             [&] {
    coefs_kernel<scalar_t><<<blocks_for(channels), kThreads, 0, stream>>>(
        sum_dz.const_data_ptr<scalar_t>(), sum_dz_xmu.const_data_ptr<scalar_t>(),
        scale.const_data_ptr<scalar_t>(), invstd.const_data_ptr<scalar_t>(),
        dz_xhat.mutable_data_ptr<scalar_t>(), k_xmu.mutable_data_ptr<scalar_t>(),
        k_1.mutable_data_ptr<scalar_t>(), channels,
        static_cast<scalar_t>(-1.0 / std::max<int64_t>(count, 1)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dz_xhat, k_xmu, k_1};
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) {
  m.impl("batch_norm_act_fold", &cnnkernels::batch_norm_act_fold_cuda);
  m.impl("batch_norm_act_backward_coefs", &cnnkernels::batch_norm_act_backward_coefs_cuda);
}
