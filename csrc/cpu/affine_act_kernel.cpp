// CPU kernel of affine_act: y = act(x * scale[c] + shift[c] (+ residual)).
//
// One TensorIterator over (y, x, scale, shift[, residual]) with scale and shift broadcast along
// every dim but the channel one, so any layout works without copies. Its inner loops are contiguous
// runs: in NCHW a run lies inside one channel plane (scale and shift constant: a vectorised map), in
// channels_last a run walks the channels (scale and shift contiguous too). The arithmetic is one
// fused multiply-add, fma(x, scale, shift), rounded once: what ATen's CPU BatchNorm computes for
// `x * alpha + beta` (its vectorised code is compiled with FMA contraction), so given ATen's alpha
// and beta our output equals its BatchNorm output bit for bit. The residual is added to that
// rounded value, as `bn(x) + identity` rounds twice in PyTorch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "../affine_act.h"
#include "cnnkernels/activation.h"
#include "cnnkernels/cpu/map.h"

namespace cnnkernels {
namespace {

template <typename scalar_t, bool kResidual, typename Act>
void affine_act_loop(at::TensorIteratorBase& iter, const Act& act, bool stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t kS = sizeof(scalar_t), kP = sizeof(opmath_t);
  iter.for_each([&](char** data, const int64_t* strides, int64_t n) {
    auto* y = reinterpret_cast<scalar_t*>(data[0]);
    const auto* x = reinterpret_cast<const scalar_t*>(data[1]);
    const auto* scale = reinterpret_cast<const opmath_t*>(data[2]);
    const auto* shift = reinterpret_cast<const opmath_t*>(data[3]);
    const auto* res = kResidual ? reinterpret_cast<const scalar_t*>(data[4]) : nullptr;
    const bool dense = strides[0] == kS && strides[1] == kS && (!kResidual || strides[4] == kS);
    if (dense && strides[2] == 0 && strides[3] == 0) {  // NCHW: one channel
      const opmath_t a = *scale, b = *shift;
      if constexpr (kResidual) {
        cpu::map2(x, res, y, n, [a, b, act](opmath_t v, opmath_t r) {
          return act.forward(std::fma(v, a, b) + r);
        }, stream);
      } else {
        cpu::map1(x, y, n, [a, b, act](opmath_t v) { return act.forward(std::fma(v, a, b)); },
                  stream);
      }
    } else if (dense && strides[2] == kP && strides[3] == kP) {  // channels_last: across channels
      cpu::run_with_best_isa([&] {
        for (int64_t i = 0; i < n; ++i) {
          opmath_t pre = std::fma(static_cast<opmath_t>(x[i]), scale[i], shift[i]);
          if constexpr (kResidual) pre += static_cast<opmath_t>(res[i]);
          y[i] = static_cast<scalar_t>(act.forward(pre));
        }
      });
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const auto v = static_cast<opmath_t>(*reinterpret_cast<const scalar_t*>(data[1] + i * strides[1]));
        const auto a = *reinterpret_cast<const opmath_t*>(data[2] + i * strides[2]);
        const auto b = *reinterpret_cast<const opmath_t*>(data[3] + i * strides[3]);
        opmath_t pre = std::fma(v, a, b);
        if constexpr (kResidual) {
          pre += static_cast<opmath_t>(*reinterpret_cast<const scalar_t*>(data[4] + i * strides[4]));
        }
        *reinterpret_cast<scalar_t*>(data[0] + i * strides[0]) = static_cast<scalar_t>(act.forward(pre));
      }
    }
  });
}

// NCHW float/double with small planes: TensorIterator hands out one plane per inner loop, and a
// call of the vectorised map costs about as much as the arithmetic of a 14x14 plane (measured on the
// dev CPU: 32x384x14x14 at 67% of copy bandwidth). Here each task walks many planes in one loop
// nest compiled for the best instruction set.
constexpr int64_t kSmallPlane = 1024;

template <typename scalar_t, bool kResidual, typename Act>
void affine_act_planes(const scalar_t* x, const scalar_t* res, scalar_t* y, const scalar_t* scale,
                       const scalar_t* shift, int64_t planes, int64_t channels, int64_t hw,
                       const Act& act) {
  at::parallel_for(0, planes, std::max<int64_t>(1, 32768 / hw), [&](int64_t begin, int64_t end) {
    cpu::run_with_best_isa([&] {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t a = scale[p % channels], b = shift[p % channels];
        const scalar_t* xp = x + p * hw;
        scalar_t* yp = y + p * hw;  // may be xp (in place): the loop reads each element first
        for (int64_t i = 0; i < hw; ++i) {
          scalar_t pre = std::fma(xp[i], a, b);
          if constexpr (kResidual) pre += res[p * hw + i];
          yp[i] = act.forward(pre);
        }
      }
    });
  });
}

bool small_dense_planes(const at::Tensor& out, const at::Tensor& x, const at::Tensor* residual) {
  const bool type_ok = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  return type_ok && x.dim() == 4 && x.numel() > 0 && x.size(2) * x.size(3) <= kSmallPlane &&
         x.is_contiguous() && out.is_contiguous() && (residual == nullptr || residual->is_contiguous());
}

void affine_act_into(const at::Tensor& out, const at::Tensor& x, const at::Tensor& scale,
                     const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                     int64_t activation, double negative_slope) {
  const bool with_residual = residual.has_value() && residual->defined();
  if (small_dense_planes(out, x, with_residual ? &*residual : nullptr)) {
    const at::Tensor s = scale.contiguous(), t = shift.contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cnnkernels_affine_act", [&] {
      dispatch_activation(activation, negative_slope, [&](auto act) {
        const int64_t planes = x.size(0) * x.size(1), hw = x.size(2) * x.size(3);
        if (with_residual) {
          affine_act_planes<scalar_t, true>(x.const_data_ptr<scalar_t>(),
                                            residual->const_data_ptr<scalar_t>(),
                                            out.mutable_data_ptr<scalar_t>(),
                                            s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                            planes, x.size(1), hw, act);
        } else {
          affine_act_planes<scalar_t, false>(x.const_data_ptr<scalar_t>(), nullptr,
                                             out.mutable_data_ptr<scalar_t>(),
                                             s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                             planes, x.size(1), hw, act);
        }
      });
    });
    return;
  }
  const at::Tensor scale_b = channel_view(scale, x), shift_b = channel_view(shift, x);
  auto config = at::TensorIteratorConfig();
  config.check_all_same_dtype(false).add_output(out).add_const_input(x).add_const_input(scale_b)
      .add_const_input(shift_b);
  if (with_residual) config.add_const_input(*residual);
  auto iter = config.build();
  const int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
  const bool in_place = out.is_same(x) || (with_residual && out.is_same(*residual));
  const bool stream = !in_place && cpu::streaming_pays_off((with_residual ? 3 : 2) * bytes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnnkernels_affine_act",
                                  [&] {
                                    dispatch_activation(activation, negative_slope, [&](auto act) {
                                      if (with_residual) {
                                        affine_act_loop<scalar_t, true>(iter, act, stream);
                                      } else {
                                        affine_act_loop<scalar_t, false>(iter, act, stream);
                                      }
                                    });
                                  });
}

at::Tensor affine_act_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                          int64_t activation, double negative_slope,
                          const std::optional<at::Tensor>& residual) {
  check_affine_act(x, scale, shift, residual, at::Tensor(), "affine_act");
  activation_from_int(activation);
  at::Tensor out = at::empty_like(x);
  affine_act_into(out, x, scale, shift, residual, activation, negative_slope);
  return out;
}

void affine_act_out_cpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& scale,
                        const at::Tensor& shift, int64_t activation, double negative_slope,
                        const std::optional<at::Tensor>& residual) {
  check_affine_act(x, scale, shift, residual, out, "affine_act_out");
  activation_from_int(activation);
  affine_act_into(out, x, scale, shift, residual, activation, negative_slope);
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("affine_act", &cnnkernels::affine_act_cpu);
  m.impl("affine_act_out", &cnnkernels::affine_act_out_cpu);
}
