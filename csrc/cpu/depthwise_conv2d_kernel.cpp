// CPU kernels of depthwise 2-D convolution: forward (with the optional inference epilogue
// act(scale * (conv + bias) + shift)), grad_input and grad_weight.
//
// float32 with channel multiplier 1 on AVX-512 CPUs (the common case) runs the channel-blocked
// kernels of namespace `blocked`: 16 channels per vector, in both layouts, channels_last read and
// written in place (see the comments there). Everything else (float64, half, bfloat16, multiplier >
// 1, CPUs without AVX-512) runs the portable kernels: NCHW plane by plane (one input plane and its
// `multiplier` output planes per task), vectorising along W, except small planes, which are
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
#include "cnnkernels/cpu/channel_blocks.h"
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
// --- channel-blocked kernels: float32, multiplier 1, AVX-512 ----------------------------------
//
// oneDNN's approach, for both layouts: the channels are taken 16 at a time ("blocks"), copied into
// zero-padded [row][column][16] windows (one in-register transpose per 16 pixels from NCHW, one
// vector per pixel from channels_last), every tap of every output pixel is then one 16-channel FMA
// with no bounds checks, and results go back the same way. Work is split into tasks of (image,
// strip of rows, group of blocks) whose windows stay in L2; channels_last copies walk each pixel's
// channels of the whole group in memory order. Measured on the dev CPU (AVX-512 EPYC), on
// MobileNet's 14x14 and 7x7 planes, where a row is shorter than a vector, this is 2-3x faster than
// row-wise loops, and the backward ops read and write channels_last directly.
namespace blocked {

using cpu::kBlock;

// act(scale * (acc + bias) + shift) of channels [first, first + 16), as Epilogue computes it per
// value (its vectors padded to whole blocks).
template <typename Act>
CNNKERNELS_TARGET_AVX512 CNNKERNELS_ALWAYS_INLINE __m512 epilogue16(const Epilogue<float>& ep,
                                                                    int64_t first, __m512 acc,
                                                                    const Act& act) {
  __m512 v = _mm512_add_ps(acc, _mm512_loadu_ps(ep.bias.data() + first));
  if (ep.has_affine) {
    v = _mm512_add_ps(_mm512_mul_ps(v, _mm512_loadu_ps(ep.scale.data() + first)),
                      _mm512_loadu_ps(ep.shift.data() + first));
  }
  return cpu::activation16(act, v);
}

inline int64_t block_count(int64_t channels) { return (channels + kBlock - 1) / kBlock; }

// One image of an NCHW or channels_last float tensor with `channels` channels of h x w.
struct Image {
  int64_t n, channels, h, w;
  bool channels_last;

  int64_t lanes(int64_t block) const { return std::min(kBlock, channels - block * kBlock); }

  // Offset of channel `block`*16 at pixel `pixel` (row-major within the plane).
  int64_t offset(int64_t block, int64_t pixel) const {
    return channels_last ? (n * h * w + pixel) * channels + block * kBlock
                         : (n * channels + block * kBlock) * h * w + pixel;
  }
};

// dst[(b - b0) * stride + e][l] = channel 16b + l at pixel first + e, for blocks [b0, b1) and
// e < count (lanes past the channels are zero).
CNNKERNELS_TARGET_AVX512 void to_blocks(const float* data, const Image& im, int64_t b0, int64_t b1,
                                        int64_t first, int64_t count, float* dst, int64_t stride) {
  if (!im.channels_last) {
    for (int64_t b = b0; b < b1; ++b) {
      cpu::planes_to_block(data + im.offset(b, first), im.h * im.w, im.lanes(b), count,
                           dst + (b - b0) * stride);
    }
    return;
  }
  const float* src = data + im.offset(b0, first);
  for (int64_t e = 0; e < count; ++e, src += im.channels) {  // memory order: pixel, then channel
    for (int64_t b = b0; b < b1; ++b) {
      const __m512 v = _mm512_maskz_loadu_ps(cpu::first_lanes(im.lanes(b)), src + (b - b0) * kBlock);
      _mm512_storeu_ps(dst + (b - b0) * stride + e * kBlock, v);
    }
  }
}

// The inverse: channel 16b + l at pixel first + e = src[(b - b0) * stride + e][l].
CNNKERNELS_TARGET_AVX512 void from_blocks(const float* src, int64_t stride, float* data,
                                          const Image& im, int64_t b0, int64_t b1, int64_t first,
                                          int64_t count) {
  if (!im.channels_last) {
    for (int64_t b = b0; b < b1; ++b) {
      cpu::block_to_planes(src + (b - b0) * stride, count, data + im.offset(b, first), im.h * im.w,
                           im.lanes(b));
    }
    return;
  }
  float* dst = data + im.offset(b0, first);
  for (int64_t e = 0; e < count; ++e, dst += im.channels) {
    for (int64_t b = b0; b < b1; ++b) {
      _mm512_mask_storeu_ps(dst + (b - b0) * kBlock, cpu::first_lanes(im.lanes(b)),
                            _mm512_loadu_ps(src + (b - b0) * stride + e * kBlock));
    }
  }
}

// The input rows and columns that output rows [oh0, oh1) read: rows from row0 (negative in the
// padding), columns from -pw.
struct Window {
  int64_t row0, rows, cols;
  int64_t size() const { return rows * cols * kBlock; }  // floats per block
};

inline int64_t window_cols(const DepthwiseGeometry& g) {
  return (g.ow - 1) * g.sw + g.dw * (g.kw - 1) + 1;
}

inline Window input_window(const DepthwiseGeometry& g, int64_t oh0, int64_t oh1) {
  return {oh0 * g.sh - g.ph, (oh1 - 1 - oh0) * g.sh + g.dh * (g.kh - 1) + 1, window_cols(g)};
}

// buf[(b - b0) * win.size() + (r * cols + col) * 16] = input pixel (win.row0 + r, col - pw), zero
// outside the image.
CNNKERNELS_TARGET_AVX512 void load_windows(const float* x, const Image& im, int64_t b0, int64_t b1,
                                           const Window& win, int64_t pw, float* buf) {
  const int64_t left = std::min(pw, win.cols);                         // padding columns
  const int64_t inside = std::clamp<int64_t>(win.cols - pw, 0, im.w);  // image columns read
  for (int64_t r = 0; r < win.rows; ++r) {
    float* row = buf + r * win.cols * kBlock;
    const int64_t ih = win.row0 + r;
    const bool in_image = ih >= 0 && ih < im.h;
    for (int64_t b = b0; b < b1; ++b) {
      float* brow = row + (b - b0) * win.size();
      if (!in_image) {
        cpu::zero_block(brow, win.cols);
        continue;
      }
      cpu::zero_block(brow, left);
      cpu::zero_block(brow + (left + inside) * kBlock, win.cols - left - inside);
    }
    if (in_image) to_blocks(x, im, b0, b1, ih * im.w, inside, row + left * kBlock, win.size());
  }
}

// wv[b][t][l] = weight of channel 16b + l, tap t (zero past the channels).
std::vector<float> weight_blocks(const float* w, int64_t channels, int64_t taps) {
  std::vector<float> wv(block_count(channels) * taps * kBlock, 0.f);
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t t = 0; t < taps; ++t) wv[((c / kBlock) * taps + t) * kBlock + c % kBlock] = w[c * taps + t];
  }
  return wv;
}

// Work split: tasks of (image, strip of rows, group of blocks). Strips are as tall as fits the
// group's windows in kWindowBytes (half of the dev CPU's L2); blocks are grouped so that there are
// at least 4 tasks per thread (batch 1 still uses every thread).
constexpr int64_t kWindowBytes = 512 * 1024;

// Blocks a task moves in and out together. NCHW: one, so that a block's window stays in L1 from
// its load to its store. channels_last: several, so that copies read each pixel's channels in
// memory order, in runs of several cache lines.
inline int64_t blocks_at_once(bool channels_last) {
  return channels_last ? 8 : 1;
}

struct Tasks {
  int64_t images, rows, strip, strips, blocks, group, groups, at_once;

  int64_t count() const { return images * strips * groups; }

  struct Task {
    int64_t n, row0, row1, b0, b1;
  };
  Task operator[](int64_t task) const {
    const int64_t group_index = task % groups, strip_index = (task / groups) % strips;
    const int64_t row0 = strip_index * strip, b0 = group_index * group;
    return {task / (groups * strips), row0, std::min(rows, row0 + strip), b0,
            std::min(blocks, b0 + group)};
  }
};

// `rows`: rows to split; `row_bytes`: window bytes per row and block; `rows_for(window_rows)`: how
// many of those rows a window of that many rows serves.
template <typename RowsFor>
Tasks split_work(const DepthwiseGeometry& g, bool channels_last, int64_t rows, int64_t row_bytes,
                 RowsFor rows_for) {
  Tasks t{g.n, rows, 0, 0, block_count(g.c), 0, 0, 0};
  t.at_once = std::min(t.blocks, blocks_at_once(channels_last));
  const int64_t window_rows = std::max<int64_t>(1, kWindowBytes / (row_bytes * t.at_once));
  const int64_t strip = std::clamp<int64_t>(rows_for(window_rows), 1, rows);
  t.strips = (rows + strip - 1) / strip;
  t.strip = (rows + t.strips - 1) / t.strips;
  const int64_t wanted = 4 * at::get_num_threads();
  const int64_t groups = std::clamp<int64_t>((wanted + g.n * t.strips - 1) / (g.n * t.strips), 1, t.blocks);
  t.group = (t.blocks + groups - 1) / groups;
  t.groups = (t.blocks + t.group - 1) / t.group;
  return t;
}

// Tasks over output rows, each reading an input window.
inline Tasks split_output_rows(const DepthwiseGeometry& g, bool channels_last) {
  return split_work(g, channels_last, g.oh, window_cols(g) * kBlock * int64_t(sizeof(float)),
                    [&](int64_t window_rows) { return (window_rows - g.dh * (g.kh - 1) - 1) / g.sh + 1; });
}

// RB output pixels of a row: out[r] = sum over taps of w[t] * in[r * pixel_step + tap offset].
// RB accumulators stay in registers across the taps.
template <int RB>
CNNKERNELS_TARGET_AVX512 CNNKERNELS_ALWAYS_INLINE void conv_pixels(
    const float* in, const float* wv, int64_t kh, int64_t kw, int64_t row_step, int64_t col_step,
    int64_t pixel_step, float* out) {
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < kh; ++i) {
    for (int64_t j = 0; j < kw; ++j) {
      const __m512 w = _mm512_loadu_ps(wv + (i * kw + j) * kBlock);
      const float* src = in + i * row_step + j * col_step;
      for (int r = 0; r < RB; ++r) {
        acc[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(src + r * pixel_step), acc[r]);
      }
    }
  }
  for (int r = 0; r < RB; ++r) _mm512_storeu_ps(out + r * kBlock, acc[r]);
}

// out[(oh - oh0) * ow + ow] = convolution at output pixel (oh, ow), for oh in [oh0, oh1).
CNNKERNELS_TARGET_AVX512 void conv_strip(const float* buf, const Window& win,
                                         const DepthwiseGeometry& g, const float* wv, int64_t oh0,
                                         int64_t oh1, float* out) {
  const int64_t pitch = win.cols * kBlock;
  const int64_t row_step = g.dh * pitch, col_step = g.dw * kBlock, pixel_step = g.sw * kBlock;
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const float* in = buf + (oh - oh0) * g.sh * pitch;
    float* o = out + (oh - oh0) * g.ow * kBlock;
    // (no lambda here: it would not carry the AVX-512 target that conv_pixels needs to inline)
#define CNNKERNELS_CONV_PIXELS(RB)                                                          \
  conv_pixels<RB>(in + ow * pixel_step, wv, g.kh, g.kw, row_step, col_step, pixel_step, \
                  o + ow * kBlock)
    int64_t ow = 0;
    for (; ow + 8 <= g.ow; ow += 8) CNNKERNELS_CONV_PIXELS(8);
    if (ow + 4 <= g.ow) { CNNKERNELS_CONV_PIXELS(4); ow += 4; }
    if (ow + 2 <= g.ow) { CNNKERNELS_CONV_PIXELS(2); ow += 2; }
    if (ow < g.ow) CNNKERNELS_CONV_PIXELS(1);
#undef CNNKERNELS_CONV_PIXELS
  }
}

// Output pixels [first, first + count) of blocks [b0, b1) through the epilogue; conv holds them
// as [(b - b0) * stride + e][16].
template <typename Act>
CNNKERNELS_TARGET_AVX512 void store_outputs(const float* conv, int64_t stride, float* y,
                                            const Image& im, int64_t b0, int64_t b1, int64_t first,
                                            int64_t count, const Epilogue<float>& ep,
                                            std::vector<float>& planes, const Act& act) {
  if (im.channels_last) {
    float* dst = y + im.offset(b0, first);
    for (int64_t e = 0; e < count; ++e, dst += im.channels) {
      for (int64_t b = b0; b < b1; ++b) {
        const __m512 acc = _mm512_loadu_ps(conv + (b - b0) * stride + e * kBlock);
        _mm512_mask_storeu_ps(dst + (b - b0) * kBlock, cpu::first_lanes(im.lanes(b)),
                              epilogue16(ep, b * kBlock, acc, act));
      }
    }
    return;
  }
  planes.resize(count * kBlock);
  for (int64_t b = b0; b < b1; ++b) {  // back to planes, then the epilogue along each plane
    cpu::block_to_planes(conv + (b - b0) * stride, count, planes.data(), count, im.lanes(b));
    for (int64_t l = 0; l < im.lanes(b); ++l) {
      ep.apply_channel(b * kBlock + l, planes.data() + l * count,
                       y + im.offset(b, first) + l * im.h * im.w, count, act);
    }
  }
}

template <typename Act>
CNNKERNELS_TARGET_AVX512 void forward_tasks(const float* x, float* y, const float* wv,
                                            const Epilogue<float>& ep, const DepthwiseGeometry& g,
                                            bool channels_last, const Tasks& tasks, int64_t begin,
                                            int64_t end, const Act& act) {
  std::vector<float> buf, conv, planes;
  const int64_t taps = g.kh * g.kw;
  for (int64_t index = begin; index < end; ++index) {
    const Tasks::Task t = tasks[index];
    const Image in{t.n, g.c, g.h, g.w, channels_last}, out{t.n, g.c, g.oh, g.ow, channels_last};
    const Window win = input_window(g, t.row0, t.row1);
    const int64_t pixels = (t.row1 - t.row0) * g.ow;
    for (int64_t b0 = t.b0; b0 < t.b1; b0 += tasks.at_once) {
      const int64_t b1 = std::min(t.b1, b0 + tasks.at_once);
      buf.resize((b1 - b0) * win.size());
      conv.resize((b1 - b0) * pixels * kBlock);
      load_windows(x, in, b0, b1, win, g.pw, buf.data());
      for (int64_t b = b0; b < b1; ++b) {
        conv_strip(buf.data() + (b - b0) * win.size(), win, g, wv + b * taps * kBlock, t.row0,
                   t.row1, conv.data() + (b - b0) * pixels * kBlock);
      }
      store_outputs(conv.data(), pixels * kBlock, y, out, b0, b1, t.row0 * g.ow, pixels, ep,
                    planes, act);
    }
  }
}

// --- channels_last forward, straight from the input ---
//
// In channels_last a pixel's 16 channels already form a vector: the taps read the input where it
// lies (no window copy) and the epilogue writes the output from the accumulators, one pass each
// way as oneDNN's channels_last kernel does. Output pixels whose taps all fall inside the image run
// 8 at a time; those at the left and right edges one at a time with their taps clipped.

// The taps [lo, hi) of one dimension that land inside [0, size) from position `start`.
struct TapRange {
  int64_t lo, hi;
};

inline TapRange taps_inside(int64_t start, int64_t dilation, int64_t taps, int64_t size) {
  const int64_t lo = start >= 0 ? 0 : (-start + dilation - 1) / dilation;
  const int64_t hi = start > size - 1 ? 0 : std::min(taps, (size - 1 - start) / dilation + 1);
  return {std::min(lo, taps), std::max(std::min(lo, taps), hi)};
}

// dst[r * pixel_out] = epilogue(sum over taps (i, j) in rows x cols of
// w[i][j] * src[i*row_step + j*col_step + r*pixel_step]) for r < RB, channels [c0, c0 + 16) (lanes
// past `mask` neither read nor written); src and wv point at the first tap in range, `kw` is the
// weights' row length. The accumulators never leave registers.
template <int RB, typename Act>
CNNKERNELS_TARGET_AVX512 CNNKERNELS_ALWAYS_INLINE void conv_pixels_direct(
    const float* src, __mmask16 mask, const float* wv, int64_t kw, TapRange rows, TapRange cols,
    int64_t row_step, int64_t col_step, int64_t pixel_step, const Epilogue<float>& ep, int64_t c0,
    float* dst, int64_t pixel_out, const Act& act) {
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < rows.hi - rows.lo; ++i) {
    for (int64_t j = 0; j < cols.hi - cols.lo; ++j) {
      const __m512 w = _mm512_loadu_ps(wv + (i * kw + j) * kBlock);
      const float* s = src + i * row_step + j * col_step;
      for (int r = 0; r < RB; ++r) {
        acc[r] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask, s + r * pixel_step), acc[r]);
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    _mm512_mask_storeu_ps(dst + r * pixel_out, mask, epilogue16(ep, c0, acc[r], act));
  }
}

// The output columns [first, last) whose taps all fall inside the image.
inline std::pair<int64_t, int64_t> interior_columns(const DepthwiseGeometry& g) {
  const int64_t first = std::min(g.ow, (g.pw + g.sw - 1) / g.sw);
  const int64_t reach = g.w - 1 + g.pw - g.dw * (g.kw - 1);  // largest ow*sw of an interior pixel
  return {first, std::max(first, reach < 0 ? 0 : std::min(g.ow, reach / g.sw + 1))};
}

// Output row oh of image n, every channel block. For each run of output pixels the blocks are
// the inner loop, so input and output are walked in memory order (pixel, then channel): looping
// over pixels inside a block instead touches one cache line per 2-4 KB and was 2x slower.
template <typename Act>
CNNKERNELS_TARGET_AVX512 void forward_direct_row(const float* x, float* y, const float* wv,
                                                 const Epilogue<float>& ep,
                                                 const DepthwiseGeometry& g, int64_t n, int64_t oh,
                                                 const Act& act) {
  const int64_t blocks = block_count(g.c), taps = g.kh * g.kw;
  const int64_t ih0 = oh * g.sh - g.ph;
  const TapRange rows = taps_inside(ih0, g.dh, g.kh, g.h);
  const int64_t row_step = g.dh * g.w * g.c, col_step = g.dw * g.c, pixel_step = g.sw * g.c;
  float* y_row = y + (n * g.oh + oh) * g.ow * g.c;
  // RB pixels from ow, taps `cols`, every block
#define CNNKERNELS_DIRECT_PIXELS(RB, COLS)                                                       \
  do {                                                                                           \
    const int64_t iw0 = ow * g.sw - g.pw;                                                        \
    const float* first = x + ((n * g.h + ih0 + rows.lo * g.dh) * g.w + iw0 + (COLS).lo * g.dw) * g.c; \
    for (int64_t b = 0; b < blocks; ++b) {                                                       \
      const int64_t c0 = b * kBlock, lanes = std::min(kBlock, g.c - c0);                         \
      conv_pixels_direct<RB>(first + c0, cpu::first_lanes(lanes),                                \
                             wv + (b * taps + rows.lo * g.kw + (COLS).lo) * kBlock, g.kw, rows,  \
                             COLS, row_step, col_step, pixel_step, ep, c0,                       \
                             y_row + ow * g.c + c0, g.c, act);                                   \
    }                                                                                            \
  } while (0)
  const auto [ow_a, ow_b] = interior_columns(g);
  const TapRange all_cols{0, g.kw};
  for (int64_t ow = 0; ow < ow_a; ++ow) {
    const TapRange cols = taps_inside(ow * g.sw - g.pw, g.dw, g.kw, g.w);
    CNNKERNELS_DIRECT_PIXELS(1, cols);
  }
  int64_t ow = ow_a;
  for (; ow + 8 <= ow_b; ow += 8) CNNKERNELS_DIRECT_PIXELS(8, all_cols);
  if (ow + 4 <= ow_b) { CNNKERNELS_DIRECT_PIXELS(4, all_cols); ow += 4; }
  if (ow + 2 <= ow_b) { CNNKERNELS_DIRECT_PIXELS(2, all_cols); ow += 2; }
  if (ow < ow_b) { CNNKERNELS_DIRECT_PIXELS(1, all_cols); ++ow; }
  for (; ow < g.ow; ++ow) {
    const TapRange cols = taps_inside(ow * g.sw - g.pw, g.dw, g.kw, g.w);
    CNNKERNELS_DIRECT_PIXELS(1, cols);
  }
#undef CNNKERNELS_DIRECT_PIXELS
}

template <typename Act>
CNNKERNELS_TARGET_AVX512 void forward_direct_rows(const float* x, float* y, const float* wv,
                                                  const Epilogue<float>& ep,
                                                  const DepthwiseGeometry& g, int64_t begin,
                                                  int64_t end, const Act& act) {
  for (int64_t row = begin; row < end; ++row) {
    forward_direct_row(x, y, wv, ep, g, row / g.oh, row % g.oh, act);
  }
}

// channels_last x and y; wv from weight_blocks.
template <typename Act>
void forward_direct(const float* x, const std::vector<float>& wv, const Epilogue<float>& ep,
                           float* y, const DepthwiseGeometry& g, Act act) {
  at::parallel_for(0, g.n * g.oh, 1, [&](int64_t begin, int64_t end) {
    forward_direct_rows(x, y, wv.data(), ep, g, begin, end, act);
  });
}

// x, y in the layout channels_last says; wv from weight_blocks, ep padded to whole blocks.
template <typename Act>
void forward_pointers(const float* x, const std::vector<float>& wv, const Epilogue<float>& ep,
                      float* y, const DepthwiseGeometry& g, bool channels_last, Act act) {
  // channels_last in place when most output columns are interior; otherwise (7x7 and 5x5 kernels
  // on 7x7 planes: one interior column of seven) the edge pixels, one at a time with clipped
  // taps, cost more than copying into padded windows
  const auto [first, last] = interior_columns(g);
  if (channels_last && 2 * (last - first) >= g.ow) {
    forward_direct(x, wv, ep, y, g, act);
    return;
  }
  const Tasks tasks = split_output_rows(g, channels_last);
  at::parallel_for(0, tasks.count(), 1, [&](int64_t begin, int64_t end) {
    forward_tasks(x, y, wv.data(), ep, g, channels_last, tasks, begin, end, act);
  });
}

template <typename Act>
void forward(const at::Tensor& x, const at::Tensor& weight, const Epilogue<float>& ep,
             const at::Tensor& out, const DepthwiseGeometry& g, bool channels_last, Act act) {
  forward_pointers(x.const_data_ptr<float>(),
                   weight_blocks(weight.const_data_ptr<float>(), g.c, g.kh * g.kw),
                   ep.padded_to_blocks(), out.mutable_data_ptr<float>(), g, channels_last, act);
}

// --- grad_input: every output pixel's gradient scattered onto the taps it read ---

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The output rows [lo, hi) whose taps reach input rows [ih0, ih1).
struct OutputRows {
  int64_t lo, hi;
};

inline OutputRows rows_reaching(const DepthwiseGeometry& g, int64_t ih0, int64_t ih1) {
  const int64_t lo = std::max<int64_t>(0, floor_div(ih0 + g.ph - g.dh * (g.kh - 1) + g.sh - 1, g.sh));
  const int64_t hi = std::min(g.oh, floor_div(ih1 - 1 + g.ph, g.sh) + 1);
  return {lo, std::max(lo, hi)};
}

// Columns of the gradient buffer, from -pw: every column a tap reaches and every image column.
inline int64_t gradient_cols(const DepthwiseGeometry& g) { return std::max(window_cols(g), g.w + g.pw); }

// dbuf[(oh*sh - ph + i*dh) - row0][ow*sw + j*dw] += w[i][j] * grad[oh][ow] for oh in rows.
CNNKERNELS_TARGET_AVX512 void scatter_strip(const float* grad, const OutputRows& rows,
                                            const DepthwiseGeometry& g, const float* wv,
                                            int64_t row0, int64_t cols, float* dbuf) {
  const int64_t pitch = cols * kBlock;
  for (int64_t oh = rows.lo; oh < rows.hi; ++oh) {
    float* base = dbuf + (oh * g.sh - g.ph - row0) * pitch;
    for (int64_t ow = 0; ow < g.ow; ++ow) {
      const __m512 go = _mm512_loadu_ps(grad + ((oh - rows.lo) * g.ow + ow) * kBlock);
      for (int64_t i = 0; i < g.kh; ++i) {
        float* drow = base + i * g.dh * pitch + ow * g.sw * kBlock;
        for (int64_t j = 0; j < g.kw; ++j) {
          float* d = drow + j * g.dw * kBlock;
          const __m512 w = _mm512_loadu_ps(wv + (i * g.kw + j) * kBlock);
          _mm512_storeu_ps(d, _mm512_fmadd_ps(w, go, _mm512_loadu_ps(d)));
        }
      }
    }
  }
}

CNNKERNELS_TARGET_AVX512 void backward_input_tasks(const float* gp, float* dxp, const float* wv,
                                                   const DepthwiseGeometry& g, bool channels_last,
                                                   const Tasks& tasks, int64_t begin, int64_t end) {
  std::vector<float> grad, dbuf;
  const int64_t cols = gradient_cols(g), taps = g.kh * g.kw;
  for (int64_t index = begin; index < end; ++index) {
    const Tasks::Task t = tasks[index];  // rows: input rows
    const Image go{t.n, g.c, g.oh, g.ow, channels_last}, dx{t.n, g.c, g.h, g.w, channels_last};
    const OutputRows rows = rows_reaching(g, t.row0, t.row1);
    // buffer rows: the strip's, and every row the contributing outputs' taps reach
    const int64_t row0 = std::min(t.row0, rows.lo * g.sh - g.ph);
    const int64_t row1 = std::max(t.row1, (rows.hi - 1) * g.sh - g.ph + g.dh * (g.kh - 1) + 1);
    const int64_t size = (row1 - row0) * cols * kBlock, pixels = (rows.hi - rows.lo) * g.ow;
    for (int64_t b0 = t.b0; b0 < t.b1; b0 += tasks.at_once) {
      const int64_t b1 = std::min(t.b1, b0 + tasks.at_once);
      dbuf.resize((b1 - b0) * size);
      cpu::zero_block(dbuf.data(), (b1 - b0) * (row1 - row0) * cols);
      if (pixels > 0) {
        grad.resize((b1 - b0) * pixels * kBlock);
        to_blocks(gp, go, b0, b1, rows.lo * g.ow, pixels, grad.data(), pixels * kBlock);
        for (int64_t b = b0; b < b1; ++b) {
          scatter_strip(grad.data() + (b - b0) * pixels * kBlock, rows, g, wv + b * taps * kBlock,
                        row0, cols, dbuf.data() + (b - b0) * size);
        }
      }
      for (int64_t ih = t.row0; ih < t.row1; ++ih) {
        from_blocks(dbuf.data() + ((ih - row0) * cols + g.pw) * kBlock, size, dxp, dx, b0, b1,
                    ih * g.w, g.w);
      }
    }
  }
}

// At stride 1, grad_input is the forward convolution of grad_output with the taps reversed and
// padding dilation * (kernel - 1) - padding (when that is not negative).
bool is_transposable(const DepthwiseGeometry& g) {
  return g.sh == 1 && g.sw == 1 && g.ph <= g.dh * (g.kh - 1) && g.pw <= g.dw * (g.kw - 1);
}

DepthwiseGeometry transposed(const DepthwiseGeometry& g) {
  DepthwiseGeometry t = g;
  t.h = g.oh, t.w = g.ow, t.oh = g.h, t.ow = g.w;
  t.ph = g.dh * (g.kh - 1) - g.ph, t.pw = g.dw * (g.kw - 1) - g.pw;
  return t;
}

std::vector<float> reversed_taps(const float* w, int64_t channels, int64_t taps) {
  std::vector<float> r(channels * taps);
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t t = 0; t < taps; ++t) r[c * taps + t] = w[c * taps + taps - 1 - t];
  }
  return r;
}

void backward_input(const at::Tensor& grad_output, const at::Tensor& weight,
                    const at::Tensor& grad_input, const DepthwiseGeometry& g, bool channels_last) {
  if (is_transposable(g)) {  // a forward pass: no scatter
    const int64_t taps = g.kh * g.kw;
    const std::vector<float> wv =
        weight_blocks(reversed_taps(weight.const_data_ptr<float>(), g.c, taps).data(), g.c, taps);
    const Epilogue<float> plain{std::vector<float>(g.c, 0.f), {}, {}, false};
    forward_pointers(grad_output.const_data_ptr<float>(), wv, plain.padded_to_blocks(),
                     grad_input.mutable_data_ptr<float>(), transposed(g), channels_last, Identity{});
    return;
  }
  // strips of input rows; a buffer row per input row (plus the halo)
  const Tasks tasks = split_work(g, channels_last, g.h, gradient_cols(g) * kBlock * int64_t(sizeof(float)),
                                 [](int64_t window_rows) { return window_rows; });
  const std::vector<float> wv = weight_blocks(weight.const_data_ptr<float>(), g.c, g.kh * g.kw);
  const float* gp = grad_output.const_data_ptr<float>();
  float* dxp = grad_input.mutable_data_ptr<float>();
  at::parallel_for(0, tasks.count(), 1, [&](int64_t begin, int64_t end) {
    backward_input_tasks(gp, dxp, wv.data(), g, channels_last, tasks, begin, end);
  });
}

// --- grad_weight: per task partial sums, added in a fixed order ---

// sums[t][l] += sum over the strip's output pixels of grad * input at tap t.
CNNKERNELS_TARGET_AVX512 void weight_grad_strip(const float* buf, const Window& win,
                                                const float* grad, const DepthwiseGeometry& g,
                                                int64_t rows, double* sums) {
  const int64_t pitch = win.cols * kBlock, pixel_step = g.sw * kBlock;
  alignas(64) float lane_sums[kBlock];
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                       _mm512_setzero_ps()};
      for (int64_t r = 0; r < rows; ++r) {
        const float* xrow = buf + (r * g.sh + i * g.dh) * pitch + j * g.dw * kBlock;
        const float* grow = grad + r * g.ow * kBlock;
        int64_t ow = 0;
        for (; ow + 4 <= g.ow; ow += 4) {
          for (int q = 0; q < 4; ++q) {
            acc[q] = _mm512_fmadd_ps(_mm512_loadu_ps(grow + (ow + q) * kBlock),
                                     _mm512_loadu_ps(xrow + (ow + q) * pixel_step), acc[q]);
          }
        }
        for (; ow < g.ow; ++ow) {
          acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(grow + ow * kBlock),
                                   _mm512_loadu_ps(xrow + ow * pixel_step), acc[0]);
        }
      }
      _mm512_store_ps(lane_sums, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]),
                                               _mm512_add_ps(acc[2], acc[3])));
      double* s = sums + (i * g.kw + j) * kBlock;
      for (int64_t l = 0; l < kBlock; ++l) s[l] += lane_sums[l];
    }
  }
}

// The same for tap rows [i0, i0 + TR) of a kernel KW wide: all TR * KW sums stay in registers
// over the strip's pixels, each pixel's gradient loaded once for all of them (the per-tap loop
// above loads it once per tap, and its 4 sums are too few to hide the FMA latency).
template <int TR, int KW>
CNNKERNELS_TARGET_AVX512 void weight_grad_strip_rows(const float* buf, const Window& win,
                                                     const float* grad, const DepthwiseGeometry& g,
                                                     int64_t rows, int64_t i0, double* sums) {
  const int64_t pitch = win.cols * kBlock, pixel_step = g.sw * kBlock, col_step = g.dw * kBlock;
  __m512 acc[TR * KW];
  for (int a = 0; a < TR * KW; ++a) acc[a] = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xrow = buf + (r * g.sh + i0 * g.dh) * pitch;
    const float* grow = grad + r * g.ow * kBlock;
    for (int64_t ow = 0; ow < g.ow; ++ow) {
      const __m512 go = _mm512_loadu_ps(grow + ow * kBlock);
      const float* xp = xrow + ow * pixel_step;
      for (int i = 0; i < TR; ++i) {
        for (int j = 0; j < KW; ++j) {
          acc[i * KW + j] = _mm512_fmadd_ps(go, _mm512_loadu_ps(xp + i * g.dh * pitch + j * col_step),
                                            acc[i * KW + j]);
        }
      }
    }
  }
  alignas(64) float lane_sums[kBlock];
  for (int a = 0; a < TR * KW; ++a) {
    _mm512_store_ps(lane_sums, acc[a]);
    double* s = sums + (i0 * KW + a) * kBlock;
    for (int64_t l = 0; l < kBlock; ++l) s[l] += lane_sums[l];
  }
}

// Tap rows TR at a time (as many as 25 registers hold), then one at a time.
template <int TR, int KW>
CNNKERNELS_TARGET_AVX512 void weight_grad_strip_kw(const float* buf, const Window& win,
                                                   const float* grad, const DepthwiseGeometry& g,
                                                   int64_t rows, double* sums) {
  int64_t i = 0;
  for (; i + TR <= g.kh; i += TR) weight_grad_strip_rows<TR, KW>(buf, win, grad, g, rows, i, sums);
  for (; i < g.kh; ++i) weight_grad_strip_rows<1, KW>(buf, win, grad, g, rows, i, sums);
}

CNNKERNELS_TARGET_AVX512 void weight_grad_block(const float* buf, const Window& win,
                                                const float* grad, const DepthwiseGeometry& g,
                                                int64_t rows, double* sums) {
  switch (g.kw) {
    case 3: return weight_grad_strip_kw<3, 3>(buf, win, grad, g, rows, sums);
    case 5: return weight_grad_strip_kw<5, 5>(buf, win, grad, g, rows, sums);
    case 7: return weight_grad_strip_kw<3, 7>(buf, win, grad, g, rows, sums);
    default: return weight_grad_strip(buf, win, grad, g, rows, sums);
  }
}

// partial[(n * strips + strip) * blocks + b][t][l]: the task's sums for its blocks.
CNNKERNELS_TARGET_AVX512 void weight_grad_tasks(const float* gp, const float* xp,
                                                const DepthwiseGeometry& g, bool channels_last,
                                                const Tasks& tasks, int64_t begin, int64_t end,
                                                double* partial) {
  std::vector<float> buf, grad;
  const int64_t taps = g.kh * g.kw;
  for (int64_t index = begin; index < end; ++index) {
    const Tasks::Task t = tasks[index];
    const Image x{t.n, g.c, g.h, g.w, channels_last}, go{t.n, g.c, g.oh, g.ow, channels_last};
    const Window win = input_window(g, t.row0, t.row1);
    const int64_t pixels = (t.row1 - t.row0) * g.ow;
    const int64_t strip_index = t.row0 / tasks.strip;
    double* sums = partial + ((t.n * tasks.strips + strip_index) * tasks.blocks) * taps * kBlock;
    std::fill(sums + t.b0 * taps * kBlock, sums + t.b1 * taps * kBlock, 0.0);  // this task's slots
    for (int64_t b0 = t.b0; b0 < t.b1; b0 += tasks.at_once) {
      const int64_t b1 = std::min(t.b1, b0 + tasks.at_once);
      buf.resize((b1 - b0) * win.size());
      grad.resize((b1 - b0) * pixels * kBlock);
      load_windows(xp, x, b0, b1, win, g.pw, buf.data());
      to_blocks(gp, go, b0, b1, t.row0 * g.ow, pixels, grad.data(), pixels * kBlock);
      for (int64_t b = b0; b < b1; ++b) {
        weight_grad_block(buf.data() + (b - b0) * win.size(), win,
                          grad.data() + (b - b0) * pixels * kBlock, g, t.row1 - t.row0,
                          sums + b * taps * kBlock);
      }
    }
  }
}

void backward_weight(const at::Tensor& grad_output, const at::Tensor& x,
                     const at::Tensor& grad_weight, const DepthwiseGeometry& g,
                     bool channels_last) {
  const Tasks tasks = split_output_rows(g, channels_last);
  const int64_t taps = g.kh * g.kw, parts = g.n * tasks.strips, part = tasks.blocks * taps * kBlock;
  // every slot is zeroed by the task that owns it
  std::unique_ptr<double[]> partial(new double[parts * part]);
  const float* gp = grad_output.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  at::parallel_for(0, tasks.count(), 1, [&](int64_t begin, int64_t end) {
    weight_grad_tasks(gp, xp, g, channels_last, tasks, begin, end, partial.get());
  });
  // images and strips added in order: the same result for any thread count
  std::vector<double> total(partial.get(), partial.get() + part);
  for (int64_t p = 1; p < parts; ++p) {
    const double* src = partial.get() + p * part;
    for (int64_t e = 0; e < part; ++e) total[e] += src[e];
  }
  float* dw = grad_weight.mutable_data_ptr<float>();
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t t = 0; t < taps; ++t) {
      dw[c * taps + t] = static_cast<float>(total[((c / kBlock) * taps + t) * kBlock + c % kBlock]);
    }
  }
}

}  // namespace blocked
#endif  // CNNKERNELS_X86

// The channel-blocked kernels serve float32 with multiplier 1 on AVX-512 CPUs.
bool use_blocked(const DepthwiseGeometry& g, at::ScalarType dtype) {
#if CNNKERNELS_X86
  return dtype == at::kFloat && g.multiplier == 1 && cpu::has_avx512();
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
          blocked::forward(xc, wc, ep, out, g, channels_last, act);
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
    blocked::backward_input(grad_output.contiguous(format), weight.contiguous(), grad_input, g,
                            channels_last);
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
    blocked::backward_weight(grad_output.contiguous(format), x.contiguous(format), grad_weight, g,
                             format == at::MemoryFormat::ChannelsLast);
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
