// Pieces shared by the C++ autograd of the ops (csrc/autograd/): the backward under
// create_graph=True, where the gradients come from autograd through the op written in ATen ops
// (our backward kernels have no derivatives of their own), and the layout the kernels produce.
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "cnnkernels/activation.h"

namespace cnnkernels {

// The activation in ATen ops that autograd can differentiate twice (h-sigmoid as relu6(x + 3) / 6:
// ATen has no derivative for hardsigmoid_backward).
inline at::Tensor differentiable_activation(const at::Tensor& pre, int64_t code,
                                            double negative_slope) {
  switch (activation_from_int(code)) {
    case Activation::Identity: return pre;
    case Activation::ReLU: return at::relu(pre);
    case Activation::ReLU6: return at::hardtanh(pre, 0.0, 6.0);
    case Activation::LeakyReLU: return at::leaky_relu(pre, negative_slope);
    case Activation::HardSwish: return at::hardswish(pre);
    case Activation::HardSigmoid: return at::hardtanh(pre + 3.0, 0.0, 6.0) / 6.0;
  }
  TORCH_CHECK(false, "cnnkernels: unknown activation code ", code);
}

// d out / d sources · grad, differentiable (create_graph), zeros for a source `out` does not reach.
inline torch::autograd::variable_list differentiable_gradients_of(
    const at::Tensor& out, const torch::autograd::variable_list& sources, const at::Tensor& grad) {
  torch::autograd::variable_list got = torch::autograd::grad(
      {out}, sources, {grad}, /*retain_graph=*/true, /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t i = 0; i < got.size(); ++i) {
    if (!got[i].defined()) got[i] = at::zeros_like(sources[i]);
  }
  return got;
}

// channels_last exactly when the kernels produce it: a 4-D tensor dense in channels_last and not
// in NCHW
inline at::MemoryFormat kernel_layout_of(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

}  // namespace cnnkernels
