// Autograd of h-swish and h-sigmoid in C++ (the torchvision csrc/ops/autograd pattern): an eager call
// goes from Python into the dispatcher and back out with no Python frame, forward and backward.
// The forward saves only x; the backward is itself differentiable (double backward):
//   d/d grad_output = backward(gg, x),   d/dx = gg · grad_output · act''(x).
// The Triton implementations keep their autograd in Python (cnnkernels/ops/hardswish.py).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace cnnkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using UnaryOp = c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)>;
using BackwardOp = c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&)>;

UnaryOp unary_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<at::Tensor(const at::Tensor&)>();
}

BackwardOp backward_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
}

struct HardSwish {
  static const UnaryOp& forward() {
    static const UnaryOp op = unary_op("cnnkernels::hardswish");
    return op;
  }
  static const BackwardOp& backward() {
    static const BackwardOp op = backward_op("cnnkernels::hardswish_backward");
    return op;
  }
  // 1/3 on the open interval (-3, 3), 0 elsewhere
  static at::Tensor second_derivative(const at::Tensor& x) {
    return at::logical_and(x > -3.0, x < 3.0).to(x.scalar_type()) * (1.0 / 3.0);
  }
};

struct HardSigmoid {
  static const UnaryOp& forward() {
    static const UnaryOp op = unary_op("cnnkernels::hardsigmoid");
    return op;
  }
  static const BackwardOp& backward() {
    static const BackwardOp op = backward_op("cnnkernels::hardsigmoid_backward");
    return op;
  }
  static at::Tensor second_derivative(const at::Tensor& x) { return at::zeros_like(x); }
};

// backward(grad_output, x) as a differentiable function of both.
template <class Act>
struct ActivationBackward : torch::autograd::Function<ActivationBackward<Act>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_output,
                               const at::Tensor& x) {
    ctx->save_for_backward({grad_output, x});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return {Act::backward().call(grad_output, x)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_output = saved[0];
    const at::Tensor& x = saved[1];
    at::Tensor d_grad_output, d_x;
    if (ctx->needs_input_grad(0)) d_grad_output = Act::backward().call(grads[0], x);
    if (ctx->needs_input_grad(1)) d_x = grads[0] * grad_output * Act::second_derivative(x);
    return {d_grad_output, d_x};
  }
};

template <class Act>
struct ActivationFunction : torch::autograd::Function<ActivationFunction<Act>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x) {
    ctx->save_for_backward({x});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return {Act::forward().call(x)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    // through the dispatcher: recorded by ActivationBackward when the graph is being created
    return {Act::backward().call(grads[0], x)};
  }
};

template <class Act>
at::Tensor activation_autograd(const at::Tensor& x) {
  return ActivationFunction<Act>::apply(x)[0];
}

template <class Act>
at::Tensor activation_backward_autograd(const at::Tensor& grad_output, const at::Tensor& x) {
  return ActivationBackward<Act>::apply(grad_output, x)[0];
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, Autograd, m) {
  using namespace cnnkernels;
  m.impl("hardswish", &activation_autograd<HardSwish>);
  m.impl("hardswish_backward", &activation_backward_autograd<HardSwish>);
  m.impl("hardsigmoid", &activation_autograd<HardSigmoid>);
  m.impl("hardsigmoid_backward", &activation_backward_autograd<HardSigmoid>);
}
