// Per-channel affine + activation, act(x * scale[c] + shift[c] (+ residual)): declarations shared by the schema
// file and the per-device kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace cnnkernels {

// Validates the arguments of affine_act / affine_act_out (residual and out may be undefined).
void check_affine_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                      const std::optional<at::Tensor>& residual, const at::Tensor& out,
                      const char* op);

// scale/shift viewed as [1, C, 1, ...] to broadcast against x.
at::Tensor channel_view(const at::Tensor& v, const at::Tensor& x);

}  // namespace cnnkernels
