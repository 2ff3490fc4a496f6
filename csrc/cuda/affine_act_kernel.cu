// CUDA kernel of affine_act: y = act(x * scale[c] + shift[c] (+ residual)).
//
// x and y dense in the same layout (NCHW-contiguous or channels_last) are walked as flat arrays in
// storage order, the channel of element i being (i / inner) % C or i % C; other layouts are made
// dense first and copied into y. One thread per element with 64-bit indices, on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../affine_act.h"
#include "cnnkernels/activation.h"

namespace cnnkernels {
namespace {

constexpr int kThreads = 256;


template <typename scalar_t, bool kChannelsLast, typename Act>
__global__ void affine_act_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                  const at::opmath_type<scalar_t>* __restrict__ scale,
                                  const at::opmath_type<scalar_t>* __restrict__ shift,
                                  const scalar_t* __restrict__ residual, int64_t n,
                                  int64_t channels, int64_t inner, Act act) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t c = kChannelsLast ? i % channels : (i / inner) % channels;
    const opmath_t v = static_cast<opmath_t>(x[i]);
    opmath_t pre = fma(v, scale[c], shift[c]);  // one rounding, as the CPU kernel
    if (residual != nullptr) pre += static_cast<opmath_t>(residual[i]);
    y[i] = static_cast<scalar_t>(act.forward(pre));
  }
}

bool channels_last_dense(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void launch(const at::Tensor& out, const at::Tensor& x, const at::Tensor& scale,
            const at::Tensor& shift, const at::Tensor& residual, int64_t activation,
            double negative_slope) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const bool has_residual = residual.defined();
  const bool cl = channels_last_dense(x) && channels_last_dense(out) &&
                  (!has_residual || channels_last_dense(residual));
  const bool nchw = x.is_contiguous() && out.is_contiguous() &&
                    (!has_residual || residual.is_contiguous());
  if (!cl && !nchw) {  // odd strides: compute densely, then copy into out
    at::Tensor dense = at::empty_like(x, at::MemoryFormat::Contiguous);
    launch(dense, x.contiguous(), scale, shift, has_residual ? residual.contiguous() : residual,
           activation, negative_slope);
    out.copy_(dense);
    return;
  }
  const int64_t channels = x.size(1);
  const int64_t inner = channels == 0 ? 1 : n / (x.size(0) * channels);
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnnkernels_affine_act", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    dispatch_activation(activation, negative_slope, [&](auto act) {
      const auto* xp = x.const_data_ptr<scalar_t>();
      auto* yp = out.mutable_data_ptr<scalar_t>();
      const auto* sp = scale.const_data_ptr<opmath_t>();
      const auto* tp = shift.const_data_ptr<opmath_t>();
      const scalar_t* rp = has_residual ? residual.const_data_ptr<scalar_t>() : nullptr;
      if (cl) {
        affine_act_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(xp, yp, sp, tp, rp, n, channels, inner, act);
      } else {
        affine_act_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(xp, yp, sp, tp, rp, n, channels, inner, act);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor defined_or_empty(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

at::Tensor affine_act_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           int64_t activation, double negative_slope,
                           const std::optional<at::Tensor>& residual) {
  check_affine_act(x, scale, shift, residual, at::Tensor(), "affine_act");
  activation_from_int(activation);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  launch(out, x, scale.contiguous(), shift.contiguous(), defined_or_empty(residual), activation,
         negative_slope);
  return out;
}

void affine_act_out_cuda(const at::Tensor& out, const at::Tensor& x, const at::Tensor& scale,
                         const at::Tensor& shift, int64_t activation, double negative_slope,
                         const std::optional<at::Tensor>& residual) {
  check_affine_act(x, scale, shift, residual, out, "affine_act_out");
  activation_from_int(activation);
  c10::cuda::CUDAGuard guard(x.device());
  launch(out, x, scale.contiguous(), shift.contiguous(), defined_or_empty(residual), activation,
         negative_slope);
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) {
  m.impl("affine_act", &cnnkernels::affine_act_cuda);
  m.impl("affine_act_out", &cnnkernels::affine_act_out_cuda);
}
