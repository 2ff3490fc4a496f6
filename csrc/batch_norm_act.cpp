// Schemas and argument checks of batch_norm_act's kernels: the one-pass statistics of the training
// forward and the two passes of the backward, from the saved input alone.
//
//   batch_norm_act_stats(x) -> (mean, var)                  per channel, var biased, one read of x
//   batch_norm_act_backward_reduce(grad, x, scale, shift, mean, residual, act)
//       -> (Σ dz, Σ dz·(x − mean))                          one read of x, grad (and residual)
//   batch_norm_act_backward_elemt(grad, x, scale, shift, mean, k_dz, k_xmu, k_1, residual, act)
//       -> (dx = k_dz·dz + k_xmu·(x − mean) + k_1, dresidual = dz)
// where pre = fma(x, scale, shift) (+ residual) is the activation's input the forward computed
// (affine_act), and dz = act'(pre)·grad is recomputed from it in both backward passes, so autograd
// never keeps the normalised tensor or the activation output. The reductions are split from the
// elementwise pass so that SyncBN can all-reduce the per-channel sums in between, as ATen's
// batch_norm_backward_reduce / batch_norm_backward_elemt split them. Python front, autograd and the
// per-channel algebra: cnnkernels/ops/batch_norm_act.py. Kernels: cpu/ and cuda/batch_norm_act_kernel.*.
#include "batch_norm_act.h"

#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cnnkernels/activation.h"
#include "cnnkernels/checks.h"

namespace cnnkernels {

at::MemoryFormat kernel_memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

void check_batch_norm_act_args(const at::Tensor& x, const at::Tensor* grad,
                               const std::optional<at::Tensor>& residual,
                               std::initializer_list<ChannelArg> per_channel, const char* op) {
  check_floating(x, op, "x");
  TORCH_CHECK(x.dim() >= 2, op, ": expected argument 'x' to have a channel dimension ([N, C, ...]), "
              "got shape ", x.sizes());
  if (grad != nullptr) check_same_layout_args(*grad, "grad", x, "x", op);
  if (residual.has_value() && residual->defined()) {
    check_same_layout_args(*residual, "residual", x, "x", op);
  }
  const auto opmath = at::toOpMathType(x.scalar_type());
  const int64_t channels = x.size(1);
  for (const ChannelArg& arg : per_channel) {
    const at::Tensor& t = *arg.tensor;
    TORCH_CHECK(t.defined(), op, ": argument '", arg.name, "' is undefined");
    TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": expected argument '", arg.name,
                "' to have shape [", channels, "] (one value per channel of x), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == opmath, op, ": expected argument '", arg.name, "' to be ",
                opmath, " (the compute type of ", x.scalar_type(), " x), got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": argument '", arg.name, "' is on ", t.device(),
                " but 'x' is on ", x.device());
  }
}

BackwardInputs backward_inputs(const at::Tensor& grad, const at::Tensor& x,
                               const std::optional<at::Tensor>& residual,
                               std::initializer_list<ChannelArg> per_channel, int64_t activation,
                               const char* op) {
  check_batch_norm_act_args(x, &grad, residual, per_channel, op);
  activation_from_int(activation);
  const auto format = kernel_memory_format(x);
  std::optional<at::Tensor> dense_residual;
  if (residual.has_value() && residual->defined()) dense_residual = residual->contiguous(format);
  return {format, x.contiguous(format), grad.contiguous(format), dense_residual};
}

at::Tensor no_residual_grad(const at::Tensor& x) { return at::empty({0}, x.options()); }

}  // namespace cnnkernels

TORCH_LIBRARY_FRAGMENT(cnnkernels, m) {
  m.def("batch_norm_act_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("batch_norm_act_backward_reduce(Tensor grad, Tensor x, Tensor scale, Tensor shift, "
        "Tensor mean, Tensor? residual=None, int activation=0, float negative_slope=0.01) "
        "-> (Tensor sum_dz, Tensor sum_dz_xmu)");
  m.def("batch_norm_act_backward_elemt(Tensor grad, Tensor x, Tensor scale, Tensor shift, "
        "Tensor mean, Tensor coef_dz, Tensor coef_xmu, Tensor coef_1, Tensor? residual=None, "
        "int activation=0, float negative_slope=0.01, bool residual_grad=False) "
        "-> (Tensor grad_x, Tensor grad_residual)");
}
