// CPU kernel of pointwise_conv2d (schema and math: ../pointwise_conv2d.cpp).
//
// The 1×1 convolution is a GEMM per image and group: NCHW y[n, g] = W_g [Cog, Cig] · x[n, g]
// [Cig, H·W]; channels_last Y [N·H·W, C_out] = X [N·H·W, C_in] · W_gᵀ per group's columns. Both are
// cut into output tiles of about kTileBytes (columns of the plane in NCHW, rows of pixels in
// channels_last). Each tile is computed by BLAS (at::mm_out into a strided view of y, no copy) and
// the epilogue act(fma(z, scale, shift) + residual) rewrites it in place while it is still in L2,
// so the output reaches memory once: eager Conv → BN → act writes and reads it three times.
//
// float32 (and bfloat16 on CPUs with native bfloat16) goes to oneDNN instead where ATen has it
// (every x86 build): its convolution with the scale folded into the weight, shift + bias as its
// bias and the activation (and residual add) as post-ops, the same fused convolution Inductor's
// CPU backend calls. It matches or beats the tiles and conv-then-epilogue paths on every measured
// layer, by up to 1.75x in channels_last.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <cmath>
#include <optional>

#include "../pointwise_conv2d.h"
#include "cnnkernels/activation.h"
#include "cnnkernels/cpu/map.h"

namespace cnnkernels {
namespace {

constexpr int64_t kTileBytes = 1024 * 1024;  // one output tile: stays in L2/L3 until its epilogue

template <typename T>
struct Epilogue {
  using F = at::opmath_type<T>;
  const F* scale;  // [C_out]
  const F* shift;  // [C_out]: shift + bias
};

// NCHW tile: `rows` output channels starting at `channel`, `len` contiguous values each, rows
// `row_stride` apart.
template <bool kResidual, typename T, typename Act>
void epilogue_planes(T* y, const T* residual, int64_t rows, int64_t row_stride, int64_t len,
                     int64_t channel, const Epilogue<T>& e, const Act& act) {
  using F = at::opmath_type<T>;
  // cpu::map1/map2: the loop compiled for AVX-512/AVX2+FMA (an extension is built for baseline
  // x86-64, where std::fma is a library call), half/bfloat16 through float chunks in L1.
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const F a = e.scale[channel + row], b = e.shift[channel + row];
      T* p = y + row * row_stride;
      if constexpr (kResidual) {
        cpu::map2(p, residual + row * row_stride, p, len,
                  [a, b, act](F v, F r) { return act.forward(std::fma(v, a, b) + r); }, false);
      } else {
        cpu::map1(p, p, len, [a, b, act](F v) { return act.forward(std::fma(v, a, b)); }, false);
      }
    }
  });
}

// channels_last tile: `rows` pixels of `channels` contiguous output channels each.
template <bool kResidual, typename T, typename Act>
void epilogue_pixels(T* y, const T* residual, int64_t rows, int64_t channels,
                     const Epilogue<T>& e, const Act& act) {
  using F = at::opmath_type<T>;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(channels, 1)),
                   [&](int64_t r0, int64_t r1) {
    cpu::run_with_best_isa([&] {  // vectorised across channels for the CPU's best ISA
      for (int64_t row = r0; row < r1; ++row) {
        T* p = y + row * channels;
        const T* q = kResidual ? residual + row * channels : nullptr;
        for (int64_t c = 0; c < channels; ++c) {
          F pre = std::fma(static_cast<F>(p[c]), e.scale[c], e.shift[c]);
          if constexpr (kResidual) pre += static_cast<F>(q[c]);
          p[c] = static_cast<T>(act.forward(pre));
        }
      }
    });
  });
}

struct Problem {
  at::Tensor x, w, y, residual;  // x: strided-sampled, dense in y's format; w: [C_out, Cig]
  int64_t groups;
};

template <bool kResidual, typename T, typename Act>
void run_planes(const Problem& p, const Epilogue<T>& e, const Act& act) {
  const int64_t batch = p.y.size(0), out_channels = p.y.size(1);
  const int64_t plane = p.y.size(2) * p.y.size(3);
  const int64_t cig = p.x.size(1) / p.groups, cog = out_channels / p.groups;
  const int64_t cols = std::max<int64_t>(64, kTileBytes / (cog * static_cast<int64_t>(sizeof(T))));
  T* y = p.y.mutable_data_ptr<T>();
  const T* r = kResidual ? p.residual.const_data_ptr<T>() : nullptr;
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t g = 0; g < p.groups; ++g) {
      const at::Tensor xg = p.x[n].narrow(0, g * cig, cig).view({cig, plane});
      const at::Tensor yg = p.y[n].narrow(0, g * cog, cog).view({cog, plane});
      const at::Tensor wg = p.w.narrow(0, g * cog, cog);
      const int64_t first = (n * out_channels + g * cog) * plane;
      for (int64_t c0 = 0; c0 < plane; c0 += cols) {
        const int64_t len = std::min(cols, plane - c0);
        at::Tensor tile = yg.narrow(1, c0, len);
        at::mm_out(tile, wg, xg.narrow(1, c0, len));
        epilogue_planes<kResidual>(y + first + c0, kResidual ? r + first + c0 : nullptr, cog,
                                   plane, len, g * cog, e, act);
      }
    }
  }
}

template <bool kResidual, typename T, typename Act>
void run_pixels(const Problem& p, const Epilogue<T>& e, const Act& act) {
  const int64_t out_channels = p.y.size(1), in_channels = p.x.size(1);
  const int64_t pixels = p.y.size(0) * p.y.size(2) * p.y.size(3);
  const int64_t cig = in_channels / p.groups, cog = out_channels / p.groups;
  const at::Tensor x2 = p.x.permute({0, 2, 3, 1}).reshape({pixels, in_channels});  // a view
  const at::Tensor y2 = p.y.permute({0, 2, 3, 1}).view({pixels, out_channels});
  const int64_t rows =
      std::max<int64_t>(16, kTileBytes / (out_channels * static_cast<int64_t>(sizeof(T))));
  T* y = p.y.mutable_data_ptr<T>();
  const T* r = kResidual ? p.residual.const_data_ptr<T>() : nullptr;
  for (int64_t r0 = 0; r0 < pixels; r0 += rows) {
    const int64_t len = std::min(rows, pixels - r0);
    for (int64_t g = 0; g < p.groups; ++g) {
      at::Tensor tile = y2.narrow(0, r0, len).narrow(1, g * cog, cog);
      at::mm_out(tile, x2.narrow(0, r0, len).narrow(1, g * cig, cig),
                 p.w.narrow(0, g * cog, cog).t());
    }
    epilogue_pixels<kResidual>(y + r0 * out_channels,
                               kResidual ? r + r0 * out_channels : nullptr, len, out_channels, e,
                               act);
  }
}

// The epilogue in place over a whole output z (z becomes the output), one pass.
template <bool kResidual, typename T, typename Act>
void epilogue_in_place(at::Tensor& z, at::MemoryFormat format, const at::Tensor& residual,
                       const Epilogue<T>& e, const Act& act) {
  const int64_t batch = z.size(0), out_channels = z.size(1), plane = z.size(2) * z.size(3);
  T* y = z.mutable_data_ptr<T>();
  const T* r = kResidual ? residual.const_data_ptr<T>() : nullptr;
  if (format == at::MemoryFormat::ChannelsLast) {
    epilogue_pixels<kResidual>(y, r, batch * plane, out_channels, e, act);
  } else {
    for (int64_t n = 0; n < batch; ++n) {
      const int64_t first = n * out_channels * plane;
      epilogue_planes<kResidual>(y + first, kResidual ? r + first : nullptr, out_channels, plane,
                                 plane, 0, e, act);
    }
  }
}

// oneDNN's convolution for the whole GEMM into z, then the epilogue in place over z in one pass:
// better than BLAS tiles where planes are small or K is large.
at::Tensor plain_conv(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                      int64_t groups, at::MemoryFormat format) {
  const std::vector<int64_t> strides{stride, stride}, zeros{0, 0}, ones{1, 1};
  return at::conv2d(x, weight, std::optional<at::Tensor>(), strides, zeros, ones, groups)
      .contiguous(format);
}

// --- oneDNN's fused convolution --------------------------------------------------------------

// mkldnn::_convolution_pointwise (and its .binary overload for the residual add): ATen's oneDNN
// convolution with post-ops. Looked up at run time (a torch built without oneDNN has no such op:
// our own paths run instead) and called boxed, so this file does not depend on the op's C++
// signature, only on its schema (as printed by torch 2.14; not yet run on another version).
const std::optional<c10::OperatorHandle>& onednn_op(bool binary) {
  static const std::optional<c10::OperatorHandle> unary =
      c10::Dispatcher::singleton().findOp({"mkldnn::_convolution_pointwise", ""});
  static const std::optional<c10::OperatorHandle> with_add =
      c10::Dispatcher::singleton().findOp({"mkldnn::_convolution_pointwise", "binary"});
  return binary ? with_add : unary;
}

// Whether oneDNN's post-op computes our activation exactly, NaN included. Its ReLU (alpha 0), clip
// (hardtanh, our ReLU6) and hardsigmoid are max/min instructions that return 0 for a NaN input
// (seen with oneDNN 3.12 in torch 2.14.1, NCHW and channels_last, and for the .binary overload's
// add + ReLU), where torch.relu(nan) is nan: those run as our own pass over the output instead.
// Leaky ReLU selects x·slope by a comparison, and hardswish multiplies by x: NaN stays NaN.
bool onednn_post_op_exact(int64_t activation) {
  switch (activation_from_int(activation)) {
    case Activation::Identity:
    case Activation::LeakyReLU:
    case Activation::HardSwish: return true;
    default: return false;
  }
}

// The post-op name and scalars oneDNN applies ("none" where our pass applies the activation
// after it); nullopt where the .binary overload cannot follow the add with it.
std::optional<std::pair<std::string, c10::List<std::optional<at::Scalar>>>> onednn_post_op(
    int64_t activation, double negative_slope, bool residual) {
  c10::List<std::optional<at::Scalar>> scalars;
  if (!onednn_post_op_exact(activation)) return std::make_pair(std::string("none"), scalars);
  switch (activation_from_int(activation)) {
    case Activation::Identity: return std::make_pair(std::string("none"), scalars);
    default: break;
  }
  if (residual) return std::nullopt;
  switch (activation_from_int(activation)) {
    case Activation::LeakyReLU:
      scalars.push_back(at::Scalar(negative_slope));
      return std::make_pair(std::string("leaky_relu"), scalars);
    case Activation::HardSwish: return std::make_pair(std::string("hardswish"), scalars);
    default: return std::nullopt;
  }
}

// act(y) in place over a dense output, with our functors (NaN propagated as in torch).
void activation_in_place(at::Tensor& y, int64_t activation, double negative_slope) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "cnnkernels_pointwise_conv2d_activation", [&] {
    using F = at::opmath_type<scalar_t>;
    scalar_t* p = y.mutable_data_ptr<scalar_t>();
    dispatch_activation(activation, negative_slope, [&](auto act) {
      at::parallel_for(0, y.numel(), 16384, [&](int64_t begin, int64_t end) {
        cpu::map1(p + begin, p + begin, end - begin, [act](F v) { return act.forward(v); },
                  false);
      });
    });
  });
}

// float32 always; bfloat16 where the CPU has native bfloat16 dot products (oneDNN's own test,
// mkldnn::_is_mkldnn_bf16_supported): elsewhere oneDNN emulates them slowly. float16 and float64
// stay on our paths (oneDNN has no float64 convolution, and float16 needs AVX512-FP16).
bool onednn_supports(at::ScalarType dtype) {
  if (dtype == at::kFloat) return true;
  if (dtype != at::kBFloat16) return false;
  static const bool bf16 = [] {
    const auto op = c10::Dispatcher::singleton().findOp({"mkldnn::_is_mkldnn_bf16_supported", ""});
    if (!op.has_value()) return false;
    torch::jit::Stack stack;
    op->callBoxed(stack);
    return stack.at(0).toBool();
  }();
  return bf16;
}

bool onednn_usable(const at::Tensor& x, int64_t activation, bool residual) {
  // .binary in bfloat16 may fall back to ATen's add_relu, which has no bfloat16 kernel.
  const bool supported = residual ? x.scalar_type() == at::kFloat
                                  : onednn_supports(x.scalar_type());
  return supported && at::hasMKLDNN() &&
         at::globalContext().userEnabledMkldnn() && onednn_op(residual).has_value() &&
         onednn_post_op(activation, 0.0, residual).has_value();
}

// act(conv(x, scale·W) + (shift + bias) [+ residual]) in one oneDNN call; the output in `format`.
at::Tensor onednn_conv(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                       int64_t groups, at::MemoryFormat format, const at::Tensor& residual,
                       const at::Tensor& scale, const at::Tensor& shift, int64_t activation,
                       double negative_slope) {
  const bool has_residual = residual.defined();
  auto [attr, scalars] = *onednn_post_op(activation, negative_slope, has_residual);
  // Folded in float, rounded once to the input's type (the bias stays float).
  const at::Tensor folded = (weight.to(scale.scalar_type()) * scale.view({-1, 1, 1, 1}))
                                .to(x.scalar_type());
  const c10::List<int64_t> zeros({0, 0}), strides({stride, stride}), ones({1, 1});
  torch::jit::Stack stack{x.contiguous(format)};
  if (has_residual) stack.emplace_back(residual);
  stack.insert(stack.end(), {folded, shift, zeros, strides, ones, groups});
  if (has_residual) {  // binary_attr, alpha, unary_attr, unary_scalars, unary_algorithm
    stack.insert(stack.end(), {std::string("add"), c10::IValue(),
                               attr == "none" ? c10::IValue() : c10::IValue(attr), scalars,
                               c10::IValue()});
  } else {  // attr, scalars, algorithm
    stack.insert(stack.end(), {attr, scalars, c10::IValue()});
  }
  onednn_op(has_residual)->callBoxed(stack);
  at::Tensor y = stack.at(0).toTensor().contiguous(format);
  if (!onednn_post_op_exact(activation)) activation_in_place(y, activation, negative_slope);
  return y;
}

// --- choosing the GEMM ------------------------------------------------------------------------

enum class Gemm { kOneDnn, kTiles, kConv, kMatmul };

// An NCHW 1x1 convolution with stride 1 and one group as one batched BLAS GEMM,
// y[n] = W · x[n], then (when there is one) the epilogue in place over y. Without an epilogue
// (the convolution of a training Conv → BN, whose BatchNorm needs batch statistics first) this
// ran 1.0-1.35x faster than ATen's oneDNN convolution of the same NCHW layers on the 2-vCPU dev
// VM (round-robin, batch 8: 24->144@56² 2.95 vs 3.94 ms, 144->24@56² 3.49 vs 4.75 ms,
// 512->128@28² 8.28 vs 9.77 ms): oneDNN reorders NCHW to its blocked layout and back. On planes
// under 28x28 oneDNN is as fast or faster (14²: 0.95-1.04x, 7²: 0.83-0.90x, forward + backward);
// the same rule as matmul_applies in ops/pointwise_conv2d.py. With an epilogue (inference
// Conv-BN-act) the extra pass over y is cheap while y stays in the cache, and oneDNN's fused
// post-ops win once it does not: eval Conv-BN-ReLU vs oneDNN's fused convolution, outputs of
// 2.4-6.4 MiB 1.22-1.40x faster, 12.8 MiB even, 14.5-25.7 MiB 0.84-0.87x.
constexpr int64_t kMatmulMinPlane = 28 * 28;
constexpr int64_t kMatmulMaxEpilogueBytes = 8 * 1024 * 1024;

bool matmul_applies(const at::Tensor& x, int64_t stride, int64_t groups, bool trivial_epilogue,
                    int64_t output_bytes) {
  const auto dtype = x.scalar_type();
  return stride == 1 && groups == 1 && x.is_contiguous() &&
         x.size(2) * x.size(3) >= kMatmulMinPlane &&
         (dtype == at::kFloat || dtype == at::kDouble) &&
         (trivial_epilogue || output_bytes <= kMatmulMaxEpilogueBytes);
}

at::Tensor matmul_conv(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t batch = x.size(0), in_channels = x.size(1), plane = x.size(2) * x.size(3);
  at::Tensor y = at::empty({batch, weight.size(0), x.size(2), x.size(3)}, x.options());
  at::Tensor y3 = y.view({batch, weight.size(0), plane});
  // bmm over the expanded weight (at::matmul of a 2-D and a 3-D tensor may fold the batch into
  // one mm through transposed copies)
  at::bmm_out(y3, weight.reshape({weight.size(0), in_channels}).expand({batch, -1, -1}),
              x.view({batch, in_channels, plane}));
  return y;
}

// oneDNN's fused convolution where it applies (float32, supported post-ops). Otherwise: BLAS tiles
// win on large planes with a small reduction (MobileNet expansions: the GEMM is memory-bound and
// its output never leaves the cache); oneDNN's plain convolution then our epilogue wins on small
// planes (per-image GEMMs too small for BLAS) and large reductions. Measured on the 2-vCPU dev VM.
// NCHW convolutions with stride 1 and one group on planes of 28x28 or more are one batched BLAS
// GEMM (matmul_applies), plus our epilogue pass when the output fits in the cache.
// CNNKERNELS_POINTWISE_GEMM=onednn|tiles|conv forces a path (tests, benchmarks); onednn only
// where it applies.
// oneDNN's fused convolution costs 60-100 us per call more than ATen's conv2d, from a 2x8x4x4 input
// to batch-1 MobileNet layers (the op is meant for prepacked weights; given plain ones it builds its
// primitive and weight layout per call), so it pays only on outputs large enough for its fused
// post-ops to save that much memory traffic.
constexpr int64_t kOneDnnMinOutputBytes = 256 * 1024;

Gemm choose_gemm(const at::Tensor& x, const std::vector<int64_t>& out_size, int64_t reduction,
                 int64_t activation, bool residual, bool matmul, int64_t output_bytes) {
  // no input channels: the GEMM is zeros, which the tiles' BLAS calls give in the output's shape
  // (ATen's conv2d returns no output channels there, and oneDNN has no primitive for it)
  if (reduction == 0) return Gemm::kTiles;
  const bool onednn = onednn_usable(x, activation, residual);
  if (const char* mode = std::getenv("CNNKERNELS_POINTWISE_GEMM")) {
    const std::string forced(mode);
    if (forced == "tiles") return Gemm::kTiles;
    if (forced == "conv") return Gemm::kConv;
    if (forced == "onednn" && onednn) return Gemm::kOneDnn;
  }
  if (matmul) return Gemm::kMatmul;
  if (onednn && output_bytes >= kOneDnnMinOutputBytes) return Gemm::kOneDnn;
  return out_size[2] * out_size[3] >= 2048 && reduction <= 256 ? Gemm::kTiles : Gemm::kConv;
}

// shift + bias, scale (ones when absent), in the compute type.
std::pair<at::Tensor, at::Tensor> epilogue_vectors(const at::Tensor& x, int64_t out_channels,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& scale,
                                                   const std::optional<at::Tensor>& shift) {
  const auto options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_shift = shift.has_value() && shift->defined();
  at::Tensor s = scale.has_value() && scale->defined() ? scale->contiguous()
                                                       : at::ones({out_channels}, options);
  at::Tensor t = has_shift && has_bias ? at::add(*shift, *bias)
                 : has_shift           ? shift->contiguous()
                 : has_bias            ? bias->contiguous()
                                       : at::zeros({out_channels}, options);
  return {s, t.contiguous()};
}

at::Tensor pointwise_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, int64_t stride,
                                int64_t groups, const std::optional<at::Tensor>& scale,
                                const std::optional<at::Tensor>& shift,
                                const std::optional<at::Tensor>& residual, int64_t activation,
                                double negative_slope) {
  check_pointwise_conv2d(x_in, weight, bias, stride, groups, scale, shift, residual, activation);
  const bool channels_last =
      !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto out_size = pointwise_output_size(x_in, weight, stride);
  const bool has_residual = residual.has_value() && residual->defined();
  const bool trivial_epilogue = !has_residual && !(bias.has_value() && bias->defined()) &&
                                !(scale.has_value() && scale->defined()) &&
                                !(shift.has_value() && shift->defined()) &&
                                activation_from_int(activation) == Activation::Identity;
  const int64_t output_bytes =
      c10::multiply_integers(out_size) * static_cast<int64_t>(x_in.element_size());
  const Gemm gemm = choose_gemm(
      x_in, out_size, weight.size(1), activation, has_residual,
      matmul_applies(x_in, stride, groups, trivial_epilogue, output_bytes), output_bytes);
  const bool tiles = gemm == Gemm::kTiles;
  Problem p{{}, {}, {}, has_residual ? residual->contiguous(format) : at::Tensor(), groups};
  if (tiles) {  // the tiles read the strided-sampled input densely and write into y
    const at::Tensor x = stride > 1 ? x_in.slice(2, 0, std::nullopt, stride)
                                          .slice(3, 0, std::nullopt, stride)
                                    : x_in;
    p.x = x.contiguous(format);
    p.w = weight.reshape({weight.size(0), weight.size(1)}).contiguous();
    p.y = at::empty(out_size, x_in.options().memory_format(format));
  }
  if (c10::multiply_integers(out_size) == 0) {
    return tiles ? p.y : at::empty(out_size, x_in.options().memory_format(format));
  }
  if (gemm == Gemm::kMatmul && trivial_epilogue) return matmul_conv(x_in, weight);
  if (gemm == Gemm::kConv && trivial_epilogue) return plain_conv(x_in, weight, stride, groups, format);
  const auto [s, t] = epilogue_vectors(x_in, weight.size(0), bias, scale, shift);
  if (gemm == Gemm::kOneDnn) {
    return onednn_conv(x_in, weight, stride, groups, format, p.residual, s, t, activation,
                       negative_slope);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(),
                                  "cnnkernels_pointwise_conv2d", [&] {
    using T = scalar_t;
    using F = at::opmath_type<T>;
    const Epilogue<T> e{s.const_data_ptr<F>(), t.const_data_ptr<F>()};
    dispatch_activation(activation, negative_slope, [&](auto act) {
      if (gemm == Gemm::kConv || gemm == Gemm::kMatmul) {
        p.y = gemm == Gemm::kMatmul ? matmul_conv(x_in, weight)
                                    : plain_conv(x_in, weight, stride, groups, format);
        has_residual ? epilogue_in_place<true, T>(p.y, format, p.residual, e, act)
                     : epilogue_in_place<false, T>(p.y, format, p.residual, e, act);
      } else if (channels_last) {
        has_residual ? run_pixels<true, T>(p, e, act) : run_pixels<false, T>(p, e, act);
      } else {
        has_residual ? run_planes<true, T>(p, e, act) : run_planes<false, T>(p, e, act);
      }
    });
  });
  return p.y;
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("pointwise_conv2d", &cnnkernels::pointwise_conv2d_cpu);
}
