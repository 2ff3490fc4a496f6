// CPU kernels of batch_norm_act's statistics and backward passes (schemas and the math:
// ../batch_norm_act.cpp).
//
// Layouts. NCHW: a channel's data is N planes of H·W contiguous values; the reductions split the
// channels over threads, the elementwise pass splits the planes. channels_last (and 2-D [N, C]):
// rows of C values; the reductions give each thread a range of rows with its own per-channel
// partials, summed at the end, and the elementwise pass splits the rows. The backward passes also
// read an x whose rows lie further apart than C (a channel slice of a wider channels_last tensor:
// a DenseNet block's concatenation) in place.
//
// Accuracy. Values are summed in the compute type over chunks of at most 256 (vector lanes of a
// plane's chunk in NCHW, 16 rows per channel in channels_last) and the chunk sums are added in
// double, so a channel of millions of values loses about what one chunk loses. The statistics sum
// (x − K) and (x − K)² with K a value of the channel (its first), one pass that keeps the variance
// accurate when |mean| ≫ std (no cancellation of E[x²] − E[x]²).
//
// Every task runs compiled for the best ISA of the CPU (cpu::run_with_best_isa_flag); half and
// bfloat16 are converted to float in L1-sized chunks so the arithmetic loops vectorise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../affine_act.h"
#include "../batch_norm_act.h"
#include "cnnkernels/activation.h"
#include "cnnkernels/cpu/map.h"
#include "cnnkernels/cpu/rows.h"

namespace cnnkernels {
namespace {

using cpu::kChunk;
constexpr int64_t kRowBlock = 16;   // channels_last rows summed in float before going to double
constexpr int64_t kGrainElements = 32768;  // less work than this per task is not worth a thread

template <typename T>
using opmath = at::opmath_type<T>;

// A per-channel value as a kernel sees it: the same value for every element of an NCHW plane...
template <typename F>
struct Uniform {
  F value;
  CNNKERNELS_ALWAYS_INLINE F operator[](int64_t) const { return value; }
};
// ...or the array indexed by channel for channels_last rows (a plain `const F*`).

// A run of a tensor in the compute type: the tensor's own memory when it already is, else a
// converted copy in L1.
template <bool kAvx2, typename T>
struct ChunkReader {
  using F = opmath<T>;
  alignas(64) F buffer[cpu::is_reduced_float<T> ? kChunk : 1];
  CNNKERNELS_ALWAYS_INLINE const F* read(const T* p, int64_t count) {
    if constexpr (cpu::is_reduced_float<T>) {
      cpu::load_floats<kAvx2>(p, buffer, count);
      return buffer;
    } else {
      return p;
    }
  }
};

// The tensors a pass reads, in the kernel's layout. grad and residual are null when absent.
template <typename T>
struct Inputs {
  const T* x;
  const T* grad;
  const T* residual;
};

// The reductions compute a pair (a, b) per element and sum both per channel.

// Statistics: (x − K, (x − K)²).
template <typename P>
struct MomentsOp {
  P anchor;
  template <typename F>
  CNNKERNELS_ALWAYS_INLINE void operator()(F x, F, F, int64_t c, F& a, F& b) const {
    const F d = x - anchor[c];
    a = d;
    b = d * d;
  }
};

// The activation's input as the forward computed it (affine_act): fma(x, scale, shift) + residual.
template <bool kResidual, typename F, typename P>
CNNKERNELS_ALWAYS_INLINE F pre_activation(F x, F r, const P& scale, const P& shift, int64_t c) {
  F pre = std::fma(x, scale[c], shift[c]);
  if constexpr (kResidual) pre += r;
  return pre;
}

// Backward reductions: (dz, dz·(x − mean)) with dz = act'(pre)·grad.
template <bool kResidual, typename P, typename Act>
struct GradSumsOp {
  P scale, shift, mean;
  Act act;
  template <typename F>
  CNNKERNELS_ALWAYS_INLINE void operator()(F x, F g, F r, int64_t c, F& a, F& b) const {
    const F dz = act.backward(g, pre_activation<kResidual>(x, r, scale, shift, c));
    a = dz;
    b = dz * (x - mean[c]);
  }
};

// Σa, Σb of one channel over its `batch` planes of `plane` values, `plane_stride` apart. Each chunk
// is summed in float by an OpenMP SIMD reduction (partial sums in vector lanes: what lets the
// compiler reassociate, and vectorise, the sum), then added into double.
template <bool kAvx2, bool kGrad, bool kResidual, typename T, typename Op>
CNNKERNELS_ALWAYS_INLINE void sum_channel_planes(Inputs<T> in, int64_t batch, int64_t plane_stride,
                                                 int64_t plane, const Op& op, double& sum_a,
                                                 double& sum_b) {
  using F = opmath<T>;
  ChunkReader<kAvx2, T> rx, rg, rr;
  double total_a = 0, total_b = 0;
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t s = 0; s < plane; s += kChunk) {
      const int64_t m = std::min(kChunk, plane - s), at = n * plane_stride + s;
      const F* x = rx.read(in.x + at, m);
      const F* g = x;
      const F* r = x;
      if constexpr (kGrad) g = rg.read(in.grad + at, m);
      if constexpr (kResidual) r = rr.read(in.residual + at, m);
      F a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = 0; i < m; ++i) {
        F da, db;
        op(x[i], g[i], r[i], 0, da, db);
        a += da;
        b += db;
      }
      total_a += a;
      total_b += b;
    }
  }
  sum_a = total_a;
  sum_b = total_b;
}

// Adds Σa, Σb over rows [row0, row1) of C channels into sum_a[c], sum_b[c] (x's rows x_stride values
// apart, grad's and residual's C). Each block of 16 rows
// is walked row after row, in memory order, with float partial sums for up to kLocalChannels
// channels in local arrays. (Walking a block chunk of channels by chunk instead revisits each row
// C / kChunk times at a stride of C values: 8x512x28x28 ran at 13 GB/s against NCHW's 52 on the
// dev CPU.)
constexpr int64_t kLocalChannels = 2048;

// dst[j] += values[j] for j < count, in the compute type (values: a local buffer, so that the
// stores cannot alias what the loop reads and it vectorises).
template <bool kAvx2, typename T>
CNNKERNELS_ALWAYS_INLINE void add_to_row(T* dst, const opmath<T>* values, int64_t count) {
  if constexpr (cpu::is_reduced_float<T>) {
    alignas(64) opmath<T> sum[kChunk];
    cpu::load_floats<kAvx2>(dst, sum, count);
    for (int64_t j = 0; j < count; ++j) sum[j] += values[j];
    cpu::store_floats<kAvx2>(sum, dst, count);
  } else {
    for (int64_t j = 0; j < count; ++j) dst[j] += values[j];
  }
}

// Adding: with `add`, the pass also does add.out[row][c] += add.k_dz[c]·a (a = dz), rows of out
// add.stride values apart (batch_norm_act_backward_reduce_add_).
template <typename T>
struct RowAdd {
  T* out;
  int64_t stride;
  const opmath<T>* k_dz;
};

template <bool kAvx2, bool kGrad, bool kResidual, typename T, typename Op, bool kAdd = false>
CNNKERNELS_ALWAYS_INLINE void sum_rows(Inputs<T> in, int64_t row0, int64_t row1, int64_t channels,
                                       int64_t x_stride, const Op& op, double* sum_a,
                                       double* sum_b, RowAdd<T> add = {}) {
  using F = opmath<T>;
  ChunkReader<kAvx2, T> rx, rg, rr;
  alignas(64) F a[kLocalChannels];
  alignas(64) F b[kLocalChannels];
  alignas(64) F added[kAdd ? kChunk : 1];
  for (int64_t cb = 0; cb < channels; cb += kLocalChannels) {
    const int64_t width = std::min(kLocalChannels, channels - cb);
    for (int64_t rb = row0; rb < row1; rb += kRowBlock) {
      const int64_t re = std::min(row1, rb + kRowBlock);
      for (int64_t j = 0; j < width; ++j) a[j] = b[j] = F(0);
      for (int64_t row = rb; row < re; ++row) {
        for (int64_t c0 = cb; c0 < cb + width; c0 += kChunk) {
          const int64_t m = std::min(kChunk, cb + width - c0), at = row * channels + c0;
          const F* x = rx.read(in.x + row * x_stride + c0, m);
          const F* g = x;
          const F* r = x;
          if constexpr (kGrad) g = rg.read(in.grad + at, m);
          if constexpr (kResidual) r = rr.read(in.residual + at, m);
          F* pa = a + (c0 - cb);
          F* pb = b + (c0 - cb);
          for (int64_t j = 0; j < m; ++j) {
            F da, db;
            op(x[j], g[j], r[j], c0 + j, da, db);
            pa[j] += da;
            pb[j] += db;
            if constexpr (kAdd) added[j] = add.k_dz[c0 + j] * da;
          }
          if constexpr (kAdd) add_to_row<kAvx2>(add.out + row * add.stride + c0, added, m);
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        sum_a[cb + j] += a[j];
        sum_b[cb + j] += b[j];
      }
    }
  }
}

// The shape the kernels walk: channel planes (NCHW, any number of trailing dims) or rows.
struct Walk {
  bool rows;
  int64_t batch, channels, plane;  // plane: values per (n, c) (rows: pixels per image)
  int64_t x_stride;  // rows: values between x's rows (C, or more for a channel slice read in place)
  int64_t count() const { return batch * plane; }  // values per channel
  int64_t rows_total() const { return batch * plane; }
};

// `x_row_stride`: BackwardInputs::x_row_stride (0: x is dense).
Walk walk_of(const at::Tensor& x, int64_t x_row_stride = 0) {
  const int64_t channels = x.size(1), batch = x.size(0);
  const int64_t plane = batch * channels == 0 ? 0 : x.numel() / (batch * channels);
  const bool strided = x_row_stride > channels;
  const bool rows = strided || x.dim() == 2 ||
                    kernel_memory_format(x) == at::MemoryFormat::ChannelsLast;
  return {rows, batch, channels, plane, strided ? x_row_stride : channels};
}

int64_t grain_in_units(int64_t elements_per_unit) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_unit));
}

// NCHW with small planes (14x14, 7x7): walking a channel means N runs of a few hundred values, a
// plane of C·H·W apart: too short for the prefetchers, a new page each (measured on the dev CPU:
// the training step of 32x384x14x14 at 52% of copy bandwidth, 87-106% on 56x56 planes). So the
// images are split over threads instead, each thread walking its images' memory in order with
// per-channel partial sums, added in a fixed order at the end.
constexpr int64_t kSmallPlane = 1024;

template <bool kGrad, bool kResidual, typename T, typename MakeOp>
void sum_small_planes(Inputs<T> in, const Walk& w, const MakeOp& make_op,
                      std::vector<double>& sum_a, std::vector<double>& sum_b) {
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), w.batch,
                            w.batch * w.channels * w.plane / kGrainElements}));
  std::vector<double> part_a(parts * w.channels, 0.0), part_b(parts * w.channels, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    cpu::run_with_best_isa_flag([&](auto avx2) {
      constexpr bool kAvx2 = decltype(avx2)::value;
      for (int64_t p = p0; p < p1; ++p) {
        for (int64_t n = w.batch * p / parts; n < w.batch * (p + 1) / parts; ++n) {
          for (int64_t c = 0; c < w.channels; ++c) {
            const int64_t offset = (n * w.channels + c) * w.plane;
            Inputs<T> plane{in.x + offset, kGrad ? in.grad + offset : nullptr,
                            kResidual ? in.residual + offset : nullptr};
            double a = 0, b = 0;
            sum_channel_planes<kAvx2, kGrad, kResidual>(plane, 1, 0, w.plane, make_op(c), a, b);
            part_a[p * w.channels + c] += a;
            part_b[p * w.channels + c] += b;
          }
        }
      }
    });
  });
  for (int64_t p = 0; p < parts; ++p) {
    for (int64_t c = 0; c < w.channels; ++c) {
      sum_a[c] += part_a[p * w.channels + c];
      sum_b[c] += part_b[p * w.channels + c];
    }
  }
}

// Rows split into one range per thread, each summed by body(avx2 flag, row0, row1, a, b) into its
// own per-channel partials, which are then added in a fixed order into sum_a, sum_b.
template <typename Body>
void sum_row_parts(const Walk& w, std::vector<double>& sum_a, std::vector<double>& sum_b,
                   const Body& body) {
  const int64_t rows = w.rows_total();
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), rows * w.channels / kGrainElements));
  std::vector<double> part_a(parts * w.channels, 0.0), part_b(parts * w.channels, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    cpu::run_with_best_isa_flag([&](auto avx2) {
      for (int64_t p = p0; p < p1; ++p) {
        body(avx2, rows * p / parts, rows * (p + 1) / parts, part_a.data() + p * w.channels,
             part_b.data() + p * w.channels);
      }
    });
  });
  for (int64_t p = 0; p < parts; ++p) {
    for (int64_t c = 0; c < w.channels; ++c) {
      sum_a[c] += part_a[p * w.channels + c];
      sum_b[c] += part_b[p * w.channels + c];
    }
  }
}

// Per-channel Σa, Σb for every channel: planes split over threads by channel, rows by row range.
template <bool kGrad, bool kResidual, typename T, typename MakeOp>
void sum_per_channel(Inputs<T> in, const Walk& w, const MakeOp& make_op, std::vector<double>& sum_a,
                     std::vector<double>& sum_b) {
  sum_a.assign(w.channels, 0.0);
  sum_b.assign(w.channels, 0.0);
  if (!w.rows && w.plane <= kSmallPlane && w.batch > 1) {
    sum_small_planes<kGrad, kResidual>(in, w, make_op, sum_a, sum_b);
    return;
  }
  if (!w.rows) {
    at::parallel_for(0, w.channels, grain_in_units(w.count()), [&](int64_t c0, int64_t c1) {
      cpu::run_with_best_isa_flag([&](auto avx2) {
        constexpr bool kAvx2 = decltype(avx2)::value;
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t offset = c * w.plane;
          Inputs<T> channel{in.x + offset, kGrad ? in.grad + offset : nullptr,
                            kResidual ? in.residual + offset : nullptr};
          sum_channel_planes<kAvx2, kGrad, kResidual>(channel, w.batch, w.channels * w.plane,
                                                      w.plane, make_op(c), sum_a[c], sum_b[c]);
        }
      });
    });
    return;
  }
  sum_row_parts(w, sum_a, sum_b, [&](auto avx2, int64_t row0, int64_t row1, double* a, double* b) {
    constexpr bool kAvx2 = decltype(avx2)::value;
    sum_rows<kAvx2, kGrad, kResidual>(in, row0, row1, w.channels, w.x_stride, make_op(-1), a, b);
  });
}

// --- statistics --------------------------------------------------------------------------------

template <typename T>
void moments(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var) {
  using F = opmath<T>;
  const Walk w = walk_of(x);
  const T* xp = x.const_data_ptr<T>();
  F* mean_p = mean.mutable_data_ptr<F>();
  F* var_p = var.mutable_data_ptr<F>();
  if (w.count() == 0) {  // no values: undefined statistics, as ATen's (NaN)
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  // K: the channel's first value (first row in channels_last, first plane's first value in NCHW),
  // 0 where that is not finite: an infinite K would make x − K NaN, and the mean NaN where
  // torch's is ±inf
  std::vector<F> anchor(w.channels);
  for (int64_t c = 0; c < w.channels; ++c) {
    const F first = static_cast<F>(xp[w.rows ? c : c * w.plane]);
    anchor[c] = std::isfinite(first) ? first : F(0);
  }
  std::vector<double> s1, s2;
  const Inputs<T> in{xp, nullptr, nullptr};
  if (w.rows) {
    sum_per_channel<false, false>(in, w, [&](int64_t) { return MomentsOp<const F*>{anchor.data()}; },
                                  s1, s2);
  } else {
    sum_per_channel<false, false>(in, w, [&](int64_t c) { return MomentsOp<Uniform<F>>{{anchor[c]}}; },
                                  s1, s2);
  }
  const double count = static_cast<double>(w.count());
  for (int64_t c = 0; c < w.channels; ++c) {
    const double shifted_mean = s1[c] / count;
    mean_p[c] = static_cast<F>(anchor[c] + shifted_mean);
    // max(v, 0), not max(0, v): std::max returns its first argument for NaN, which must propagate
    var_p[c] = static_cast<F>(std::max(s2[c] / count - shifted_mean * shifted_mean, 0.0));
  }
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_stats_cpu(const at::Tensor& x_in) {
  check_batch_norm_act_args(x_in, nullptr, std::nullopt, {}, "batch_norm_act_stats");
  const at::Tensor x = x_in.contiguous(kernel_memory_format(x_in));
  const auto options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor mean = at::empty({x.size(1)}, options), var = at::empty({x.size(1)}, options);
  if (x.size(1) == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "cnnkernels_batch_norm_act_stats",
                                  [&] { moments<scalar_t>(x, mean, var); });
  return {mean, var};
}

// --- backward: reductions ------------------------------------------------------------------------

struct ChannelTensors {  // per-channel arguments, in the compute type
  at::Tensor scale, shift, mean, k_dz, k_xmu, k_1;
};

template <typename T, bool kResidual>
void grad_sums(Inputs<T> in, const Walk& w, const ChannelTensors& p, int64_t activation,
               double negative_slope, const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu) {
  using F = opmath<T>;
  const F* scale = p.scale.const_data_ptr<F>();
  const F* shift = p.shift.const_data_ptr<F>();
  const F* mean = p.mean.const_data_ptr<F>();
  std::vector<double> a, b;
  dispatch_activation(activation, negative_slope, [&](auto act) {
    using Act = decltype(act);
    if (w.rows) {
      sum_per_channel<true, kResidual>(in, w, [&](int64_t) {
        return GradSumsOp<kResidual, const F*, Act>{scale, shift, mean, act};
      }, a, b);
    } else {
      sum_per_channel<true, kResidual>(in, w, [&](int64_t c) {
        return GradSumsOp<kResidual, Uniform<F>, Act>{{scale[c]}, {shift[c]}, {mean[c]}, act};
      }, a, b);
    }
  });
  F* out_a = sum_dz.mutable_data_ptr<F>();
  F* out_b = sum_dz_xmu.mutable_data_ptr<F>();
  for (int64_t c = 0; c < w.channels; ++c) {
    out_a[c] = static_cast<F>(a[c]);
    out_b[c] = static_cast<F>(b[c]);
  }
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_backward_reduce_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& mean, const std::optional<at::Tensor>& residual_in,
    int64_t activation, double negative_slope) {
  const BackwardInputs in_ = backward_inputs(
      grad_in, x_in, residual_in, {{&scale, "scale"}, {&shift, "shift"}, {&mean, "mean"}},
      activation, "batch_norm_act_backward_reduce", /*strided_rows=*/true);
  const at::Tensor &x = in_.x, &grad = in_.grad;
  const auto& residual = in_.residual;
  at::Tensor sum_dz = at::zeros_like(scale), sum_dz_xmu = at::zeros_like(scale);
  const Walk w = walk_of(x, in_.x_row_stride);
  if (w.count() == 0 || w.channels == 0) return {sum_dz, sum_dz_xmu};
  const ChannelTensors p{scale.contiguous(), shift.contiguous(), mean.contiguous(), {}, {}, {}};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cnnkernels_batch_norm_act_backward_reduce", [&] {
        const Inputs<scalar_t> in{x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                                  residual ? residual->const_data_ptr<scalar_t>() : nullptr};
        if (residual) {
          grad_sums<scalar_t, true>(in, w, p, activation, negative_slope, sum_dz, sum_dz_xmu);
        } else {
          grad_sums<scalar_t, false>(in, w, p, activation, negative_slope, sum_dz, sum_dz_xmu);
        }
      });
  return {sum_dz, sum_dz_xmu};
}

// The checks of the ops that add into `out` in place (channels_last rows, or channel slices).
void check_adds_into_rows(const at::Tensor& out, const at::Tensor& x, const at::Tensor& grad,
                          const Walk& w, const char* op) {
  check_out_rows(out, x, op);
  TORCH_CHECK(x.dim() == 4 && w.rows, op, ": expected argument 'x' to be a channels_last 4-D "
              "tensor (or a channel slice of one), got sizes ", x.sizes(), " and strides ",
              x.strides());
  TORCH_CHECK(!out.is_alias_of(x) && !out.is_alias_of(grad), op,
              ": argument 'out' must not share memory with 'x' or 'grad'");
}

// Σdz, Σdz·(x − mean) as batch_norm_act_backward_reduce computes them, and out += k_dz·dz in the
// same pass over channels_last rows (x and out possibly channel slices). dx = k_dz·dz +
// k_xmu·(x − mean) + k_1 needs the sums for its last two terms; they are per-channel multiples of
// (x − mean) and constants, which the DenseNet block applies once per channel for all the layers
// that read it (x and mean are the same in each), so per layer one pass does both.
std::tuple<at::Tensor, at::Tensor> batch_norm_act_backward_reduce_add_cpu(
    const at::Tensor& out, const at::Tensor& grad_in, const at::Tensor& x_in,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
    const at::Tensor& k_dz, int64_t activation, double negative_slope) {
  constexpr const char* op = "batch_norm_act_backward_reduce_add_";
  const BackwardInputs in_ = backward_inputs(
      grad_in, x_in, std::nullopt,
      {{&scale, "scale"}, {&shift, "shift"}, {&mean, "mean"}, {&k_dz, "coef_dz"}}, activation, op,
      /*strided_rows=*/true);
  const at::Tensor &x = in_.x, &grad = in_.grad;
  const Walk w = walk_of(x, in_.x_row_stride);
  check_adds_into_rows(out, x, grad, w, op);
  at::Tensor sum_dz = at::zeros_like(scale), sum_dz_xmu = at::zeros_like(scale);
  if (w.count() == 0 || w.channels == 0) return {sum_dz, sum_dz_xmu};
  const at::Tensor s = scale.contiguous(), t = shift.contiguous(), m = mean.contiguous(),
                   k = k_dz.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "cnnkernels_batch_norm_act_backward_reduce_add_", [&] {
    using F = opmath<scalar_t>;
    const Inputs<scalar_t> in{x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                              nullptr};
    const RowAdd<scalar_t> add{out.mutable_data_ptr<scalar_t>(), cpu::pixel_row_stride(out),
                               k.const_data_ptr<F>()};
    std::vector<double> a(w.channels, 0.0), b(w.channels, 0.0);
    dispatch_activation(activation, negative_slope, [&](auto act) {
      const GradSumsOp<false, const F*, decltype(act)> sums{
          s.const_data_ptr<F>(), t.const_data_ptr<F>(), m.const_data_ptr<F>(), act};
      sum_row_parts(w, a, b, [&](auto avx2, int64_t row0, int64_t row1, double* pa, double* pb) {
        constexpr bool kAvx2 = decltype(avx2)::value;
        sum_rows<kAvx2, true, false, scalar_t, decltype(sums), true>(
            in, row0, row1, w.channels, w.x_stride, sums, pa, pb, add);
      });
    });
    F* out_a = sum_dz.mutable_data_ptr<F>();
    F* out_b = sum_dz_xmu.mutable_data_ptr<F>();
    for (int64_t c = 0; c < w.channels; ++c) {
      out_a[c] = static_cast<F>(a[c]);
      out_b[c] = static_cast<F>(b[c]);
    }
  });
  return {sum_dz, sum_dz_xmu};
}

// --- backward: elementwise -----------------------------------------------------------------------

template <typename P>
struct ElemtParams {
  P scale, shift, mean, k_dz, k_xmu, k_1;
};

// dx = k_dz·dz + k_xmu·(x − mean) + k_1 and dresidual = dz for `count` ≤ kChunk consecutive
// values whose channel is c0 + j (rows) or fixed (planes: P = Uniform).
template <bool kAvx2, bool kResidual, typename T, typename P, typename Act>
CNNKERNELS_ALWAYS_INLINE void elemt_run(Inputs<T> in, T* dx, T* dresidual, int64_t count,
                                        const ElemtParams<P>& p, int64_t c0, const Act& act) {
  using F = opmath<T>;
  ChunkReader<kAvx2, T> rx, rg, rr;
  const F* x = rx.read(in.x, count);
  const F* g = rg.read(in.grad, count);
  const F* r = x;
  if constexpr (kResidual) r = rr.read(in.residual, count);
  auto value = [&](int64_t j, F& dz) CNNKERNELS_ALWAYS_INLINE_LAMBDA {
    const int64_t c = c0 + j;
    dz = act.backward(g[j], pre_activation<kResidual>(x[j], r[j], p.scale, p.shift, c));
    return p.k_dz[c] * dz + p.k_xmu[c] * (x[j] - p.mean[c]) + p.k_1[c];
  };
  // Rows read their per-channel parameters through pointers of the output's type: written
  // straight to dx and dresidual, every store might change them, so the compiler reloads them and
  // does not vectorise (channels_last with a residual ran 10-15x slower than NCHW on the dev CPU).
  // Computing into local buffers first rules that out; half and bfloat16 need them anyway.
  if constexpr (cpu::is_reduced_float<T> || std::is_pointer_v<P>) {
    alignas(64) F out[kChunk];
    alignas(64) F out_r[kResidual ? kChunk : 1];
    for (int64_t j = 0; j < count; ++j) {
      F dz;
      out[j] = value(j, dz);
      if constexpr (kResidual) out_r[j] = dz;
    }
    if constexpr (cpu::is_reduced_float<T>) {
      cpu::store_floats<kAvx2>(out, dx, count);
      if constexpr (kResidual) cpu::store_floats<kAvx2>(out_r, dresidual, count);
    } else {
      std::memcpy(dx, out, count * sizeof(T));
      if constexpr (kResidual) std::memcpy(dresidual, out_r, count * sizeof(T));
    }
  } else {
    for (int64_t j = 0; j < count; ++j) {
      F dz;
      dx[j] = value(j, dz);
      if constexpr (kResidual) dresidual[j] = dz;
    }
  }
}

// Elements [first, first + count) of the flat tensor, dx written to `dst` (the output itself or
// the streaming buffer). `channel_of(i)` gives the channel of flat element i and `segment(i)` how
// many elements from i on share the per-channel parameter indexing (the rest of a row or plane).
template <bool kAvx2, bool kResidual, bool kRows, typename T, typename P, typename Act>
CNNKERNELS_ALWAYS_INLINE void elemt_span(Inputs<T> in, T* dst, T* dresidual, int64_t first,
                                         int64_t count, const ElemtParams<P>& p, int64_t channels,
                                         const Act& act) {
  for (int64_t done = 0; done < count;) {
    const int64_t i = first + done;
    const int64_t c = kRows ? i % channels : 0;
    const int64_t m = std::min({kChunk, count - done, kRows ? channels - c : count - done});
    Inputs<T> at{in.x + i, in.grad + i, kResidual ? in.residual + i : nullptr};
    elemt_run<kAvx2, kResidual, T, P, Act>(
        at, dst + done, kResidual ? dresidual + i : nullptr, m, p, c, act);
    done += m;
  }
}

// dx over [first, first + count) of the flat tensor, with streaming stores when they pay off.
template <bool kAvx2, bool kResidual, bool kRows, typename T, typename P, typename Act>
CNNKERNELS_ALWAYS_INLINE void elemt_block(Inputs<T> in, T* dx, T* dresidual, int64_t first,
                                          int64_t count, const ElemtParams<P>& p, int64_t channels,
                                          const Act& act, bool stream) {
  if (cpu::should_stream<kAvx2>(stream, in.x, dx, count)) {
    cpu::streamed<kAvx2>(dx + first, count, [&](int64_t offset, T* dst, int64_t n)
                                                CNNKERNELS_ALWAYS_INLINE_LAMBDA {
      elemt_span<kAvx2, kResidual, kRows>(in, dst, dresidual, first + offset, n, p, channels, act);
    });
  } else {
    elemt_span<kAvx2, kResidual, kRows>(in, dx + first, dresidual, first, count, p, channels, act);
  }
}

// dx one pixel row at a time: x's rows w.x_stride apart (read in place from a channel slice),
// grad's, dresidual's and dx's dense, `dx_stride` apart.
template <bool kResidual, typename T, typename F, typename Act>
void elemt_rows(Inputs<T> in, const Walk& w, const ElemtParams<const F*>& arrays, const Act& act,
                T* dx, int64_t dx_stride, T* dresidual) {
  const int64_t rows = w.rows_total(), c = w.channels;
  at::parallel_for(0, rows, grain_in_units(c), [&](int64_t r0, int64_t r1) {
    cpu::run_with_best_isa_flag([&](auto avx2) {
      constexpr bool kAvx2 = decltype(avx2)::value;
      for (int64_t r = r0; r < r1; ++r) {
        const Inputs<T> row{in.x + r * w.x_stride, in.grad + r * c,
                            kResidual ? in.residual + r * c : nullptr};
        elemt_span<kAvx2, kResidual, true, T, const F*, Act>(
            row, dx + r * dx_stride, kResidual ? dresidual + r * c : nullptr, 0, c, arrays, c,
            act);
      }
    });
  });
}

template <typename T, bool kResidual>
void grad_input(Inputs<T> in, const Walk& w, const ChannelTensors& t, int64_t activation,
                double negative_slope, T* dx, T* dresidual, bool stream) {
  using F = opmath<T>;
  const ElemtParams<const F*> arrays{t.scale.const_data_ptr<F>(), t.shift.const_data_ptr<F>(),
                                     t.mean.const_data_ptr<F>(),  t.k_dz.const_data_ptr<F>(),
                                     t.k_xmu.const_data_ptr<F>(), t.k_1.const_data_ptr<F>()};
  dispatch_activation(activation, negative_slope, [&](auto act) {
    if (w.rows && w.x_stride != w.channels) {  // x's rows apart: one row at a time
      elemt_rows<kResidual>(in, w, arrays, act, dx, w.channels, dresidual);
      return;
    }
    if (w.rows) {
      const int64_t rows = w.rows_total();
      at::parallel_for(0, rows, grain_in_units(w.channels), [&](int64_t r0, int64_t r1) {
        cpu::run_with_best_isa_flag([&](auto avx2) {
          constexpr bool kAvx2 = decltype(avx2)::value;
          elemt_block<kAvx2, kResidual, true>(in, dx, dresidual, r0 * w.channels,
                                              (r1 - r0) * w.channels, arrays, w.channels, act,
                                              stream);
        });
      });
      return;
    }
    at::parallel_for(0, w.batch * w.channels, grain_in_units(w.plane), [&](int64_t q0, int64_t q1) {
      cpu::run_with_best_isa_flag([&](auto avx2) {
        constexpr bool kAvx2 = decltype(avx2)::value;
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t c = q % w.channels;
          const ElemtParams<Uniform<F>> one{{arrays.scale[c]}, {arrays.shift[c]}, {arrays.mean[c]},
                                            {arrays.k_dz[c]},  {arrays.k_xmu[c]}, {arrays.k_1[c]}};
          elemt_block<kAvx2, kResidual, false>(in, dx, dresidual, q * w.plane, w.plane, one,
                                               w.channels, act, stream);
        }
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_backward_elemt_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& k_dz,
    const at::Tensor& k_xmu, const at::Tensor& k_1, const std::optional<at::Tensor>& residual_in,
    int64_t activation, double negative_slope, bool residual_grad) {
  const BackwardInputs in_ = backward_inputs(
      grad_in, x_in, residual_in,
      {{&scale, "scale"}, {&shift, "shift"}, {&mean, "mean"}, {&k_dz, "coef_dz"}, {&k_xmu, "coef_xmu"},
       {&k_1, "coef_1"}},
      activation, "batch_norm_act_backward_elemt", /*strided_rows=*/true);
  const at::Tensor &x = in_.x, &grad = in_.grad;
  const auto& residual = in_.residual;
  const auto format = in_.format;
  at::Tensor dx = at::empty_like(x, format);
  // dz is the residual's gradient; computed in the same pass whenever a residual was added
  at::Tensor dresidual = residual ? at::empty_like(x, format) : no_residual_grad(x);
  const Walk w = walk_of(x, in_.x_row_stride);
  if (x.numel() > 0) {
    const ChannelTensors t{scale.contiguous(), shift.contiguous(), mean.contiguous(),
                           k_dz.contiguous(),  k_xmu.contiguous(), k_1.contiguous()};
    const int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
    const bool stream = cpu::streaming_pays_off((residual ? 5 : 3) * bytes);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "cnnkernels_batch_norm_act_backward_elemt", [&] {
          const Inputs<scalar_t> in{x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                                    residual ? residual->const_data_ptr<scalar_t>() : nullptr};
          auto* dx_p = dx.mutable_data_ptr<scalar_t>();
          if (residual) {
            grad_input<scalar_t, true>(in, w, t, activation, negative_slope, dx_p,
                                       dresidual.mutable_data_ptr<scalar_t>(), stream);
          } else {
            grad_input<scalar_t, false>(in, w, t, activation, negative_slope, dx_p, nullptr, stream);
          }
        });
  }
  if (!residual_grad && residual) dresidual = no_residual_grad(x);
  return {dx, dresidual};
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("batch_norm_act_backward_reduce_add_", &cnnkernels::batch_norm_act_backward_reduce_add_cpu);
  m.impl("batch_norm_act_stats", &cnnkernels::batch_norm_act_stats_cpu);
  m.impl("batch_norm_act_backward_reduce", &cnnkernels::batch_norm_act_backward_reduce_cpu);
  m.impl("batch_norm_act_backward_elemt", &cnnkernels::batch_norm_act_backward_elemt_cpu);
}
