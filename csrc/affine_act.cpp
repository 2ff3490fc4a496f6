// Schemas and argument checks of affine_act: y = act(x * scale[c] + shift[c] (+ residual)) over
// dim 1.
//
// It is BatchNorm's elementwise pass with the statistics folded into scale and shift (inference, or
// re-applying batch statistics computed earlier), fused with the activation: one read of x and
// one write of y. The optional residual is added before the activation (ResNet's bn → +identity →
// relu). Kernels: cpu/affine_act_kernel.cpp, cuda/affine_act_kernel.cu; Python front and
// fake kernels: cnnkernels/ops/affine_act.py.
#include "affine_act.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "cnnkernels/checks.h"

namespace cnnkernels {

void check_affine_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                      const std::optional<at::Tensor>& residual, const at::Tensor& out,
                      const char* op) {
  check_floating(x, op, "x");
  TORCH_CHECK(x.dim() >= 2, op, ": expected argument 'x' to have a channel dimension ([N, C, ...]), "
              "got shape ", x.sizes());
  const auto opmath = at::toOpMathType(x.scalar_type());
  const int64_t channels = x.size(1);
  for (const auto& [t, name] : {std::pair{&scale, "scale"}, std::pair{&shift, "shift"}}) {
    TORCH_CHECK(t->defined(), op, ": argument '", name, "' is undefined");
    TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, op, ": expected argument '", name,
                "' to have shape [", channels, "] (one value per channel of x), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == opmath, op, ": expected argument '", name, "' to be ", opmath,
                " (the compute type of ", x.scalar_type(), " x), got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": argument '", name, "' is on ", t->device(),
                " but 'x' is on ", x.device());
  }
  if (residual.has_value() && residual->defined()) {
    check_same_layout_args(*residual, "residual", x, "x", op);
    if (out.defined()) {
      TORCH_CHECK(at::get_overlap_status(out, *residual) != at::MemOverlapStatus::Partial, op,
                  ": 'out' partially overlaps 'residual'; pass the same tensor or a separate one");
    }
  }
  if (out.defined()) {
    check_same_layout_args(out, "out", x, "x", op);
    check_writable(out, op, "out");
    const auto overlap = at::get_overlap_status(out, x);
    TORCH_CHECK(overlap != at::MemOverlapStatus::Partial, op,
                ": 'out' partially overlaps 'x'; pass the same tensor (in place) or a separate one");
  }
}

at::Tensor channel_view(const at::Tensor& v, const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = v.size(0);
  return v.view(shape);
}

}  // namespace cnnkernels

TORCH_LIBRARY_FRAGMENT(cnnkernels, m) {
  m.def("affine_act(Tensor x, Tensor scale, Tensor shift, int activation=0, "
        "float negative_slope=0.01, Tensor? residual=None) -> Tensor");
  m.def("affine_act_out(Tensor(a!) out, Tensor x, Tensor scale, Tensor shift, int activation=0, "
        "float negative_slope=0.01, Tensor? residual=None) -> ()");
}
