// h-swish and h-sigmoid: declarations shared by the schema file and the per-device kernels.
#pragma once

#include <ATen/ATen.h>

namespace cnnkernels {

// Validate the arguments of the elementwise activation ops; `op` names the op in messages.
void check_activation_input(const at::Tensor& x, const char* op);
void check_activation_backward(const at::Tensor& grad_output, const at::Tensor& x, const char* op);
void check_activation_inplace(const at::Tensor& x, const char* op);

}  // namespace cnnkernels
