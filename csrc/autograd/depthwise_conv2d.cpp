// Autograd of depthwise_conv2d in C++: forward one op, backward the input and weight gradient ops
// (and a sum for the bias), with no Python frame. Autograd keeps x and the weight. The fused
// scale/shift/activation epilogue is for inference and has no gradient. Under create_graph=True
// the gradients come from ATen's conv2d (groups = C) recomputed on the saved inputs, so that they
// can be differentiated again. The Triton implementation keeps its autograd in Python
// (cnnkernels/ops/depthwise_conv2d.py).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "cnnkernels/autograd.h"

namespace cnnkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

using ForwardOp =
    c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                        c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                                        const OptTensor&, const OptTensor&, int64_t, double)>;
using GradOp =
    c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                                        c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef)>;

const ForwardOp& forward_op() {
  static const ForwardOp op = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("cnnkernels::depthwise_conv2d", "")
                                  .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                    const OptTensor&, c10::IntArrayRef,
                                                    c10::IntArrayRef, c10::IntArrayRef,
                                                    const OptTensor&, const OptTensor&, int64_t,
                                                    double)>();
  return op;
}

GradOp grad_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
                        c10::IntArrayRef, c10::IntArrayRef)>();
}

const GradOp& grad_input_op() {
  static const GradOp op = grad_op("cnnkernels::depthwise_conv2d_backward_input");
  return op;
}

const GradOp& grad_weight_op() {
  static const GradOp op = grad_op("cnnkernels::depthwise_conv2d_backward_weight");
  return op;
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

struct DepthwiseFunction : torch::autograd::Function<DepthwiseFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, c10::IntArrayRef dilation,
                               const OptTensor& scale, const OptTensor& shift, int64_t activation,
                               double negative_slope) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["has_bias"] = given(bias);
    ctx->saved_data["epilogue"] = given(scale) || activation != 0;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return {forward_op().call(x, weight, bias, stride, padding, dilation, scale, shift, activation,
                              negative_slope)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!ctx->saved_data["epilogue"].toBool(),
                "depthwise_conv2d: no gradient through the fused inference epilogue");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const bool need_b = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    variable_list result(10);
    if (need_b) result[2] = grads[0].sum({0, 2, 3});
    if (at::GradMode::is_enabled()) {
      differentiable_gradients(ctx, grads[0], x, weight, stride, padding, dilation, result);
      return result;
    }
    // in x's layout, so that the input gradient comes out in it, as F.conv2d's does
    const at::Tensor grad = grads[0].contiguous(kernel_layout_of(x));
    if (ctx->needs_input_grad(0)) {
      result[0] = grad_input_op().call(grad, weight, x.sizes(), stride, padding, dilation);
    }
    if (ctx->needs_input_grad(1)) {
      result[1] = grad_weight_op().call(grad, x, weight.sizes(), stride, padding, dilation);
    }
    return result;
  }

  static void differentiable_gradients(AutogradContext* ctx, const at::Tensor& grad,
                                       const at::Tensor& x, const at::Tensor& weight,
                                       const std::vector<int64_t>& stride,
                                       const std::vector<int64_t>& padding,
                                       const std::vector<int64_t>& dilation,
                                       variable_list& result) {
    std::vector<int64_t> wanted;
    variable_list sources;
    const at::Tensor* inputs[2] = {&x, &weight};
    for (int64_t i = 0; i < 2; ++i) {
      if (ctx->needs_input_grad(i) && inputs[i]->requires_grad()) {
        wanted.push_back(i);
        sources.push_back(*inputs[i]);
      }
    }
    if (sources.empty()) return;
    const at::Tensor out =
        at::conv2d(x, weight, std::optional<at::Tensor>(), stride, padding, dilation, x.size(1));
    const variable_list got = differentiable_gradients_of(out, sources, grad);
    for (size_t j = 0; j < wanted.size(); ++j) result[wanted[j]] = got[j];
  }
};

at::Tensor depthwise_conv2d_autograd(const at::Tensor& x, const at::Tensor& weight,
                                     const OptTensor& bias, c10::IntArrayRef stride,
                                     c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                     const OptTensor& scale, const OptTensor& shift,
                                     int64_t activation, double negative_slope) {
  return DepthwiseFunction::apply(x, weight, bias, stride, padding, dilation, scale, shift,
                                  activation, negative_slope)[0];
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, Autograd, m) {
  m.impl("depthwise_conv2d", &cnnkernels::depthwise_conv2d_autograd);
}
