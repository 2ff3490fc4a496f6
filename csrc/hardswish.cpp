// Schemas and argument checks of the h-swish / h-sigmoid ops. Kernels: cpu/hardswish_kernel.cpp,
// cuda/hardswish_kernel.cu; autograd and fake kernels: cnnkernels/ops/hardswish.py.
#include "hardswish.h"

#include <torch/library.h>

#include "cnnkernels/checks.h"

namespace cnnkernels {

void check_activation_input(const at::Tensor& x, const char* op) {
  check_floating(x, op, "x");
}

void check_activation_backward(const at::Tensor& grad_output, const at::Tensor& x, const char* op) {
  check_floating(grad_output, op, "grad_output");
  check_floating(x, op, "x");
  check_same_layout_args(grad_output, "grad_output", x, "x", op);
}

void check_activation_inplace(const at::Tensor& x, const char* op) {
  check_floating(x, op, "x");
  check_writable(x, op, "x");
}

}  // namespace cnnkernels

TORCH_LIBRARY_FRAGMENT(cnnkernels, m) {
  m.def("hardswish(Tensor x) -> Tensor");
  m.def("hardswish_(Tensor(a!) x) -> ()");
  m.def("hardswish_backward(Tensor grad_output, Tensor x) -> Tensor");
  m.def("hardsigmoid(Tensor x) -> Tensor");
  m.def("hardsigmoid_(Tensor(a!) x) -> ()");
  m.def("hardsigmoid_backward(Tensor grad_output, Tensor x) -> Tensor");
}
