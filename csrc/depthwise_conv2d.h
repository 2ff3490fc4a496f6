// Depthwise 2-D convolution: shapes, argument checks and the output-size formula, shared by the
// schema file and the per-device kernels.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

namespace cnnkernels {

// Geometry of one depthwise convolution: x [N, C, H, W], weight [C*m, 1, KH, KW].
struct DepthwiseGeometry {
  int64_t n, c, h, w;        // input
  int64_t multiplier;        // m: output channels per input channel
  int64_t kh, kw;            // kernel
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t oh, ow;            // output spatial size

  int64_t out_channels() const { return c * multiplier; }
};

// Output extent of one spatial dimension, as F.conv2d computes it.
inline int64_t conv_output_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

// Checks every argument and returns the geometry; `op` names the op in error messages. `x` gives the
// dtype; `x_size` the input's shape (which the backward ops get as a list).
DepthwiseGeometry check_depthwise_args(const at::Tensor& x, at::IntArrayRef x_size,
                                       at::IntArrayRef weight_size,
                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, const char* op);

// Checks the optional per-output-channel tensors (bias, scale, shift) of the forward.
void check_channel_vector(const std::optional<at::Tensor>& t, const at::Tensor& x,
                          int64_t channels, const char* op, const char* arg);

// Every check of the forward op (each device's kernel calls it first); returns the geometry.
DepthwiseGeometry check_depthwise_forward(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                          at::IntArrayRef dilation,
                                          const std::optional<at::Tensor>& scale,
                                          const std::optional<at::Tensor>& shift, const char* op);

// The backward ops' check that grad_output has the output's shape.
void check_grad_output_shape(const at::Tensor& grad_output, const DepthwiseGeometry& g,
                             const char* op);

// Whether the kernels produce channels_last: exactly when `t` is channels_last and not also plain
// contiguous (as happens for C == 1 or 1x1 images). The fake kernels in
// cnnkernels/ops/depthwise_conv2d.py mirror this.
inline bool wants_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace cnnkernels
