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
#include "cnnkernels/cpu/rows.h"

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

// Dense float/double tensors whose runs are short: NCHW with small planes, where TensorIterator hands
// out one plane per inner loop and a call of the vectorised map costs about as much as the
// arithmetic of a 14x14 plane (measured on the dev CPU: 32x384x14x14 at 67% of copy bandwidth),
// and channels_last, where each inner loop is one pixel's C channels. Here each task walks many
// rows (planes, or pixels) in one loop nest compiled for the best instruction set, and streams its
// stores when the tensors outgrow the cache (cpu/map.h).
constexpr int64_t kSmallPlane = 1024;

// Row strides of x, the output and the residual (channels_last pixel rows): `row_len` each when
// dense; more for channel slices of wider channels_last tensors, walked one row at a time.
struct RowStrides {
  int64_t x, y, residual;
};

template <typename scalar_t, bool kResidual, bool kChannelsLast, typename Act>
void affine_act_rows(const scalar_t* x, const scalar_t* res, scalar_t* y, const scalar_t* scale,
                     const scalar_t* shift, int64_t rows, int64_t row_len, int64_t channels,
                     const Act& act, bool stream, RowStrides strides) {
  const bool dense = strides.x == row_len && strides.y == row_len &&
                     (!kResidual || strides.residual == row_len);
  if (!dense) {  // channel slices: no streaming (the rows' lines are shared with other channels)
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / row_len), [&](int64_t r0, int64_t r1) {
      cpu::run_with_best_isa([&] {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xr = x + r * strides.x;
          const scalar_t* rr = kResidual ? res + r * strides.residual : nullptr;
          scalar_t* yr = y + r * strides.y;
          for (int64_t c = 0; c < row_len; ++c) {
            scalar_t pre = std::fma(xr[c], scale[c], shift[c]);
            if constexpr (kResidual) pre += rr[c];
            yr[c] = act.forward(pre);
          }
        }
      });
    });
    return;
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / row_len), [&](int64_t begin, int64_t end) {
    // Elements [from, from + count) of the output, written to dst; a run may span rows.
    auto run = [&](int64_t from, scalar_t* dst, int64_t count) CNNKERNELS_ALWAYS_INLINE_LAMBDA {
      while (count > 0) {
        const int64_t row = from / row_len, offset = from - row * row_len;
        const int64_t m = std::min(count, row_len - offset);
        const scalar_t* xp = x + from;
        const scalar_t* rp = kResidual ? res + from : nullptr;
        // NCHW: one channel per row (its plane); channels_last: a row is the channels
        const scalar_t* a = kChannelsLast ? scale + offset : scale + row % channels;
        const scalar_t* b = kChannelsLast ? shift + offset : shift + row % channels;
        for (int64_t i = 0; i < m; ++i) {
          scalar_t pre = std::fma(xp[i], a[kChannelsLast ? i : 0], b[kChannelsLast ? i : 0]);
          if constexpr (kResidual) pre += rp[i];
          dst[i] = act.forward(pre);  // dst may be xp (in place): each element is read first
        }
        from += m;
        dst += m;
        count -= m;
      }
    };
    const int64_t first = begin * row_len, n = (end - begin) * row_len;
    cpu::run_with_best_isa([&] {
      if (stream && cpu::has_avx2()) {
        cpu::streamed<true>(y + first, n, [&](int64_t offset, scalar_t* dst, int64_t count)
                                              CNNKERNELS_ALWAYS_INLINE_LAMBDA {
          run(first + offset, dst, count);
        });
      } else {
        run(first, y + first, n);
      }
    });
  });
}

enum class DenseRows { kNone, kPlanes, kPixels };

// Which loop of affine_act_rows fits: x, out (and residual) dense in one memory format, or all
// pixel rows of channels (channels_last, or channel slices of channels_last tensors).
DenseRows dense_rows(const at::Tensor& out, const at::Tensor& x, const at::Tensor* residual) {
  const bool type_ok = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  if (!type_ok || x.dim() != 4 || x.numel() == 0) return DenseRows::kNone;
  auto all_contiguous = [&](at::MemoryFormat format) {
    return x.is_contiguous(format) && out.is_contiguous(format) &&
           (residual == nullptr || residual->is_contiguous(format));
  };
  if (x.size(2) * x.size(3) <= kSmallPlane && all_contiguous(at::MemoryFormat::Contiguous)) {
    return DenseRows::kPlanes;
  }
  using cpu::pixel_row_stride;
  if (x.size(1) > 1 && pixel_row_stride(x) > 0 && pixel_row_stride(out) > 0 &&
      (residual == nullptr || pixel_row_stride(*residual) > 0)) {
    return DenseRows::kPixels;
  }
  return DenseRows::kNone;
}

template <bool kChannelsLast, typename scalar_t, typename Act>
void affine_act_dense(const at::Tensor& out, const at::Tensor& x, const at::Tensor& scale,
                      const at::Tensor& shift, const at::Tensor* residual, const Act& act,
                      bool stream) {
  const int64_t channels = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t rows = kChannelsLast ? x.size(0) * hw : x.size(0) * channels;
  const int64_t row_len = kChannelsLast ? channels : hw;
  const scalar_t* s = scale.const_data_ptr<scalar_t>();
  const scalar_t* t = shift.const_data_ptr<scalar_t>();
  RowStrides strides{row_len, row_len, row_len};
  if constexpr (kChannelsLast) {
    strides = {cpu::pixel_row_stride(x), cpu::pixel_row_stride(out),
               residual != nullptr ? cpu::pixel_row_stride(*residual) : row_len};
  }
  if (residual != nullptr) {
    affine_act_rows<scalar_t, true, kChannelsLast>(
        x.const_data_ptr<scalar_t>(), residual->const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), s, t, rows, row_len, channels, act, stream, strides);
  } else {
    affine_act_rows<scalar_t, false, kChannelsLast>(
        x.const_data_ptr<scalar_t>(), nullptr, out.mutable_data_ptr<scalar_t>(), s, t, rows,
        row_len, channels, act, stream, strides);
  }
}

void affine_act_into(const at::Tensor& out, const at::Tensor& x, const at::Tensor& scale,
                     const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                     int64_t activation, double negative_slope) {
  const bool with_residual = residual.has_value() && residual->defined();
  const int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
  const bool in_place = out.is_same(x) || (with_residual && out.is_same(*residual));
  const bool stream = !in_place && cpu::streaming_pays_off((with_residual ? 3 : 2) * bytes);
  const at::Tensor* res = with_residual ? &*residual : nullptr;
  const DenseRows rows = dense_rows(out, x, res);
  if (rows != DenseRows::kNone) {
    const at::Tensor s = scale.contiguous(), t = shift.contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cnnkernels_affine_act", [&] {
      dispatch_activation(activation, negative_slope, [&](auto act) {
        if (rows == DenseRows::kPixels) {
          affine_act_dense<true, scalar_t>(out, x, s, t, res, act, stream);
        } else {
          affine_act_dense<false, scalar_t>(out, x, s, t, res, act, stream);
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
