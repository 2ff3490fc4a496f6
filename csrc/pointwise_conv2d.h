// pointwise_conv2d: declarations shared by the schema file and the kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace cnnkernels {

// [N, C_out, ceil(H / stride), ceil(W / stride)]
std::vector<int64_t> pointwise_output_size(const at::Tensor& x, const at::Tensor& weight,
                                           int64_t stride);

// Every argument checked, with messages naming it (bias/scale/shift/residual may be absent).
void check_pointwise_conv2d(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t stride, int64_t groups,
                            const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& shift,
                            const std::optional<at::Tensor>& residual, int64_t activation);

}  // namespace cnnkernels
