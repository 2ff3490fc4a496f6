// Schemas and argument checks of batch_norm_act's kernels: the one-pass statistics of the training
// forward and the two passes of the backward, from the saved input alone.
//
//   batch_norm_act_stats(x) -> (mean, var)                  per channel, var biased, one read of x
//   batch_norm_act_backward_reduce(grad, x, scale, shift, mean, residual, act)
//       -> (Σ dz, Σ dz·(x − mean))                          one read of x, grad (and residual)
//   batch_norm_act_backward_elemt(grad, x, scale, shift, mean, k_dz, k_xmu, k_1, residual, act)
//       -> (dx = k_dz·dz + k_xmu·(x − mean) + k_1, dresidual = dz)
//   batch_norm_act_backward_reduce_add_(out!, grad, x, scale, shift, mean, k_dz, act)
//       -> (Σ dz, Σ dz·(x − mean)), and out += k_dz·dz in the same pass; CPU only, same layouts as
//       the above: the DenseNet block adds the rest of dx, k_xmu·(x − mean) + k_1, once per channel
//       for all the layers that read it
// and the per-channel algebra between them, one small kernel each instead of a dozen torch ops
// (on a GPU each of those is a launch plus host work, which decides the speed at MobileNet sizes):
//   batch_norm_act_fold(mean, var, weight, bias, running_mean!, running_var!, momentum, eps, count)
//       -> (scale = invstd·weight, shift = bias − mean·scale, invstd = 1/sqrt(var + eps)), and
//       running = (1 − momentum)·running + momentum·batch (unbiased var) when count > 0
//   batch_norm_act_backward_coefs(Σdz, Σdz·(x − mean), scale, invstd, count)
//       -> (Σdz·x̂ = Σdz·(x − mean)·invstd, k_xmu = −scale·invstd·Σdz·x̂ / count,
//           k_1 = −scale·Σdz / count)
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
#include "cnnkernels/cpu/rows.h"

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

int64_t channels_last_row_stride(const at::Tensor& x) {
  if (x.numel() == 0) return 0;
  const int64_t row = cpu::pixel_row_stride(x);
  return row > x.size(1) ? row : 0;
}

void check_out_rows(const at::Tensor& out, const at::Tensor& x, const char* op) {
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
                  out.device() == x.device(),
              op, ": expected argument 'out' to have x's sizes, dtype and device (", x.sizes(), ", ",
              x.scalar_type(), ", ", x.device(), "), got (", out.sizes(), ", ", out.scalar_type(),
              ", ", out.device(), ")");
  TORCH_CHECK(cpu::pixel_row_stride(out) > 0, op,
              ": expected argument 'out' to be a channels_last 4-D tensor or a channel slice of "
              "one, got strides ", out.strides());
}

BackwardInputs backward_inputs(const at::Tensor& grad, const at::Tensor& x,
                               const std::optional<at::Tensor>& residual,
                               std::initializer_list<ChannelArg> per_channel, int64_t activation,
                               const char* op, bool strided_rows) {
  check_batch_norm_act_args(x, &grad, residual, per_channel, op);
  activation_from_int(activation);
  const int64_t row_stride = strided_rows ? channels_last_row_stride(x) : 0;
  if (row_stride > 0) {  // x read in place; everything else dense channels_last
    const auto format = at::MemoryFormat::ChannelsLast;
    std::optional<at::Tensor> dense_residual;
    if (residual.has_value() && residual->defined()) dense_residual = residual->contiguous(format);
    return {format, x, grad.contiguous(format), dense_residual, row_stride};
  }
  const auto format = kernel_memory_format(x);
  std::optional<at::Tensor> dense_residual;
  if (residual.has_value() && residual->defined()) dense_residual = residual->contiguous(format);
  const int64_t rows = x.dim() >= 2 ? x.size(1) : 0;
  return {format, x.contiguous(format), grad.contiguous(format), dense_residual, rows};
}

at::Tensor no_residual_grad(const at::Tensor& x) { return at::empty({0}, x.options()); }

namespace {

// A [C] tensor on `like`'s device; `dtype_must_match`: also of like's dtype.
void check_channel_vector(const at::Tensor& t, const char* name, const at::Tensor& like,
                          const char* like_name, bool dtype_must_match, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == like.size(0), op, ": expected argument '", name,
              "' to have shape [", like.size(0), "] (one value per channel, as '", like_name,
              "'), got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": argument '", name, "' is on ", t.device(),
              " but '", like_name, "' is on ", like.device());
  if (dtype_must_match) {
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": expected argument '", name,
                "' to be ", like.scalar_type(), " (as '", like_name, "'), got ", t.scalar_type());
  } else {
    check_floating(t, op, name);
  }
}

void check_compute_vector(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": argument '", name, "' is undefined");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": expected argument '", name, "' to be float32 or float64 (a compute type), got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": expected argument '", name, "' to be 1-D [C], got ",
              t.sizes());
}

}  // namespace

FoldArgs fold_args(const at::Tensor& mean, const at::Tensor& var,
                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& running_mean,
                   const std::optional<at::Tensor>& running_var, double momentum, double eps,
                   int64_t count) {
  const char* op = "batch_norm_act_fold";
  check_compute_vector(mean, "mean", op);
  check_channel_vector(var, "var", mean, "mean", true, op);
  TORCH_CHECK(count >= 0, op, ": expected argument 'count' (values per channel) to be >= 0, got ",
              count);
  TORCH_CHECK(eps >= 0, op, ": expected argument 'eps' to be >= 0, got ", eps);
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_mean == has_var, op, ": pass both 'running_mean' and 'running_var', or neither");
  FoldArgs args{mean.contiguous(), var.contiguous(), {}, {}, {}, {}};
  if (weight.has_value() && weight->defined()) {
    check_channel_vector(*weight, "weight", mean, "mean", false, op);
    args.weight = weight->to(mean.scalar_type()).contiguous();
  }
  if (bias.has_value() && bias->defined()) {
    check_channel_vector(*bias, "bias", mean, "mean", false, op);
    args.bias = bias->to(mean.scalar_type()).contiguous();
  }
  if (has_mean) {
    TORCH_CHECK(momentum >= 0 && momentum <= 1, op,
                ": expected argument 'momentum' to be in [0, 1], got ", momentum);
    check_channel_vector(*running_mean, "running_mean", mean, "mean", false, op);
    check_channel_vector(*running_var, "running_var", *running_mean, "running_mean", true, op);
    // updated in place: they must be dense, so that the kernels' writes land in them
    TORCH_CHECK(running_mean->is_contiguous() && running_var->is_contiguous(), op,
                ": 'running_mean' and 'running_var' are updated in place and must be contiguous");
    check_writable(*running_mean, op, "running_mean");
    check_writable(*running_var, op, "running_var");
    args.running_mean = *running_mean;
    args.running_var = *running_var;
  }
  return args;
}

void check_coefs_args(const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu,
                      const at::Tensor& scale, const at::Tensor& invstd, int64_t count) {
  const char* op = "batch_norm_act_backward_coefs";
  check_compute_vector(sum_dz, "sum_dz", op);
  check_channel_vector(sum_dz_xmu, "sum_dz_xmu", sum_dz, "sum_dz", true, op);
  check_channel_vector(scale, "scale", sum_dz, "sum_dz", true, op);
  check_channel_vector(invstd, "invstd", sum_dz, "sum_dz", true, op);
  TORCH_CHECK(count >= 0, op, ": expected argument 'count' (values per channel) to be >= 0, got ",
              count);
}

}  // namespace cnnkernels

TORCH_LIBRARY_FRAGMENT(cnnkernels, m) {
  // the whole op (autograd: autograd/batch_norm_act.cpp); batch_mean/batch_var: the training
  // batch's statistics when the caller already has them (the stats pass is then skipped)
  m.def("batch_norm_act(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
        "float eps, int activation, float negative_slope, Tensor? batch_mean=None, "
        "Tensor? batch_var=None) -> Tensor");
  m.def("batch_norm_act_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("batch_norm_act_backward_reduce(Tensor grad, Tensor x, Tensor scale, Tensor shift, "
        "Tensor mean, Tensor? residual=None, int activation=0, float negative_slope=0.01) "
        "-> (Tensor sum_dz, Tensor sum_dz_xmu)");
  m.def("batch_norm_act_backward_elemt(Tensor grad, Tensor x, Tensor scale, Tensor shift, "
        "Tensor mean, Tensor coef_dz, Tensor coef_xmu, Tensor coef_1, Tensor? residual=None, "
        "int activation=0, float negative_slope=0.01, bool residual_grad=False) "
        "-> (Tensor grad_x, Tensor grad_residual)");
  m.def("batch_norm_act_backward_reduce_add_(Tensor(a!) out, Tensor grad, Tensor x, Tensor scale, "
        "Tensor shift, Tensor mean, Tensor coef_dz, int activation=0, float negative_slope=0.01) "
        "-> (Tensor sum_dz, Tensor sum_dz_xmu)");
  m.def("batch_norm_act_fold(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, int count) "
        "-> (Tensor scale, Tensor shift, Tensor invstd)");
  m.def("batch_norm_act_backward_coefs(Tensor sum_dz, Tensor sum_dz_xmu, Tensor scale, "
        "Tensor invstd, int count) -> (Tensor dz_xhat, Tensor coef_xmu, Tensor coef_1)");
}
