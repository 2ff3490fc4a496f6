// Schema and argument checks of pointwise_conv2d: a 1×1 convolution as a GEMM over channels with a
// per-output-channel epilogue,
//
//   pointwise_conv2d(x, weight, bias, stride, groups, scale, shift, residual, act, slope)
//     y[n, o, h, w] = act(fma(z, scale[o], shift[o] + bias[o]) + residual[n, o, h, w]),
//     z = Σ_i weight[o, i] · x[n, g·Cig + i, stride·h, stride·w]   (g = o's group)
//
// i.e. Conv1×1 → BatchNorm(eval, folded into scale/shift) → activation (+ the inverted residual's
// add) in one op, so the output is written once. The CPU kernel (cpu/pointwise_conv2d_kernel.cpp)
// runs BLAS on output tiles small enough to stay in cache and applies the epilogue to each tile
// while it is there. On CUDA the Python front (cnnkernels/ops/pointwise_conv2d.py) runs cuDNN's
// convolution and our affine_act kernel in place (one extra pass). Autograd: in Python.
#include "pointwise_conv2d.h"

#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cnnkernels/activation.h"
#include "cnnkernels/checks.h"

namespace cnnkernels {

namespace {

void check_channel_vector(const std::optional<at::Tensor>& t, const char* name, int64_t channels,
                          const at::Tensor& x, at::ScalarType type, const char* op) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, op, ": expected argument '", name,
              "' to have shape [", channels, "] (one value per output channel), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == type, op, ": expected argument '", name, "' to be ", type,
              " (the compute type of ", x.scalar_type(), " x), got ", t->scalar_type());
  TORCH_CHECK(t->device() == x.device(), op, ": argument '", name, "' is on ", t->device(),
              " but 'x' is on ", x.device());
}

}  // namespace

std::vector<int64_t> pointwise_output_size(const at::Tensor& x, const at::Tensor& weight,
                                           int64_t stride) {
  return {x.size(0), weight.size(0), (x.size(2) - 1) / stride + 1, (x.size(3) - 1) / stride + 1};
}

void check_pointwise_conv2d(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t stride, int64_t groups,
                            const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& shift,
                            const std::optional<at::Tensor>& residual, int64_t activation) {
  const char* op = "pointwise_conv2d";
  check_floating(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": expected argument 'x' to be 4-D [N, C, H, W], got shape ",
              x.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), op,
              ": 'weight' must have x's dtype and device (", x.scalar_type(), ", ", x.device(),
              "), got ", weight.scalar_type(), ", ", weight.device());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1, op,
              ": expected argument 'weight' to be [C_out, C_in / groups, 1, 1] (a 1x1 kernel), "
              "got shape ", weight.sizes());
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && weight.size(0) % groups == 0, op,
              ": 'groups' (", groups, ") must be >= 1 and divide both the input channels (",
              x.size(1), ") and the output channels (", weight.size(0), ")");
  TORCH_CHECK(weight.size(1) * groups == x.size(1), op, ": 'weight' has ", weight.size(1),
              " input channels per group, but x has ", x.size(1), " channels in ", groups,
              " group(s) (", x.size(1) / groups, " per group)");
  TORCH_CHECK(stride >= 1, op, ": expected argument 'stride' to be >= 1, got ", stride);
  activation_from_int(activation);
  const auto opmath = at::toOpMathType(x.scalar_type());
  const int64_t out_channels = weight.size(0);
  check_channel_vector(bias, "bias", out_channels, x, opmath, op);
  check_channel_vector(scale, "scale", out_channels, x, opmath, op);
  check_channel_vector(shift, "shift", out_channels, x, opmath, op);
  if (residual.has_value() && residual->defined()) {
    const auto size = pointwise_output_size(x, weight, stride);
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(size), op,
                ": expected argument 'residual' to have the output's shape ", at::IntArrayRef(size),
                ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type() && residual->device() == x.device(),
                op, ": 'residual' must have x's dtype and device, got ", residual->scalar_type(),
                ", ", residual->device());
  }
}

}  // namespace cnnkernels

TORCH_LIBRARY_FRAGMENT(cnnkernels, m) {
  m.def("pointwise_conv2d(Tensor x, Tensor weight, Tensor? bias=None, int stride=1, int groups=1, "
        "Tensor? scale=None, Tensor? shift=None, Tensor? residual=None, int activation=0, "
        "float negative_slope=0.01) -> Tensor");
}
