// Schemas and argument checks of depthwise 2-D convolution. Kernels: cpu/depthwise_conv2d_kernel.cpp
// (and the Triton twin in cnnkernels/triton/depthwise_conv2d.py); autograd and fake kernels:
// cnnkernels/ops/depthwise_conv2d.py.
#include "depthwise_conv2d.h"

#include <torch/library.h>

#include "cnnkernels/checks.h"

namespace cnnkernels {

namespace {

void check_pair(at::IntArrayRef v, const char* op, const char* arg, int64_t minimum) {
  TORCH_CHECK(v.size() == 2, op, ": '", arg, "' must have 2 values (height, width), got ", v);
  TORCH_CHECK(v[0] >= minimum && v[1] >= minimum, op, ": '", arg, "' must be >= ", minimum,
              ", got ", v);
}

}  // namespace

DepthwiseGeometry check_depthwise_args(const at::Tensor& x, at::IntArrayRef x_size,
                                       at::IntArrayRef weight_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation,
                                       const char* op) {
  check_floating(x, op, "x");
  TORCH_CHECK(x_size.size() == 4, op, ": expected 'x' of shape [N, C, H, W], got ", x_size);
  TORCH_CHECK(weight_size.size() == 4 && weight_size[1] == 1, op,
              ": expected 'weight' of shape [C*multiplier, 1, kh, kw], got ", weight_size);
  check_pair(stride, op, "stride", 1);
  check_pair(padding, op, "padding", 0);
  check_pair(dilation, op, "dilation", 1);
  DepthwiseGeometry g{};
  g.n = x_size[0];
  g.c = x_size[1];
  g.h = x_size[2];
  g.w = x_size[3];
  TORCH_CHECK(g.c > 0 && weight_size[0] % g.c == 0 && weight_size[0] > 0, op,
              ": 'weight' has ", weight_size[0], " output channels, which is not a positive "
              "multiple of the ", g.c, " input channels");
  g.multiplier = weight_size[0] / g.c;
  g.kh = weight_size[2];
  g.kw = weight_size[3];
  TORCH_CHECK(g.kh > 0 && g.kw > 0, op, ": kernel size must be positive, got ", weight_size);
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  const int64_t eff_kh = g.dh * (g.kh - 1) + 1, eff_kw = g.dw * (g.kw - 1) + 1;
  TORCH_CHECK(g.h + 2 * g.ph >= eff_kh && g.w + 2 * g.pw >= eff_kw, op,
              ": the (dilated) kernel ", eff_kh, "x", eff_kw, " is larger than the padded input ",
              g.h + 2 * g.ph, "x", g.w + 2 * g.pw);
  g.oh = conv_output_size(g.h, g.kh, g.sh, g.ph, g.dh);
  g.ow = conv_output_size(g.w, g.kw, g.sw, g.pw, g.dw);
  return g;
}

void check_channel_vector(const std::optional<at::Tensor>& t, const at::Tensor& x,
                          int64_t channels, const char* op, const char* arg) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, op, ": '", arg, "' must have shape [",
              channels, "], got ", t->sizes());
  TORCH_CHECK(t->device() == x.device(), op, ": '", arg, "' is on ", t->device(),
              " but 'x' is on ", x.device());
  TORCH_CHECK(is_supported_float(t->scalar_type()), op, ": '", arg,
              "' must be a floating-point tensor, got ", t->scalar_type());
}

DepthwiseGeometry check_depthwise_forward(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                          at::IntArrayRef dilation,
                                          const std::optional<at::Tensor>& scale,
                                          const std::optional<at::Tensor>& shift, const char* op) {
  const DepthwiseGeometry g =
      check_depthwise_args(x, x.sizes(), weight.sizes(), stride, padding, dilation, op);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), op,
              ": 'weight' must have the dtype and device of 'x' (", x.scalar_type(), ", ",
              x.device(), "), got ", weight.scalar_type(), ", ", weight.device());
  check_channel_vector(bias, x, g.out_channels(), op, "bias");
  check_channel_vector(scale, x, g.out_channels(), op, "scale");
  check_channel_vector(shift, x, g.out_channels(), op, "shift");
  TORCH_CHECK(scale.has_value() == shift.has_value(), op,
              ": 'scale' and 'shift' must be given together");
  return g;
}

void check_grad_output_shape(const at::Tensor& grad_output, const DepthwiseGeometry& g,
                             const char* op) {
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.n, g.out_channels(), g.oh, g.ow}), op,
              ": 'grad_output' must have shape [", g.n, ", ", g.out_channels(), ", ", g.oh, ", ",
              g.ow, "], got ", grad_output.sizes());
}

}  // namespace cnnkernels

TORCH_LIBRARY_FRAGMENT(cnnkernels, m) {
  // out = act(scale * (conv(x, weight) + bias) + shift), per output channel; scale/shift are a
  // folded BatchNorm for inference, `activation` a code of cnnkernels/activations.py.
  m.def(
      "depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "int[] dilation, Tensor? scale=None, Tensor? shift=None, int activation=0, "
      "float negative_slope=0.01) -> Tensor");
  m.def(
      "depthwise_conv2d_backward_input(Tensor grad_output, Tensor weight, int[] input_size, "
      "int[] stride, int[] padding, int[] dilation) -> Tensor");
  m.def(
      "depthwise_conv2d_backward_weight(Tensor grad_output, Tensor x, int[] weight_size, "
      "int[] stride, int[] padding, int[] dilation) -> Tensor");
}
