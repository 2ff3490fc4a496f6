// CPU kernels of batch_norm_act's per-channel steps: batch_norm_act_fold (statistics -> scale,
// shift, invstd, and the running statistics' update) and batch_norm_act_backward_coefs (the
// backward's per-channel coefficients). Schemas and the math: ../batch_norm_act.cpp; the CUDA twin:
// ../cuda/batch_norm_act_channels_kernel.cu. A loop over C values: what matters here is one call
// instead of a dozen torch ops, not the loop's speed. Kept apart from batch_norm_act_kernel.cpp,
// whose vectorised passes take minutes to compile.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "../batch_norm_act.h"

namespace cnnkernels {
namespace {

template <typename F>
const F* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<F>() : nullptr;
}

// running = (1 − m)·running + m·batch, as ATen's batch norm writes it, in the buffer's op-math
// type; the batch value is first rounded to the buffer's dtype, as `.to(running.dtype)` would.
template <typename R, typename F>
inline R moved_average(R running, F batch, at::opmath_type<R> momentum) {
  using O = at::opmath_type<R>;
  const O value = static_cast<O>(static_cast<R>(batch));
  return static_cast<R>(momentum * value + (O(1) - momentum) * static_cast<O>(running));
}

template <typename F, typename R>
void fold_channels(const FoldArgs& a, double momentum, double eps, int64_t count,
                   const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& invstd) {
  const int64_t channels = a.mean.size(0);
  const F* mean = a.mean.const_data_ptr<F>();
  const F* var = a.var.const_data_ptr<F>();
  const F* weight = data_or_null<F>(a.weight);
  const F* bias = data_or_null<F>(a.bias);
  R* running_mean = a.running_mean.defined() ? a.running_mean.mutable_data_ptr<R>() : nullptr;
  R* running_var = a.running_var.defined() ? a.running_var.mutable_data_ptr<R>() : nullptr;
  F* scale_p = scale.mutable_data_ptr<F>();
  F* shift_p = shift.mutable_data_ptr<F>();
  F* invstd_p = invstd.mutable_data_ptr<F>();
  // Python scalars meet a tensor rounded to its type: eps and the unbiasing factor to F
  const F eps_f = static_cast<F>(eps);
  const F unbias = static_cast<F>(static_cast<double>(count) / std::max<int64_t>(count - 1, 1));
  const auto m = static_cast<at::opmath_type<R>>(momentum);
  for (int64_t c = 0; c < channels; ++c) {
    // an empty batch: nothing to normalise (scale 0, shift = bias), running statistics untouched
    const F inv = count == 0 ? F(0) : F(1) / std::sqrt(var[c] + eps_f);
    const F s = weight != nullptr ? inv * weight[c] : inv;
    const F b = bias != nullptr ? bias[c] : F(0);
    invstd_p[c] = inv;
    scale_p[c] = s;
    // rounded once, as ATen's CPU BatchNorm computes beta (its kernels are compiled with FMA
    // contraction; this file is not) and as nvcc contracts the CUDA twin: then the eval output
    // matches nn.BatchNorm2d's bit for bit in float32 and float64
    shift_p[c] = count == 0 ? b : std::fma(-mean[c], s, b);
    if (running_mean != nullptr && count > 0) {
      running_mean[c] = moved_average(running_mean[c], mean[c], m);
      running_var[c] = moved_average(running_var[c], var[c] * unbias, m);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_fold_cpu(
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps, int64_t count) {
  const FoldArgs a = fold_args(mean, var, weight, bias, running_mean, running_var, momentum, eps,
                               count);
  at::Tensor scale = at::empty_like(a.mean), shift = at::empty_like(a.mean),
             invstd = at::empty_like(a.mean);
  const at::ScalarType running_type =
      a.running_mean.defined() ? a.running_mean.scalar_type() : a.mean.scalar_type();
  AT_DISPATCH_FLOATING_TYPES(a.mean.scalar_type(), "cnnkernels_batch_norm_act_fold", [&] {
    using F = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_type,
                                    "cnnkernels_batch_norm_act_fold_running", [&] {
      fold_channels<F, scalar_t>(a, momentum, eps, count, scale, shift, invstd);
    });
  });
  return {scale, shift, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_coefs_cpu(
    const at::Tensor& sum_dz_in, const at::Tensor& sum_dz_xmu_in, const at::Tensor& scale_in,
    const at::Tensor& invstd_in, int64_t count) {
  check_coefs_args(sum_dz_in, sum_dz_xmu_in, scale_in, invstd_in, count);
  const at::Tensor sum_dz = sum_dz_in.contiguous(), sum_dz_xmu = sum_dz_xmu_in.contiguous(),
                   scale = scale_in.contiguous(), invstd = invstd_in.contiguous();
  at::Tensor dz_xhat = at::empty_like(sum_dz), k_xmu = at::empty_like(sum_dz),
             k_1 = at::empty_like(sum_dz);
  AT_DISPATCH_FLOATING_TYPES(sum_dz.scalar_type(), "cnnkernels_batch_norm_act_backward_coefs", [&] {
    using F = scalar_t;
    const F* dz = sum_dz.const_data_ptr<F>();
    const F* dz_xmu = sum_dz_xmu.const_data_ptr<F>();
    const F* s = scale.const_data_ptr<F>();
    const F* inv = invstd.const_data_ptr<F>();
    F* dz_xhat_p = dz_xhat.mutable_data_ptr<F>();
    F* k_xmu_p = k_xmu.mutable_data_ptr<F>();
    F* k_1_p = k_1.mutable_data_ptr<F>();
    const F minus_one_over_n = static_cast<F>(-1.0 / std::max<int64_t>(count, 1));
    for (int64_t c = 0; c < sum_dz.size(0); ++c) {
      const F xhat_sum = dz_xmu[c] * inv[c];
      dz_xhat_p[c] = xhat_sum;
      k_xmu_p[c] = s[c] * xhat_sum * inv[c] * minus_one_over_n;
      k_1_p[c] = s[c] * dz[c] * minus_one_over_n;
    }
  });
  return {dz_xhat, k_xmu, k_1};
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("batch_norm_act_fold", &cnnkernels::batch_norm_act_fold_cpu);
  m.impl("batch_norm_act_backward_coefs", &cnnkernels::batch_norm_act_backward_coefs_cpu);
}
