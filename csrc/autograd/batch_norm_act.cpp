// Autograd of batch_norm_act in C++: act(BatchNorm(x) (+ residual)) as one op whose forward and
// backward run the kernels of csrc/batch_norm_act.cpp through the dispatcher with no Python frame.
//
//   training:   (mean, var) = stats(x)      (or the batch statistics the caller already has)
//               (scale, shift, invstd) = fold(mean, var, weight, bias, running stats updated)
//   evaluation: (scale, shift, invstd) = fold(running_mean, running_var, weight, bias)
//   y = affine_act(x, scale, shift, act, residual)
//   backward:   (Σdz, Σdz·(x − mean)) = backward_reduce(...) → backward_coefs → backward_elemt
//
// Autograd keeps x (and residual) and four per-channel vectors, never the normalised tensor or
// the activation output. Under create_graph=True the gradients come from autograd through the op
// written in ATen ops, recomputed from the saved inputs, so that they can be differentiated again.
// SyncBN (a process_group over several ranks) stays on the Python autograd of
// cnnkernels/ops/batch_norm_act.py: its collectives sit between these kernels.
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
using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

struct Kernels {
  c10::TypedOperatorHandle<Pair(const at::Tensor&)> stats =
      find_op<Pair(const at::Tensor&)>("cnnkernels::batch_norm_act_stats");
  c10::TypedOperatorHandle<Triple(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                  const OptTensor&, const OptTensor&, const OptTensor&, double,
                                  double, int64_t)>
      fold = find_op<Triple(const at::Tensor&, const at::Tensor&, const OptTensor&,
                            const OptTensor&, const OptTensor&, const OptTensor&, double, double,
                            int64_t)>("cnnkernels::batch_norm_act_fold");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      int64_t, double, const OptTensor&)>
      affine = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                  double, const OptTensor&)>("cnnkernels::affine_act");
  c10::TypedOperatorHandle<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t,
                                double)>
      backward_reduce =
          find_op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const OptTensor&, int64_t, double)>(
              "cnnkernels::batch_norm_act_backward_reduce");
  c10::TypedOperatorHandle<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, int64_t)>
      backward_coefs = find_op<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, int64_t)>(
          "cnnkernels::batch_norm_act_backward_coefs");
  c10::TypedOperatorHandle<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t,
                                double, bool)>
      backward_elemt =
          find_op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const OptTensor&, int64_t, double, bool)>(
              "cnnkernels::batch_norm_act_backward_elemt");
};

const Kernels& kernels() {
  static const Kernels k;
  return k;
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// values per channel: N · H · W (C may be 0)
int64_t count_per_channel(const at::Tensor& x) {
  int64_t count = x.size(0);
  for (int64_t d = 2; d < x.dim(); ++d) count *= x.size(d);
  return count;
}

// t in `dtype`; t itself when it already is (below autograd an op may not return its input,
// which aten::to does then)
at::Tensor in_type(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

struct Forward {
  at::Tensor y, mean, scale, shift, invstd;
};

Forward run_forward(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                    const OptTensor& residual, const OptTensor& running_mean,
                    const OptTensor& running_var, bool training, double momentum, double eps,
                    int64_t activation, double negative_slope, const OptTensor& batch_mean,
                    const OptTensor& batch_var, bool for_backward) {
  const Kernels& k = kernels();
  Forward f;
  if (training) {
    at::Tensor var;
    if (given(batch_mean) && given(batch_var)) {
      f.mean = *batch_mean;
      var = *batch_var;
    } else {
      std::tie(f.mean, var) = k.stats.call(x);
    }
    const int64_t count = count_per_channel(x);
    if (count == 0) f.mean = at::zeros_like(f.mean);  // undefined statistics, saved as zeros
    std::tie(f.scale, f.shift, f.invstd) =
        k.fold.call(f.mean, var, weight, bias, running_mean, running_var, momentum, eps, count);
  } else {
    TORCH_CHECK(given(running_mean) && given(running_var),
                "batch_norm_act: evaluation (training=False) needs running_mean and running_var");
    const auto compute = at::toOpMathType(x.scalar_type());
    // for a backward, a copy: it uses the statistics of now, even if the buffers move later
    f.mean = for_backward ? running_mean->to(compute, /*non_blocking=*/false, /*copy=*/true)
                          : in_type(*running_mean, compute);
    std::tie(f.scale, f.shift, f.invstd) =
        k.fold.call(f.mean, in_type(*running_var, compute), weight, bias, std::nullopt,
                    std::nullopt, 0.0, eps, 1);
  }
  f.y = k.affine.call(x, f.scale, f.shift, activation, negative_slope, residual);
  return f;
}

// Whether autograd records this call.
bool records_graph(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                   const OptTensor& residual) {
  const auto needs = [](const OptTensor& t) { return given(t) && t->requires_grad(); };
  return at::GradMode::is_enabled() &&
         (x.requires_grad() || needs(weight) || needs(bias) || needs(residual));
}

// The saved tensors hold the first four arguments (x, weight, bias, residual; undefined where
// not given) at these positions.
constexpr int64_t kSavedSlot[4] = {0, 6, 7, 1};

// Whether argument `arg` (0: x, 1: weight, 2: bias, 3: residual) needs its gradient. Autograd
// numbers its edges over the tensors given only, so an absent weight shifts the later ones.
bool needs_grad(AutogradContext* ctx, const variable_list& saved, int64_t arg) {
  if (!saved[kSavedSlot[arg]].defined()) return false;
  int64_t edge = 0;
  for (int64_t i = 0; i < arg; ++i) edge += saved[kSavedSlot[i]].defined() ? 1 : 0;
  return ctx->needs_input_grad(edge);
}

struct BatchNormActFunction : torch::autograd::Function<BatchNormActFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               bool training, double momentum, double eps, int64_t activation,
                               double negative_slope, const OptTensor& batch_mean,
                               const OptTensor& batch_var) {
    Forward f;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      f = run_forward(x, weight, bias, residual, running_mean, running_var, training, momentum,
                      eps, activation, negative_slope, batch_mean, batch_var,
                      /*for_backward=*/true);
    }
    ctx->saved_data["training"] = training;
    ctx->saved_data["count"] = count_per_channel(x);
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["eps"] = eps;
    // weight and bias (the arguments, no copies) only for create_graph=True
    ctx->save_for_backward({x, residual.value_or(at::Tensor()), f.mean, f.invstd, f.scale, f.shift,
                            weight.value_or(at::Tensor()), bias.value_or(at::Tensor())});
    return {f.y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &residual = saved[1], &mean = saved[2], &invstd = saved[3];
    const at::Tensor &scale = saved[4], &shift = saved[5], &weight = saved[6], &bias = saved[7];
    const bool training = ctx->saved_data["training"].toBool();
    const int64_t count = ctx->saved_data["count"].toInt();
    const int64_t activation = ctx->saved_data["activation"].toInt();
    const double negative_slope = ctx->saved_data["negative_slope"].toDouble();
    const at::Tensor& grad = grads[0];
    variable_list result(13);
    if (at::GradMode::is_enabled()) {
      differentiable_gradients(ctx, grad, saved, training, activation, negative_slope, result);
      return result;
    }
    const bool need_x = needs_grad(ctx, saved, 0), need_w = needs_grad(ctx, saved, 1);
    const bool need_b = needs_grad(ctx, saved, 2), need_r = needs_grad(ctx, saved, 3);
    const Kernels& k = kernels();
    const OptTensor residual_arg = residual.defined() ? OptTensor(residual) : std::nullopt;
    at::Tensor sum_dz, dz_xhat, coef_xmu, coef_1;
    if (training || need_w || need_b) {
      at::Tensor sum_dz_xmu;
      std::tie(sum_dz, sum_dz_xmu) = k.backward_reduce.call(grad, x, scale, shift, mean,
                                                            residual_arg, activation,
                                                            negative_slope);
      // Σdz·x̂ (the weight's gradient), and dx = scale·dz + coef_xmu·(x − mean) + coef_1
      std::tie(dz_xhat, coef_xmu, coef_1) =
          k.backward_coefs.call(sum_dz, sum_dz_xmu, scale, invstd, count);
    }
    if (need_w) result[1] = dz_xhat.to(weight.scalar_type());
    if (need_b) result[2] = sum_dz.to(bias.scalar_type());
    if (need_x || need_r) {
      if (!training) {  // the running statistics are constants: dx = scale·dz
        coef_xmu = at::zeros_like(scale);
        coef_1 = coef_xmu;
      }
      auto [grad_x, grad_residual] =
          k.backward_elemt.call(grad, x, scale, shift, mean, scale, coef_xmu, coef_1,
                                residual_arg, activation, negative_slope, need_r);
      if (need_x) result[0] = grad_x;
      if (need_r) result[3] = grad_residual;
    }
    return result;
  }

  // create_graph=True: autograd through the op in ATen ops, recomputed from the saved inputs.
  // Training normalises with x's own statistics, evaluation with the saved running ones
  // (constants, as in F.batch_norm).
  static void differentiable_gradients(AutogradContext* ctx, const at::Tensor& grad,
                                       const variable_list& saved, bool training,
                                       int64_t activation, double negative_slope,
                                       variable_list& result) {
    const at::Tensor &x = saved[0], &residual = saved[1], &mean = saved[2], &invstd = saved[3];
    const at::Tensor &weight = saved[6], &bias = saved[7];
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto compute = mean.scalar_type();
    std::vector<int64_t> view(x.dim(), 1);
    view[1] = -1;
    const at::Tensor xc = x.to(compute);
    at::Tensor normalised;
    if (training) {
      std::vector<int64_t> dims{0};
      for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
      auto [var, batch_mean] = at::var_mean(xc, dims, /*correction=*/0, /*keepdim=*/false);
      normalised = (xc - batch_mean.view(view)) * at::rsqrt(var + eps).view(view);
    } else {
      normalised = (xc - mean.view(view)) * invstd.view(view);
    }
    at::Tensor pre = weight.defined() ? normalised * weight.to(compute).view(view) : normalised;
    if (bias.defined()) pre = pre + bias.to(compute).view(view);
    if (residual.defined()) pre = pre + residual.to(compute);
    const at::Tensor out = differentiable_activation(pre, activation, negative_slope).to(x.scalar_type());
    const at::Tensor* inputs[4] = {&x, &weight, &bias, &residual};
    std::vector<int64_t> wanted;
    variable_list sources;
    for (int64_t i = 0; i < 4; ++i) {
      if (needs_grad(ctx, saved, i) && inputs[i]->requires_grad()) {
        wanted.push_back(i);
        sources.push_back(*inputs[i]);
      }
    }
    if (sources.empty()) return;
    const variable_list got = differentiable_gradients_of(out, sources, grad);
    for (size_t j = 0; j < wanted.size(); ++j) result[wanted[j]] = got[j];
  }
};

at::Tensor batch_norm_act_autograd(const at::Tensor& x, const OptTensor& weight,
                                   const OptTensor& bias, const OptTensor& residual,
                                   const OptTensor& running_mean, const OptTensor& running_var,
                                   bool training, double momentum, double eps, int64_t activation,
                                   double negative_slope, const OptTensor& batch_mean,
                                   const OptTensor& batch_var) {
  if (!records_graph(x, weight, bias, residual)) {  // no node, and no copies kept for one
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return run_forward(x, weight, bias, residual, running_mean, running_var, training, momentum,
                       eps, activation, negative_slope, batch_mean, batch_var,
                       /*for_backward=*/false)
        .y;
  }
  return BatchNormActFunction::apply(x, weight, bias, residual, running_mean, running_var,
                                     training, momentum, eps, activation, negative_slope,
                                     batch_mean, batch_var)[0];
}

// Below autograd (inference_mode, or a caller that already recorded the graph): the forward alone.
at::Tensor batch_norm_act_forward(const at::Tensor& x, const OptTensor& weight,
                                  const OptTensor& bias, const OptTensor& residual,
                                  const OptTensor& running_mean, const OptTensor& running_var,
                                  bool training, double momentum, double eps, int64_t activation,
                                  double negative_slope, const OptTensor& batch_mean,
                                  const OptTensor& batch_var) {
  return run_forward(x, weight, bias, residual, running_mean, running_var, training, momentum, eps,
                     activation, negative_slope, batch_mean, batch_var, /*for_backward=*/false)
      .y;
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, Autograd, m) {
  m.impl("batch_norm_act", &cnnkernels::batch_norm_act_autograd);
}

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("batch_norm_act", &cnnkernels::batch_norm_act_forward);
}

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) {
  m.impl("batch_norm_act", &cnnkernels::batch_norm_act_forward);
}
