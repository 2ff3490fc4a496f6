// Autograd of pointwise_conv2d in C++: y = act(scale·conv1x1(x, W) + shift + bias (+ residual)).
// Autograd keeps x, the weight, the epilogue vectors, the residual and y.
//   dpre = act'(pre)·grad       (ReLU's from y; other activations recompute pre: one more GEMM)
//   grad_bias = grad_shift = Σ dpre,  grad_scale = Σ dpre·conv1x1(x),  grad_residual = dpre
//   dz = scale·dpre, then the 1x1 convolution's input and weight gradients: batched BLAS matmuls
//   for NCHW float32/float64 CPU inputs on planes of 28x28 or more (matmul_applies), else ATen's
//   convolution_backward (at stride 1 on the sampled input where the input is strided, see
//   stride_one_input).
// Under create_graph=True the gradients come from autograd through the op in ATen ops, recomputed
// from the saved inputs. The prologue and Triton variants keep their autograd in Python
// (cnnkernels/ops/pointwise_conv2d.py), which this mirrors line for line.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "cnnkernels/autograd.h"

namespace cnnkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kMatmulMinPlane = 28 * 28;
// grad_W as one batched matmul then a sum over the batch while that [N, C_out, C_in] temporary
// stays below this many elements; above it, one accumulating GEMM per image
constexpr int64_t kBatchedWeightGradLimit = 16 * 1024 * 1024;

using ForwardOp = c10::TypedOperatorHandle<at::Tensor(
    const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t, int64_t, const OptTensor&,
    const OptTensor&, const OptTensor&, int64_t, double)>;

const ForwardOp& forward_op() {
  static const ForwardOp op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cnnkernels::pointwise_conv2d", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t,
                            int64_t, const OptTensor&, const OptTensor&, const OptTensor&, int64_t,
                            double)>();
  return op;
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// x[:, :, ::stride, ::stride], dense in x's layout, and stride 1, for a CPU x with stride > 1:
// torch's oneDNN weight gradient of a channels_last 1x1 stride-2 convolution corrupts memory
// (torch 2.14.1; tests/test_pointwise_conv2d.py::test_strided_channels_last_weight_gradient_...);
// at stride 1 on the sampled input it is right.
std::pair<at::Tensor, int64_t> stride_one_input(const at::Tensor& x, int64_t stride) {
  if (stride == 1 || !x.device().is_cpu() || x.dim() != 4) return {x, stride};
  const at::Tensor sampled =
      x.slice(2, 0, std::nullopt, stride).slice(3, 0, std::nullopt, stride);
  return {sampled.contiguous(kernel_layout_of(x)), 1};
}

bool matmul_applies(const at::Tensor& x, int64_t stride, int64_t groups) {
  return x.device().is_cpu() &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && stride == 1 &&
         groups == 1 && x.dim() == 4 && x.is_contiguous() && x.size(2) * x.size(3) >= kMatmulMinPlane;
}

// (scale, shift + bias) in the compute type; ones / zeros where absent
std::pair<at::Tensor, at::Tensor> epilogue_vectors(const at::Tensor& x, int64_t out_channels,
                                                   const at::Tensor& bias, const at::Tensor& scale,
                                                   const at::Tensor& shift) {
  const auto options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor s = scale.defined() ? scale : at::ones({out_channels}, options);
  at::Tensor t = shift.defined() ? shift : at::zeros({out_channels}, options);
  return {s, bias.defined() ? t + bias : t};
}

at::Tensor plain_conv(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t groups) {
  const std::vector<int64_t> strides{stride, stride}, zeros{0, 0}, ones{1, 1};
  return at::conv2d(x, weight, std::optional<at::Tensor>(), strides, zeros, ones, groups);
}

// grad · act'(pre) as autograd computes it for the activation's input
at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& pre, int64_t code,
                               double negative_slope) {
  switch (activation_from_int(code)) {
    case Activation::Identity: return grad;
    case Activation::ReLU: return at::threshold_backward(grad, pre, 0);
    case Activation::ReLU6: return at::hardtanh_backward(grad, pre, 0.0, 6.0);
    case Activation::LeakyReLU: return at::leaky_relu_backward(grad, pre, negative_slope, false);
    case Activation::HardSwish: return at::hardswish_backward(grad, pre);
    case Activation::HardSigmoid: return at::hardsigmoid_backward(grad, pre);
  }
  TORCH_CHECK(false, "pointwise_conv2d: unknown activation code ", code);
}

struct Saved {
  at::Tensor x, weight, bias, scale, shift, residual, y;
  int64_t stride, groups, activation;
  double negative_slope;
};

// (grad_x, grad_w) by BLAS, NCHW: grad_x[n] = Wᵀ·dz[n], grad_W = Σ_n dz[n]·x[n]ᵀ
std::pair<at::Tensor, at::Tensor> matmul_gradients(const at::Tensor& dz, const at::Tensor& x,
                                                   const at::Tensor& weight, bool need_x,
                                                   bool need_w) {
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t cout = weight.size(0);
  const at::Tensor d3 = dz.contiguous().view({n, cout, h * w});
  const at::Tensor w2 = weight.view({cout, cin});
  at::Tensor grad_x, grad_w;
  // bmm over the expanded weight: matmul(2-D, 3-D) folds the batch into one mm through copies
  if (need_x) grad_x = at::bmm(w2.t().expand({n, cin, cout}), d3).view({n, cin, h, w});
  if (need_w) {
    const at::Tensor x3 = x.view({n, cin, h * w});
    if (n * cout * cin <= kBatchedWeightGradLimit) {
      grad_w = at::bmm(d3, x3.transpose(1, 2)).sum(0);
    } else {
      grad_w = at::zeros({cout, cin}, x.options());
      for (int64_t image = 0; image < n; ++image) grad_w.addmm_(d3[image], x3[image].t());
    }
    grad_w = grad_w.view(weight.sizes());
  }
  return {grad_x, grad_w};
}

std::pair<at::Tensor, at::Tensor> convolution_gradients(const at::Tensor& dz, const Saved& s,
                                                        bool need_x, bool need_w) {
  const auto [sampled, sampled_stride] = stride_one_input(s.x, s.stride);
  auto [grad_sampled, grad_w, unused] = at::convolution_backward(
      dz, sampled, s.weight, std::nullopt, {sampled_stride, sampled_stride}, {0, 0}, {1, 1}, false,
      {0, 0}, s.groups, {need_x, need_w, false});
  if (!grad_sampled.defined() || sampled.is_same(s.x)) return {grad_sampled, grad_w};
  at::Tensor grad_x = at::zeros_like(s.x, kernel_layout_of(s.x));
  grad_x.slice(2, 0, std::nullopt, s.stride).slice(3, 0, std::nullopt, s.stride).copy_(grad_sampled);
  return {grad_x, grad_w};
}

struct PointwiseFunction : torch::autograd::Function<PointwiseFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, int64_t stride, int64_t groups,
                               const OptTensor& scale, const OptTensor& shift,
                               const OptTensor& residual, int64_t activation,
                               double negative_slope) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      y = forward_op().call(x, weight, bias, stride, groups, scale, shift, residual, activation,
                            negative_slope);
    }
    ctx->save_for_backward({x, weight, bias.value_or(at::Tensor()), scale.value_or(at::Tensor()),
                            shift.value_or(at::Tensor()), residual.value_or(at::Tensor()), y});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto v = ctx->get_saved_variables();
    const Saved s{v[0], v[1], v[2], v[3], v[4], v[5], v[6],
                  ctx->saved_data["stride"].toInt(), ctx->saved_data["groups"].toInt(),
                  ctx->saved_data["activation"].toInt(),
                  ctx->saved_data["negative_slope"].toDouble()};
    // argument positions 0, 1, 2, 5, 6, 7 (x, weight, bias, scale, shift, residual); autograd
    // numbers its edges over the tensors given only
    const at::Tensor* args[6] = {&s.x, &s.weight, &s.bias, &s.scale, &s.shift, &s.residual};
    bool need[6];
    int64_t edge = 0;
    for (int i = 0; i < 6; ++i) {
      need[i] = args[i]->defined() && ctx->needs_input_grad(edge);
      edge += args[i]->defined() ? 1 : 0;
    }
    variable_list result(10);
    const int64_t position[6] = {0, 1, 2, 5, 6, 7};
    if (at::GradMode::is_enabled()) {
      const variable_list got = differentiable_gradients(grads[0], s, args, need);
      for (int i = 0; i < 6; ++i) result[position[i]] = got[i];
      return result;
    }
    const auto g = gradients(grads[0], s, need);
    for (int i = 0; i < 6; ++i) result[position[i]] = g[i];
    return result;
  }

  // (grad_x, grad_w, grad_bias, grad_scale, grad_shift, grad_residual); undefined where not needed
  static std::array<at::Tensor, 6> gradients(const at::Tensor& grad, const Saved& s,
                                             const bool need[6]) {
    const auto compute = at::toOpMathType(s.x.scalar_type());
    at::Tensor z, dpre;
    const auto code = activation_from_int(s.activation);
    if (code == Activation::Identity) {
      dpre = grad.to(compute);
    } else if (code == Activation::ReLU) {
      // relu'(pre) from y = relu(pre): 0 where y <= 0, NaN passed through, as threshold_backward
      dpre = at::threshold_backward(grad, s.y, 0).to(compute);
    } else {  // recompute the activation's input: one more GEMM
      z = plain_conv(s.x, s.weight, s.stride, s.groups).to(compute);
      const auto [sv, tv] = epilogue_vectors(s.x, s.weight.size(0), s.bias, s.scale, s.shift);
      at::Tensor pre = z * sv.view({1, -1, 1, 1}) + tv.view({1, -1, 1, 1});
      if (s.residual.defined()) pre = pre + s.residual.to(compute);
      dpre = activation_backward(grad.to(compute), pre, s.activation, s.negative_slope);
    }
    std::array<at::Tensor, 6> out;
    if (need[3]) {
      if (!z.defined()) z = plain_conv(s.x, s.weight, s.stride, s.groups).to(compute);
      out[3] = (dpre * z).sum({0, 2, 3});
    }
    if (need[2] || need[4]) {
      const at::Tensor total = dpre.sum({0, 2, 3});
      if (need[2]) out[2] = total;
      if (need[4]) out[4] = total;
    }
    if (need[5]) out[5] = dpre.to(s.x.scalar_type());
    if (need[0] || need[1]) {
      const at::Tensor dz =
          (s.scale.defined() ? dpre * s.scale.view({1, -1, 1, 1}) : dpre).to(s.x.scalar_type());
      auto [gx, gw] = matmul_applies(s.x, s.stride, s.groups)
                          ? matmul_gradients(dz, s.x, s.weight, need[0], need[1])
                          : convolution_gradients(dz, s, need[0], need[1]);
      if (need[0]) out[0] = gx;
      if (need[1]) out[1] = gw;
    }
    return out;
  }

  // create_graph=True: autograd through the op in ATen ops
  static variable_list differentiable_gradients(const at::Tensor& grad, const Saved& s,
                                                const at::Tensor* const args[6],
                                                const bool need[6]) {
    variable_list result(6);
    std::vector<int> wanted;
    variable_list sources;
    for (int i = 0; i < 6; ++i) {
      if (need[i] && args[i]->requires_grad()) {
        wanted.push_back(i);
        sources.push_back(*args[i]);
      }
    }
    if (sources.empty()) return result;
    const auto [u, sampled_stride] = stride_one_input(s.x, s.stride);
    const at::Tensor z = plain_conv(u, s.weight, sampled_stride, s.groups);
    const auto [sv, tv] = epilogue_vectors(s.x, s.weight.size(0), s.bias, s.scale, s.shift);
    at::Tensor pre = z.to(sv.scalar_type()) * sv.view({1, -1, 1, 1}) + tv.view({1, -1, 1, 1});
    if (s.residual.defined()) pre = pre + s.residual.to(sv.scalar_type());
    const at::Tensor out =
        differentiable_activation(pre, s.activation, s.negative_slope).to(s.x.scalar_type());
    const variable_list got = differentiable_gradients_of(out, sources, grad);
    for (size_t j = 0; j < wanted.size(); ++j) result[wanted[j]] = got[j];
    return result;
  }
};

at::Tensor pointwise_conv2d_autograd(const at::Tensor& x, const at::Tensor& weight,
                                     const OptTensor& bias, int64_t stride, int64_t groups,
                                     const OptTensor& scale, const OptTensor& shift,
                                     const OptTensor& residual, int64_t activation,
                                     double negative_slope) {
  return PointwiseFunction::apply(x, weight, bias, stride, groups, scale, shift, residual,
                                  activation, negative_slope)[0];
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, Autograd, m) {
  m.impl("pointwise_conv2d", &cnnkernels::pointwise_conv2d_autograd);
}
