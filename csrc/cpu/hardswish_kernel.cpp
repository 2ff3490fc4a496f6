// CPU kernels of h-swish / h-sigmoid (forward, backward, in place).
//
// TensorIterator walks any strides without copies and splits the work across threads; the inner
// loop gets contiguous runs whenever the tensors are dense (NCHW or channels_last alike), and those
// go through cnnkernels/cpu/map.h (vectorised, AVX2 when the CPU has it). Half and bfloat16 are
// computed in float and rounded once, as ATen does, so results equal torch.nn.functional's.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include <string>

#include "../hardswish.h"
#include "cnnkernels/activation.h"
#include "cnnkernels/cpu/map.h"

namespace cnnkernels {
namespace {

template <typename scalar_t>
inline bool is_contiguous_run(const int64_t* strides, int ntensors) {
  for (int i = 0; i < ntensors; ++i) {
    if (strides[i] != static_cast<int64_t>(sizeof(scalar_t))) return false;
  }
  return true;
}

template <typename scalar_t, typename Act>
void forward_run(const scalar_t* x, scalar_t* y, int64_t n, Act act, bool stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  cpu::map1(x, y, n, [act](opmath_t v) { return act.forward(v); }, stream);
}

template <typename scalar_t, typename Act>
void backward_run(const scalar_t* g, const scalar_t* x, scalar_t* out, int64_t n, Act act,
                  bool stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  cpu::map2(g, x, out, n, [act](opmath_t gv, opmath_t xv) { return act.backward(gv, xv); },
            stream);
}

template <typename scalar_t, typename Act>
void forward_loop(at::TensorIteratorBase& iter, Act act) {
  using opmath_t = at::opmath_type<scalar_t>;
  const bool stream = cpu::streaming_pays_off(2 * iter.numel() * int64_t(sizeof(scalar_t)));
  iter.for_each([act, stream](char** data, const int64_t* strides, int64_t n) {
    if (is_contiguous_run<scalar_t>(strides, 2)) {
      forward_run(reinterpret_cast<const scalar_t*>(data[1]), reinterpret_cast<scalar_t*>(data[0]),
                  n, act, stream);
      return;
    }
    for (int64_t i = 0; i < n; ++i) {
      const auto x = *reinterpret_cast<const scalar_t*>(data[1] + i * strides[1]);
      *reinterpret_cast<scalar_t*>(data[0] + i * strides[0]) =
          static_cast<scalar_t>(act.forward(static_cast<opmath_t>(x)));
    }
  });
}

template <typename scalar_t, typename Act>
void backward_loop(at::TensorIteratorBase& iter, Act act) {
  using opmath_t = at::opmath_type<scalar_t>;
  const bool stream = cpu::streaming_pays_off(3 * iter.numel() * int64_t(sizeof(scalar_t)));
  iter.for_each([act, stream](char** data, const int64_t* strides, int64_t n) {
    if (is_contiguous_run<scalar_t>(strides, 3)) {
      backward_run(reinterpret_cast<const scalar_t*>(data[1]),
                   reinterpret_cast<const scalar_t*>(data[2]), reinterpret_cast<scalar_t*>(data[0]),
                   n, act, stream);
      return;
    }
    for (int64_t i = 0; i < n; ++i) {
      const auto g = *reinterpret_cast<const scalar_t*>(data[1] + i * strides[1]);
      const auto x = *reinterpret_cast<const scalar_t*>(data[2] + i * strides[2]);
      *reinterpret_cast<scalar_t*>(data[0] + i * strides[0]) = static_cast<scalar_t>(
          act.backward(static_cast<opmath_t>(g), static_cast<opmath_t>(x)));
    }
  });
}

// Writes act(x) into `out` (which may be x itself).
template <typename Act>
void apply_forward(const at::Tensor& out, const at::Tensor& x) {
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(x).build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnnkernels_activation",
                                  [&] { forward_loop<scalar_t>(iter, Act{}); });
}

// The kernels below are registered directly for each functor; Act::name names the op in errors.
template <typename Act>
at::Tensor forward_cpu(const at::Tensor& x) {
  check_activation_input(x, Act::name);
  at::Tensor y = at::empty_like(x);
  apply_forward<Act>(y, x);
  return y;
}

template <typename Act>
void forward_inplace_cpu(const at::Tensor& x) {
  check_activation_inplace(x, (std::string(Act::name) + "_").c_str());
  apply_forward<Act>(x, x);
}

template <typename Act>
at::Tensor backward_cpu(const at::Tensor& grad_output, const at::Tensor& x) {
  check_activation_backward(grad_output, x, (std::string(Act::name) + "_backward").c_str());
  at::Tensor grad_input = at::empty_like(x);
  auto iter = at::TensorIteratorConfig()
                  .add_output(grad_input)
                  .add_const_input(grad_output)
                  .add_const_input(x)
                  .build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnnkernels_activation",
                                  [&] { backward_loop<scalar_t>(iter, Act{}); });
  return grad_input;
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  using namespace cnnkernels;
  m.impl("hardswish", &forward_cpu<HardSwish>);
  m.impl("hardswish_", &forward_inplace_cpu<HardSwish>);
  m.impl("hardswish_backward", &backward_cpu<HardSwish>);
  m.impl("hardsigmoid", &forward_cpu<HardSigmoid>);
  m.impl("hardsigmoid_", &forward_inplace_cpu<HardSigmoid>);
  m.impl("hardsigmoid_backward", &backward_cpu<HardSigmoid>);
}
