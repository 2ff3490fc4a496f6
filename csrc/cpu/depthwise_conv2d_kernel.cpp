// CPU kernels of depthwise 2-D convolution: forward (with the optional inference epilogue
// act(scale * (conv + bias) + shift)), grad_input and grad_weight.
//
// float32 with channel multiplier 1 on AVX-512 and AVX2 CPUs (the common case) runs the
// channel-blocked kernels (depthwise_conv2d_blocked.inc): 16 channels per block, in both layouts,
// channels_last read and written in place (see the comments there). Everything else (float64, half,
// bfloat16, multiplier > 1, CPUs without AVX2) runs the portable kernels: NCHW plane by plane (one
// input plane and its `multiplier` output planes per task), vectorising along W, except small planes, which are
// computed in blocks of 16 channels; channels_last row by row, vectorising along C; their
// backward works on NCHW (channels_last tensors are converted, and grad_input converted back).
// Arithmetic is in float (double for double); half and bfloat16 planes are converted to float once
// per task. Each portable task runs compiled for the CPU's best instruction set
// (cpu::run_with_best_isa). Every task writes its own outputs and partial sums are added in a
// fixed order, so results are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <utility>
#include <vector>

#include "../depthwise_conv2d.h"
#include "cnnkernels/activation.h"
#include "cnnkernels/cpu/block_isa.h"
#include "cnnkernels/cpu/map.h"

namespace cnnkernels {
namespace {

// The output positions ow whose input column ow*stride + offset lies in [0, width).
struct ValidRange {
  int64_t lo, hi;
};

inline ValidRange valid_outputs(int64_t offset, int64_t stride, int64_t width, int64_t out) {
  const int64_t lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  const int64_t last = width - 1 - offset;  // largest allowed ow*stride
  const int64_t hi = last < 0 ? 0 : std::min(out, last / stride + 1);
  return {lo, std::max(lo, hi)};
}

// acc[ow] += w * in[ow*stride + offset] over the valid range (contiguous when stride is 1, which
// the compiler vectorises).
template <typename T>
inline void axpy_row(T* acc, const T* in, T w, int64_t offset, int64_t stride, int64_t width,
                     int64_t out) {
  const ValidRange r = valid_outputs(offset, stride, width, out);
  if (stride == 1) {
    const T* src = in + offset;
    for (int64_t ow = r.lo; ow < r.hi; ++ow) acc[ow] += w * src[ow];
  } else {
    for (int64_t ow = r.lo; ow < r.hi; ++ow) acc[ow] += w * in[ow * stride + offset];
  }
}

// The transpose of axpy_row: dst[ow*stride + offset] += w * src[ow].
template <typename T>
inline void scatter_row(T* dst, const T* src, T w, int64_t offset, int64_t stride, int64_t width,
                        int64_t out) {
  const ValidRange r = valid_outputs(offset, stride, width, out);
  if (stride == 1) {
    T* d = dst + offset;
    for (int64_t ow = r.lo; ow < r.hi; ++ow) d[ow] += w * src[ow];
  } else {
    for (int64_t ow = r.lo; ow < r.hi; ++ow) dst[ow * stride + offset] += w * src[ow];
  }
}

// sum of a[e] * b[e]. Sixteen independent partial sums: a single running sum is a chain of
// dependent adds the compiler may not reorder (no -ffast-math), i.e. scalar and latency-bound;
// independent lanes vectorise. The order is fixed, so results stay deterministic.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t kLanes = 16;
  T part[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[e + l] * b[e + l];
  }
  T sum = T(0);
  for (; e < n; ++e) sum += a[e] * b[e];
  for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

// sum over the valid range of a[ow] * b[ow*stride + offset].
template <typename T>
inline T dot_row(const T* a, const T* b, int64_t offset, int64_t stride, int64_t width,
                 int64_t out) {
  const ValidRange r = valid_outputs(offset, stride, width, out);
  if (stride == 1) return dot(a + r.lo, b + offset + r.lo, r.hi - r.lo);
  T sum = T(0);
  {
    for (int64_t ow = r.lo; ow < r.hi; ++ow) sum += a[ow] * b[ow * stride + offset];
  }
  return sum;
}

// Stride 1 on narrow images works on "wide" planes: the input zero-padded to width wp = W + 2*pw, and the output
// computed at the same row pitch wp (its last wp - OW columns are scratch). Then every tap is ONE
// contiguous multiply-add over (OH-1)*wp + OW elements, however small the image: no per-row loop,
// no bounds checks. Small planes (14x14, 7x7), where per-row loops of 7-14 elements cost more than
// the arithmetic, are the common case in MobileNets.
struct WidePlane {
  int64_t hp, wp, span;  // padded height and width; elements each tap touches
};

// Measured on the dev CPU: the padded copies cost more than they save once rows are long enough
// for the per-row loops to vectorise well (MobileNet's 112x112 planes).
constexpr int64_t kWidePlaneMaxWidth = 64;

inline bool use_wide_planes(const DepthwiseGeometry& g) {
  return g.sh == 1 && g.sw == 1 && g.w <= kWidePlaneMaxWidth;
}

inline WidePlane wide_plane(const DepthwiseGeometry& g) {
  const int64_t wp = g.w + 2 * g.pw;
  return {g.h + 2 * g.ph, wp, (g.oh - 1) * wp + g.ow};
}

inline int64_t tap_offset(const DepthwiseGeometry& g, const WidePlane& p, int64_t i, int64_t j) {
  return i * g.dh * p.wp + j * g.dw;
}

// dst (hp x wp) = src (H x W) zero-padded, as opmath_t.
template <typename opmath_t, typename scalar_t>
void pad_plane(const scalar_t* src, const DepthwiseGeometry& g, const WidePlane& p,
               std::vector<opmath_t>& dst) {
  dst.assign(p.hp * p.wp, opmath_t(0));
  for (int64_t ih = 0; ih < g.h; ++ih) {
    opmath_t* row = dst.data() + (ih + g.ph) * p.wp + g.pw;
    const scalar_t* in = src + ih * g.w;
    for (int64_t iw = 0; iw < g.w; ++iw) row[iw] = static_cast<opmath_t>(in[iw]);
  }
}

// dst (OH x wp, scratch columns zero) = src (OH x OW), as opmath_t.
template <typename opmath_t, typename scalar_t>
void widen_output_plane(const scalar_t* src, const DepthwiseGeometry& g, const WidePlane& p,
                        std::vector<opmath_t>& dst) {
  dst.assign(g.oh * p.wp, opmath_t(0));
  for (int64_t oh = 0; oh < g.oh; ++oh) {
    for (int64_t ow = 0; ow < g.ow; ++ow) {
      dst[oh * p.wp + ow] = static_cast<opmath_t>(src[oh * g.ow + ow]);
    }
  }
}

template <typename T>
inline void axpy(T* dst, const T* src, T w, int64_t n) {
  for (int64_t e = 0; e < n; ++e) dst[e] += w * src[e];
}

template <typename opmath_t, typename scalar_t>
std::vector<opmath_t> to_opmath(const scalar_t* data, int64_t n) {
  std::vector<opmath_t> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<opmath_t>(data[i]);
  return out;
}

template <typename opmath_t>
std::vector<opmath_t> optional_to_opmath(const std::optional<at::Tensor>& t, int64_t n,
                                         opmath_t fill) {
  if (!t.has_value() || !t->defined()) return std::vector<opmath_t>(n, fill);
  const at::Tensor c = t->to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
  return to_opmath<opmath_t>(c.const_data_ptr<opmath_t>(), n);
}

// Per-output-channel epilogue: act(scale * (acc + bias) + shift).
template <typename opmath_t>
struct Epilogue {
  std::vector<opmath_t> bias, scale, shift;
  bool has_affine;

  // dst[k] = act(scale·(acc[k] + bias) + shift) of channel first + k, for k < n (consecutive
  // channels, contiguous values).
  template <typename scalar_t, typename Act>
  CNNKERNELS_ALWAYS_INLINE void apply_channels(int64_t first, const opmath_t* acc, scalar_t* dst,
                                               int64_t n, const Act& act) const {
    epilogue_run(acc, dst, n, bias.data() + first, scale.data() + first, shift.data() + first,
                 has_affine, act);
  }

  // The same for one channel o and n contiguous values.
  template <typename scalar_t, typename Act>
  CNNKERNELS_ALWAYS_INLINE void apply_channel(int64_t o, const opmath_t* acc, scalar_t* dst,
                                              int64_t n, const Act& act) const {
    epilogue_run_one(acc, dst, n, bias[o], has_affine ? scale[o] : opmath_t(1),
                     has_affine ? shift[o] : opmath_t(0), has_affine, act);
  }

  // A copy whose vectors are padded to whole blocks of 16 channels (bias 0, scale 1, shift 0), for
  // the channel-blocked kernels' vector epilogue.
  Epilogue padded_to_blocks() const {
    Epilogue p = *this;
    const size_t size = (bias.size() + 15) / 16 * 16;
    p.bias.resize(size, opmath_t(0));
    p.scale.resize(size, opmath_t(1));
    p.shift.resize(size, opmath_t(0));
    return p;
  }

 private:
  // The loops as functions of restrict pointers and hoisted constants: read through the vectors
  // inside the loop, the per-channel values may alias the output as far as the compiler knows, and
  // the loop stays scalar (with branches for relu6's min/max: 3x slower than identity measured).
  template <typename scalar_t, typename Act>
  static CNNKERNELS_ALWAYS_INLINE void epilogue_run(
      const opmath_t* __restrict acc, scalar_t* __restrict dst, int64_t n,
      const opmath_t* __restrict b, const opmath_t* __restrict s, const opmath_t* __restrict t,
      bool affine, const Act& act) {
    if (affine) {
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(act.forward((acc[k] + b[k]) * s[k] + t[k]));
    } else {
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(act.forward(acc[k] + b[k]));
    }
  }

  template <typename scalar_t, typename Act>
  static CNNKERNELS_ALWAYS_INLINE void epilogue_run_one(const opmath_t* __restrict acc,
                                                        scalar_t* __restrict dst, int64_t n,
                                                        opmath_t b, opmath_t s, opmath_t t,
                                                        bool affine, const Act& act) {
    if (affine) {
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(act.forward((acc[k] + b) * s + t));
    } else {
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(act.forward(acc[k] + b));
    }
  }
};

// A plane of `count` values as opmath_t: the data itself when no conversion is needed, else a
// converted copy in `buffer`.
template <typename opmath_t, typename scalar_t>
const opmath_t* plane_as_opmath(const scalar_t* data, int64_t count, std::vector<opmath_t>& buffer) {
  if constexpr (std::is_same_v<opmath_t, scalar_t>) {
    return data;
  } else {
    buffer.resize(count);
    for (int64_t i = 0; i < count; ++i) buffer[i] = static_cast<opmath_t>(data[i]);
    return buffer.data();
  }
}

template <typename scalar_t, typename Act>
void forward_nchw(const at::Tensor& x, const at::Tensor& weight, const Epilogue<at::opmath_type<scalar_t>>& ep,
                  const at::Tensor& out, const DepthwiseGeometry& g, Act act) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = out.mutable_data_ptr<scalar_t>();
  const std::vector<opmath_t> w = to_opmath<opmath_t>(weight.const_data_ptr<scalar_t>(),
                                                      g.out_channels() * g.kh * g.kw);
  const int64_t in_plane = g.h * g.w, out_plane = g.oh * g.ow;
  const bool unit_stride = use_wide_planes(g);
  const WidePlane wide = wide_plane(g);
  at::parallel_for(0, g.n * g.c, 1, [&](int64_t begin, int64_t end) {
    cpu::run_with_best_isa([&] {
      std::vector<opmath_t> in_buffer, acc(g.ow), wide_acc;
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / g.c, c = plane % g.c;
        if (unit_stride) {
          pad_plane(xp + plane * in_plane, g, wide, in_buffer);
          for (int64_t k = 0; k < g.multiplier; ++k) {
            const int64_t o = c * g.multiplier + k;
            const opmath_t* wo = w.data() + o * g.kh * g.kw;
            wide_acc.assign(wide.span, opmath_t(0));
            for (int64_t i = 0; i < g.kh; ++i) {
              for (int64_t j = 0; j < g.kw; ++j) {
                axpy(wide_acc.data(), in_buffer.data() + tap_offset(g, wide, i, j), wo[i * g.kw + j],
                     wide.span);
              }
            }
            scalar_t* y = yp + (n * g.out_channels() + o) * out_plane;
            for (int64_t oh = 0; oh < g.oh; ++oh) {
              ep.apply_channel(o, wide_acc.data() + oh * wide.wp, y + oh * g.ow, g.ow, act);
            }
          }
          continue;
        }
        const opmath_t* in = plane_as_opmath(xp + plane * in_plane, in_plane, in_buffer);
        for (int64_t k = 0; k < g.multiplier; ++k) {
          const int64_t o = c * g.multiplier + k;
          const opmath_t* wo = w.data() + o * g.kh * g.kw;
          scalar_t* y = yp + (n * g.out_channels() + o) * out_plane;
          for (int64_t oh = 0; oh < g.oh; ++oh) {
            std::fill(acc.begin(), acc.end(), opmath_t(0));
            for (int64_t i = 0; i < g.kh; ++i) {
              const int64_t ih = oh * g.sh - g.ph + i * g.dh;
              if (ih < 0 || ih >= g.h) continue;
              for (int64_t j = 0; j < g.kw; ++j) {
                axpy_row(acc.data(), in + ih * g.w, wo[i * g.kw + j], j * g.dw - g.pw, g.sw, g.w,
                         g.ow);
              }
            }
            ep.apply_channel(o, acc.data(), y + oh * g.ow, g.ow, act);
          }
        }
      }
    });
  });
}

// Small NCHW planes (MobileNet's 14x14 and 7x7), multiplier 1: blocks of 16 channels are copied
// into a zero-padded [hp][wp][16] buffer, and every tap of every output pixel is then one
// 16-channel multiply-add with no bounds checks -- the channel-blocked layout oneDNN uses. Row-wise
// loops over 7 to 14 columns spend more on loop overhead than on arithmetic.
// Measured on the dev CPU: worth it up to 16 output columns (14x14, 7x7), and up to 32 at
// stride > 1, where the row-wise loops cannot use contiguous loads.
constexpr int64_t kChannelBlock = 16;

bool use_channel_blocks(const DepthwiseGeometry& g) {
  return g.multiplier == 1 && (g.ow <= 16 || (g.sw > 1 && g.ow <= 32));
}

template <typename scalar_t, typename Act>
void forward_nchw_channel_blocks(const at::Tensor& x, const at::Tensor& weight,
                                 const Epilogue<at::opmath_type<scalar_t>>& ep,
                                 const at::Tensor& out, const DepthwiseGeometry& g, Act act) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t B = kChannelBlock;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = out.mutable_data_ptr<scalar_t>();
  const std::vector<opmath_t> w = to_opmath<opmath_t>(weight.const_data_ptr<scalar_t>(),
                                                      g.c * g.kh * g.kw);
  const int64_t hp = g.h + 2 * g.ph, wp = g.w + 2 * g.pw, taps = g.kh * g.kw;
  const int64_t blocks = (g.c + B - 1) / B, in_plane = g.h * g.w, out_plane = g.oh * g.ow;
  at::parallel_for(0, g.n * blocks, 1, [&](int64_t begin, int64_t end) {
    cpu::run_with_best_isa([&] {
      std::vector<opmath_t> in(hp * wp * B), wt(taps * B);
      opmath_t acc[B], done[B];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, c0 = (task % blocks) * B;
        const int64_t lanes = std::min(B, g.c - c0);
        std::fill(in.begin(), in.end(), opmath_t(0));
        std::fill(wt.begin(), wt.end(), opmath_t(0));
        for (int64_t l = 0; l < lanes; ++l) {
          const scalar_t* plane = xp + (n * g.c + c0 + l) * in_plane;
          for (int64_t ih = 0; ih < g.h; ++ih) {
            opmath_t* row = in.data() + ((ih + g.ph) * wp + g.pw) * B + l;
            for (int64_t iw = 0; iw < g.w; ++iw) row[iw * B] = static_cast<opmath_t>(plane[ih * g.w + iw]);
          }
          for (int64_t t = 0; t < taps; ++t) wt[t * B + l] = w[(c0 + l) * taps + t];
        }
        for (int64_t oh = 0; oh < g.oh; ++oh) {
          for (int64_t ow = 0; ow < g.ow; ++ow) {
            for (int64_t l = 0; l < B; ++l) acc[l] = opmath_t(0);
            for (int64_t i = 0; i < g.kh; ++i) {
              const opmath_t* src_row = in.data() + ((oh * g.sh + i * g.dh) * wp + ow * g.sw) * B;
              for (int64_t j = 0; j < g.kw; ++j) {
                const opmath_t* src = src_row + j * g.dw * B;
                const opmath_t* wv = wt.data() + (i * g.kw + j) * B;
                for (int64_t l = 0; l < B; ++l) acc[l] += wv[l] * src[l];
              }
            }
            scalar_t* dst = yp + (n * g.c + c0) * out_plane + oh * g.ow + ow;
            ep.apply_channels(c0, acc, done, lanes, act);  // vectorised over the lanes
            for (int64_t l = 0; l < lanes; ++l) dst[l * out_plane] = static_cast<scalar_t>(done[l]);
          }
        }
      }
    });
  });
}

template <typename scalar_t, typename Act>
void forward_channels_last(const at::Tensor& x, const at::Tensor& weight,
                           const Epilogue<at::opmath_type<scalar_t>>& ep, const at::Tensor& out,
                           const DepthwiseGeometry& g, Act act) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t cm = g.out_channels(), m = g.multiplier;
  // weight as [kh][kw][C*m], so that the inner loop over channels reads it contiguously
  const at::Tensor wt = weight.reshape({cm, g.kh * g.kw}).t().contiguous();
  const std::vector<opmath_t> w = to_opmath<opmath_t>(wt.const_data_ptr<scalar_t>(),
                                                      g.kh * g.kw * cm);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();  // [N][H][W][C]
  scalar_t* yp = out.mutable_data_ptr<scalar_t>();    // [N][OH][OW][C*m]
  at::parallel_for(0, g.n * g.oh, 1, [&](int64_t begin, int64_t end) {
    cpu::run_with_best_isa([&] {
      std::vector<opmath_t> acc(cm), pixel(g.c);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.oh, oh = row % g.oh;
        for (int64_t ow = 0; ow < g.ow; ++ow) {
          std::fill(acc.begin(), acc.end(), opmath_t(0));
          for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t ih = oh * g.sh - g.ph + i * g.dh;
            if (ih < 0 || ih >= g.h) continue;
            for (int64_t j = 0; j < g.kw; ++j) {
              const int64_t iw = ow * g.sw - g.pw + j * g.dw;
              if (iw < 0 || iw >= g.w) continue;
              const scalar_t* src = xp + ((n * g.h + ih) * g.w + iw) * g.c;
              const opmath_t* wij = w.data() + (i * g.kw + j) * cm;
              if (m == 1) {
                for (int64_t o = 0; o < cm; ++o) acc[o] += wij[o] * static_cast<opmath_t>(src[o]);
              } else {
                for (int64_t c = 0; c < g.c; ++c) pixel[c] = static_cast<opmath_t>(src[c]);
                for (int64_t o = 0; o < cm; ++o) acc[o] += wij[o] * pixel[o / m];
              }
            }
          }
          ep.apply_channels(0, acc.data(), yp + ((n * g.oh + oh) * g.ow + ow) * cm, cm, act);
        }
      }
    });
  });
}

#if CNNKERNELS_X86
// --- channel-blocked kernels: float32, multiplier 1, AVX-512 or AVX2 ---------------------------
//
// oneDNN's approach, for both layouts: the channels are taken 16 at a time ("blocks"), copied into
// zero-padded [row][column][16] windows (one in-register transpose per 16 pixels from NCHW, one
// vector per pixel from channels_last), every tap of every output pixel is then one 16-channel FMA
// with no bounds checks, and results go back the same way. Work is split into tasks of (image,
// strip of rows, group of blocks) whose windows stay in L2; channels_last copies walk each pixel's
// channels of the whole group in memory order. Measured on the dev CPU (AVX-512 EPYC), on
// MobileNet's 14x14 and 7x7 planes, where a row is shorter than a vector, this is 2-3x faster than
// row-wise loops, and the backward ops read and write channels_last directly.
//
// The code is in depthwise_conv2d_blocked.inc, compiled twice: a block is one AVX-512 register, or
// two AVX2 registers (with fewer output pixels and sums held at once, see block_isa.h).
namespace blocked_avx512 {
using Isa = cpu::Avx512Block;
#define CNNKERNELS_BLOCKED_TARGET CNNKERNELS_TARGET_AVX512
#include "depthwise_conv2d_blocked.inc"
#undef CNNKERNELS_BLOCKED_TARGET
}  // namespace blocked_avx512

namespace blocked_avx2 {
using Isa = cpu::Avx2Block;
#define CNNKERNELS_BLOCKED_TARGET CNNKERNELS_TARGET_AVX2
#include "depthwise_conv2d_blocked.inc"
#undef CNNKERNELS_BLOCKED_TARGET
}  // namespace blocked_avx2
#endif  // CNNKERNELS_X86

// The channel-blocked kernels serve float32 with multiplier 1 on AVX-512 and AVX2 CPUs.
bool use_blocked(const DepthwiseGeometry& g, at::ScalarType dtype) {
#if CNNKERNELS_X86
  return dtype == at::kFloat && g.multiplier == 1 && (cpu::has_avx512() || cpu::has_avx2());
#else
  (void)g, (void)dtype;
  return false;
#endif
}

at::Tensor depthwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                const std::optional<at::Tensor>& scale,
                                const std::optional<at::Tensor>& shift, int64_t activation,
                                double negative_slope) {
  constexpr const char* op = "depthwise_conv2d";
  const DepthwiseGeometry g =
      check_depthwise_forward(x, weight, bias, stride, padding, dilation, scale, shift, op);
  const bool channels_last = wants_channels_last(x);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({g.n, g.out_channels(), g.oh, g.ow}, x.options().memory_format(format));
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous(format), wc = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Epilogue<opmath_t> ep{optional_to_opmath<opmath_t>(bias, g.out_channels(), opmath_t(0)),
                          optional_to_opmath<opmath_t>(scale, g.out_channels(), opmath_t(1)),
                          optional_to_opmath<opmath_t>(shift, g.out_channels(), opmath_t(0)),
                          scale.has_value()};
    dispatch_activation(activation, negative_slope, [&](auto act) {
#if CNNKERNELS_X86
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (use_blocked(g, x.scalar_type())) {
          if (cpu::has_avx512()) {
            blocked_avx512::forward(xc, wc, ep, out, g, channels_last, act);
          } else {
            blocked_avx2::forward(xc, wc, ep, out, g, channels_last, act);
          }
          return;
        }
      }
#endif
      if (channels_last) {
        forward_channels_last<scalar_t>(xc, wc, ep, out, g, act);
      } else if (use_channel_blocks(g)) {
        forward_nchw_channel_blocks<scalar_t>(xc, wc, ep, out, g, act);
      } else {
        forward_nchw<scalar_t>(xc, wc, ep, out, g, act);
      }
    });
  });
  return out;
}

at::Tensor depthwise_conv2d_backward_input_cpu(const at::Tensor& grad_output,
                                               const at::Tensor& weight,
                                               at::IntArrayRef input_size, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "depthwise_conv2d_backward_input";
  const DepthwiseGeometry g =
      check_depthwise_args(grad_output, input_size, weight.sizes(), stride, padding, dilation, op);
  check_grad_output_shape(grad_output, g, op);
  const bool channels_last = wants_channels_last(grad_output);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
#if CNNKERNELS_X86
  if (use_blocked(g, grad_output.scalar_type())) {  // works in either layout
    at::Tensor grad_input = at::empty(input_size, grad_output.options().memory_format(format));
    if (grad_input.numel() == 0) return grad_input;
    const at::Tensor go = grad_output.contiguous(format), wc = weight.contiguous();
    if (cpu::has_avx512()) {
      blocked_avx512::backward_input(go, wc, grad_input, g, channels_last);
    } else {
      blocked_avx2::backward_input(go, wc, grad_input, g, channels_last);
    }
    return grad_input;
  }
#endif
  at::Tensor grad_input = at::empty(input_size, grad_output.options());  // NCHW while computing
  if (grad_input.numel() == 0) return grad_input.contiguous(format);
  const at::Tensor go = grad_output.contiguous(), wc = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "depthwise_conv2d_backward_input", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
    const std::vector<opmath_t> w = to_opmath<opmath_t>(wc.const_data_ptr<scalar_t>(),
                                                        g.out_channels() * g.kh * g.kw);
    const int64_t in_plane = g.h * g.w, out_plane = g.oh * g.ow;
    const bool unit_stride = use_wide_planes(g);
    const WidePlane wide = wide_plane(g);
    at::parallel_for(0, g.n * g.c, 1, [&](int64_t begin, int64_t end) {
      cpu::run_with_best_isa([&] {
        std::vector<opmath_t> acc(in_plane), go_buffer, wide_grad;
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / g.c, c = plane % g.c;
          scalar_t* dst = dx + plane * in_plane;
          if (unit_stride) {  // the transpose of the forward's wide taps
            wide_grad.assign(wide.hp * wide.wp, opmath_t(0));
            for (int64_t k = 0; k < g.multiplier; ++k) {
              const int64_t o = c * g.multiplier + k;
              widen_output_plane(gp + (n * g.out_channels() + o) * out_plane, g, wide, go_buffer);
              const opmath_t* wo = w.data() + o * g.kh * g.kw;
              for (int64_t i = 0; i < g.kh; ++i) {
                for (int64_t j = 0; j < g.kw; ++j) {
                  axpy(wide_grad.data() + tap_offset(g, wide, i, j), go_buffer.data(),
                       wo[i * g.kw + j], wide.span);
                }
              }
            }
            for (int64_t ih = 0; ih < g.h; ++ih) {
              const opmath_t* row = wide_grad.data() + (ih + g.ph) * wide.wp + g.pw;
              for (int64_t iw = 0; iw < g.w; ++iw) dst[ih * g.w + iw] = static_cast<scalar_t>(row[iw]);
            }
            continue;
          }
          std::fill(acc.begin(), acc.end(), opmath_t(0));
          for (int64_t k = 0; k < g.multiplier; ++k) {
            const int64_t o = c * g.multiplier + k;
            const opmath_t* gop = plane_as_opmath(
                gp + (n * g.out_channels() + o) * out_plane, out_plane, go_buffer);
            const opmath_t* wo = w.data() + o * g.kh * g.kw;
            for (int64_t oh = 0; oh < g.oh; ++oh) {
              for (int64_t i = 0; i < g.kh; ++i) {
                const int64_t ih = oh * g.sh - g.ph + i * g.dh;
                if (ih < 0 || ih >= g.h) continue;
                for (int64_t j = 0; j < g.kw; ++j) {
                  scatter_row(acc.data() + ih * g.w, gop + oh * g.ow, wo[i * g.kw + j],
                              j * g.dw - g.pw, g.sw, g.w, g.ow);
                }
              }
            }
          }
          for (int64_t e = 0; e < in_plane; ++e) dst[e] = static_cast<scalar_t>(acc[e]);
        }
      });
    });
  });
  return grad_input.contiguous(format);
}

at::Tensor depthwise_conv2d_backward_weight_cpu(const at::Tensor& grad_output, const at::Tensor& x,
                                                at::IntArrayRef weight_size,
                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef dilation) {
  constexpr const char* op = "depthwise_conv2d_backward_weight";
  const DepthwiseGeometry g =
      check_depthwise_args(x, x.sizes(), weight_size, stride, padding, dilation, op);
  check_grad_output_shape(grad_output, g, op);
  TORCH_CHECK(grad_output.scalar_type() == x.scalar_type(), op,
              ": 'grad_output' and 'x' must have the same dtype");
  at::Tensor grad_weight = at::empty(weight_size, x.options());
#if CNNKERNELS_X86
  if (use_blocked(g, x.scalar_type())) {  // works in either layout; x's decides
    const auto format = wants_channels_last(x) ? at::MemoryFormat::ChannelsLast
                                               : at::MemoryFormat::Contiguous;
    if (grad_output.numel() == 0) return grad_weight.zero_();
    const at::Tensor go = grad_output.contiguous(format), xc = x.contiguous(format);
    const bool channels_last = format == at::MemoryFormat::ChannelsLast;
    if (cpu::has_avx512()) {
      blocked_avx512::backward_weight(go, xc, grad_weight, g, channels_last);
    } else {
      blocked_avx2::backward_weight(go, xc, grad_weight, g, channels_last);
    }
    return grad_weight;
  }
#endif
  const at::Tensor go = grad_output.contiguous(), xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_backward_weight", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* dw = grad_weight.mutable_data_ptr<scalar_t>();
    const int64_t in_plane = g.h * g.w, out_plane = g.oh * g.ow, taps = g.kh * g.kw;
    const bool unit_stride = use_wide_planes(g);
    const WidePlane wide = wide_plane(g);
    at::parallel_for(0, g.out_channels(), 1, [&](int64_t begin, int64_t end) {
      cpu::run_with_best_isa([&] {
        std::vector<opmath_t> x_buffer, go_buffer;
        std::vector<double> sums(taps);  // rows (planes) are summed in opmath_t, then in double
        for (int64_t o = begin; o < end; ++o) {
          const int64_t c = o / g.multiplier;
          std::fill(sums.begin(), sums.end(), 0.0);
          for (int64_t n = 0; n < g.n; ++n) {
            if (unit_stride) {
              pad_plane(xp + (n * g.c + c) * in_plane, g, wide, x_buffer);
              widen_output_plane(gp + (n * g.out_channels() + o) * out_plane, g, wide, go_buffer);
              for (int64_t i = 0; i < g.kh; ++i) {
                for (int64_t j = 0; j < g.kw; ++j) {
                  sums[i * g.kw + j] += dot(go_buffer.data(),
                                            x_buffer.data() + tap_offset(g, wide, i, j), wide.span);
                }
              }
              continue;
            }
            const opmath_t* in = plane_as_opmath(xp + (n * g.c + c) * in_plane, in_plane, x_buffer);
            const opmath_t* gop = plane_as_opmath(gp + (n * g.out_channels() + o) * out_plane,
                                                  out_plane, go_buffer);
            for (int64_t oh = 0; oh < g.oh; ++oh) {
              for (int64_t i = 0; i < g.kh; ++i) {
                const int64_t ih = oh * g.sh - g.ph + i * g.dh;
                if (ih < 0 || ih >= g.h) continue;
                for (int64_t j = 0; j < g.kw; ++j) {
                  sums[i * g.kw + j] += dot_row(gop + oh * g.ow, in + ih * g.w, j * g.dw - g.pw,
                                                g.sw, g.w, g.ow);
                }
              }
            }
          }
          for (int64_t t = 0; t < taps; ++t) dw[o * taps + t] = static_cast<scalar_t>(sums[t]);
        }
      });
    });
  });
  return grad_weight;
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("depthwise_conv2d", &cnnkernels::depthwise_conv2d_cpu);
  m.impl("depthwise_conv2d_backward_input", &cnnkernels::depthwise_conv2d_backward_input_cpu);
  m.impl("depthwise_conv2d_backward_weight", &cnnkernels::depthwise_conv2d_backward_weight_cpu);
}
