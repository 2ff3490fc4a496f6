// squeeze_excite's fused backward pass: declarations shared by the schema file and the kernels.
#pragma once

#include <ATen/ATen.h>

namespace cnnkernels {

// grad and x: [N, C, H, W] of one floating dtype, device and shape; gate: [N, C] in the compute
// type (float32 for float32/float16/bfloat16, float64 for float64) on the same device.
void check_squeeze_excite_backward(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& gate, const char* op);

}  // namespace cnnkernels
