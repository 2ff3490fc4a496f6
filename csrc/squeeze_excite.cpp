// Schema and argument checks of squeeze_excite's fused backward pass.
//
// Squeeze-and-excitation computes y = x · gate[n, c] with gate = σ(fc2(δ(fc1(mean_hw(x))))). Its
// backward needs, from the input-sized tensors, dx_scale = grad · gate[n, c] and the per-(n, c)
// reduction Σ_hw grad · x (the gate's gradient): autograd computes them as three passes and a
// temporary (grad · gate, grad · x, then the sum). Here both come from one read of grad and x:
//   squeeze_excite_backward(grad, x, gate) -> (grad · gate, Σ_hw grad · x)
// The tiny fully connected part and the pooling's gradient (dx += dmean / HW, one in-place pass)
// stay in cnnkernels/ops/squeeze_excite.py. Kernels: cpu/ and cuda/squeeze_excite_kernel.*.
#include "squeeze_excite.h"

#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cnnkernels/checks.h"

namespace cnnkernels {

void check_squeeze_excite_backward(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& gate, const char* op) {
  check_floating(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": expected argument 'x' to be 4-D [N, C, H, W], got shape ",
              x.sizes());
  check_same_layout_args(grad, "grad", x, "x", op);
  const auto opmath = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == x.size(0) && gate.size(1) == x.size(1), op,
              ": expected argument 'gate' to have shape [", x.size(0), ", ", x.size(1),
              "] (one value per image and channel), got ", gate.sizes());
  TORCH_CHECK(gate.scalar_type() == opmath, op, ": expected argument 'gate' to be ", opmath,
              " (the compute type of ", x.scalar_type(), " x), got ", gate.scalar_type());
  TORCH_CHECK(gate.device() == x.device(), op, ": argument 'gate' is on ", gate.device(),
              " but 'x' is on ", x.device());
}

}  // namespace cnnkernels

TORCH_LIBRARY_FRAGMENT(cnnkernels, m) {
  m.def("squeeze_excite_backward(Tensor grad, Tensor x, Tensor gate) -> (Tensor grad_x, Tensor grad_gate)");
}
