// CUDA kernels of depthwise 2-D convolution: forward (with the optional inference epilogue
// act(scale * (conv + bias) + shift)), grad_input and grad_weight.
//
// A correctness-first version: it compiles in CI but is not yet verified on a GPU, so `auto`
// chooses the Triton kernels for CUDA tensors until the test suite passes there with backend
// "cuda" (cnnkernels/ops/depthwise_conv2d.py, AUTO_KERNELS). No shared-memory tiles yet.
//  * forward: one thread per output element, in the output's memory order (NCHW or
//    channels_last), so that neighbouring threads write neighbouring addresses;
//  * grad_input: one thread per input element, gathering the output gradients whose taps read it
//    (no atomics);
//  * grad_weight: blocks of (output channel, slice of the N*OH*OW positions) reduce every tap over
//    their slice in shared memory, then one thread per (channel, tap) adds the slices in a fixed
//    order: deterministic, no atomics.
// Arithmetic in float (double for double), 64-bit indices, the current stream.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../depthwise_conv2d.h"
#include "cnnkernels/activation.h"

namespace cnnkernels {
namespace {

constexpr int kThreads = 256;

// Strides, in elements, of a 4-D tensor [N, C, H, W] that is NCHW- or channels_last-contiguous.
struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// (n, c, h, w) of the element at storage offset i of a dense NCHW or channels_last tensor.
struct Index4 {
  int64_t n, c, h, w;
};

__device__ __forceinline__ Index4 unflatten(int64_t i, int64_t c, int64_t h, int64_t w,
                                            bool channels_last) {
  Index4 r;
  if (channels_last) {
    r.c = i % c;
    i /= c;
    r.w = i % w;
    i /= w;
    r.h = i % h;
    r.n = i / h;
  } else {
    r.w = i % w;
    i /= w;
    r.h = i % h;
    i /= h;
    r.c = i % c;
    r.n = i / c;
  }
  return r;
}

struct Geometry {  // DepthwiseGeometry, passed by value to the kernels
  int64_t n, c, h, w, m, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
};

Geometry device_geometry(const DepthwiseGeometry& g) {
  return {g.n, g.c, g.h, g.w, g.multiplier, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw,
          g.oh, g.ow};
}

template <typename scalar_t, typename Act>
__global__ void forward_kernel(const scalar_t* __restrict__ x, Strides4 xs,
                               const scalar_t* __restrict__ weight, scalar_t* __restrict__ y,
                               const at::opmath_type<scalar_t>* __restrict__ bias,
                               const at::opmath_type<scalar_t>* __restrict__ scale,
                               const at::opmath_type<scalar_t>* __restrict__ shift, Geometry g,
                               bool channels_last, int64_t total, Act act) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const Index4 o = unflatten(i, g.c * g.m, g.oh, g.ow, channels_last);
    const int64_t c = o.c / g.m;
    const scalar_t* plane = x + o.n * xs.n + c * xs.c;
    const scalar_t* w = weight + o.c * g.kh * g.kw;
    opmath_t acc = 0;
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      const int64_t ih = o.h * g.sh - g.ph + ki * g.dh;
      if (ih < 0 || ih >= g.h) continue;
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const int64_t iw = o.w * g.sw - g.pw + kj * g.dw;
        if (iw < 0 || iw >= g.w) continue;
        acc += static_cast<opmath_t>(w[ki * g.kw + kj]) *
               static_cast<opmath_t>(plane[ih * xs.h + iw * xs.w]);
      }
    }
    if (bias != nullptr) acc += bias[o.c];
    if (scale != nullptr) acc = acc * scale[o.c] + shift[o.c];
    y[i] = static_cast<scalar_t>(act.forward(acc));
  }
}

template <typename scalar_t>
__global__ void backward_input_kernel(const scalar_t* __restrict__ grad, Strides4 gs,
                                      const scalar_t* __restrict__ weight,
                                      scalar_t* __restrict__ dx, Geometry g, bool channels_last,
                                      int64_t total) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const Index4 p = unflatten(i, g.c, g.h, g.w, channels_last);
    opmath_t acc = 0;
    for (int64_t k = 0; k < g.m; ++k) {
      const int64_t o = p.c * g.m + k;
      const scalar_t* plane = grad + p.n * gs.n + o * gs.c;
      const scalar_t* w = weight + o * g.kh * g.kw;
      for (int64_t ki = 0; ki < g.kh; ++ki) {
        const int64_t oh_s = p.h + g.ph - ki * g.dh;  // = oh * sh for the output reading this tap
        if (oh_s < 0 || oh_s % g.sh != 0 || oh_s / g.sh >= g.oh) continue;
        for (int64_t kj = 0; kj < g.kw; ++kj) {
          const int64_t ow_s = p.w + g.pw - kj * g.dw;
          if (ow_s < 0 || ow_s % g.sw != 0 || ow_s / g.sw >= g.ow) continue;
          acc += static_cast<opmath_t>(w[ki * g.kw + kj]) *
                 static_cast<opmath_t>(plane[(oh_s / g.sh) * gs.h + (ow_s / g.sw) * gs.w]);
        }
      }
    }
    dx[i] = static_cast<scalar_t>(acc);
  }
}

// Block (o, slice): partial[(o * slices + slice) * taps + t] = sum over the slice's positions of
// grad * input at tap t. Positions are (n, oh, ow) flattened, ow fastest.
template <typename scalar_t>
__global__ void backward_weight_partial_kernel(const scalar_t* __restrict__ grad, Strides4 gs,
                                               const scalar_t* __restrict__ x, Strides4 xs,
                                               at::opmath_type<scalar_t>* __restrict__ partial,
                                               Geometry g, int64_t slices) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t sums[kThreads];
  const int64_t o = blockIdx.x, slice = blockIdx.y, c = o / g.m;
  const int64_t positions = g.n * g.oh * g.ow;
  const int64_t per_slice = (positions + slices - 1) / slices;
  const int64_t begin = slice * per_slice;
  const int64_t end = begin + per_slice < positions ? begin + per_slice : positions;
  const int64_t taps = g.kh * g.kw;
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t ki = t / g.kw, kj = t % g.kw;
    opmath_t acc = 0;
    for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
      const int64_t ow = e % g.ow, oh = (e / g.ow) % g.oh, n = e / (g.ow * g.oh);
      const int64_t ih = oh * g.sh - g.ph + ki * g.dh, iw = ow * g.sw - g.pw + kj * g.dw;
      if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
      acc += static_cast<opmath_t>(grad[n * gs.n + o * gs.c + oh * gs.h + ow * gs.w]) *
             static_cast<opmath_t>(x[n * xs.n + c * xs.c + ih * xs.h + iw * xs.w]);
    }
    sums[threadIdx.x] = acc;
    __syncthreads();
    for (int width = blockDim.x / 2; width > 0; width /= 2) {  // a fixed reduction tree
      if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
      __syncthreads();
    }
    if (threadIdx.x == 0) partial[(o * slices + slice) * taps + t] = sums[0];
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void backward_weight_sum_kernel(const at::opmath_type<scalar_t>* __restrict__ partial,
                                           scalar_t* __restrict__ dw, int64_t out_channels,
                                           int64_t taps, int64_t slices) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= out_channels * taps) return;
  const int64_t o = i / taps, t = i % taps;
  opmath_t sum = 0;
  for (int64_t s = 0; s < slices; ++s) sum += partial[(o * slices + s) * taps + t];
  dw[i] = static_cast<scalar_t>(sum);
}

int grid_for(int64_t total) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads,
                                                                 int64_t(65535) * 32)));
}

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

template <typename opmath_t>
const opmath_t* optional_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<opmath_t>() : nullptr;
}

at::Tensor as_compute_vector(const std::optional<at::Tensor>& t, at::ScalarType compute) {
  return t.has_value() && t->defined() ? t->to(compute).contiguous() : at::Tensor();
}

at::Tensor depthwise_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 const std::optional<at::Tensor>& scale,
                                 const std::optional<at::Tensor>& shift, int64_t activation,
                                 double negative_slope) {
  constexpr const char* op = "depthwise_conv2d";
  const DepthwiseGeometry g =
      check_depthwise_forward(x, weight, bias, stride, padding, dilation, scale, shift, op);
  c10::cuda::CUDAGuard guard(x.device());
  const bool channels_last = wants_channels_last(x);
  at::Tensor out = at::empty({g.n, g.out_channels(), g.oh, g.ow},
                             x.options().memory_format(format_of(channels_last)));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const at::Tensor xc = x.contiguous(format_of(channels_last)), wc = weight.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto compute = c10::CppTypeToScalarType<opmath_t>::value;
    const at::Tensor b = as_compute_vector(bias, compute), s = as_compute_vector(scale, compute),
                     t = as_compute_vector(shift, compute);
    dispatch_activation(activation, negative_slope, [&](auto act) {
      forward_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), strides_of(xc), wc.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), optional_data<opmath_t>(b), optional_data<opmath_t>(s),
          optional_data<opmath_t>(t), device_geometry(g), channels_last, total, act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor depthwise_conv2d_backward_input_cuda(const at::Tensor& grad_output,
                                                const at::Tensor& weight,
                                                at::IntArrayRef input_size, at::IntArrayRef stride,
                                                at::IntArrayRef padding,
                                                at::IntArrayRef dilation) {
  constexpr const char* op = "depthwise_conv2d_backward_input";
  const DepthwiseGeometry g =
      check_depthwise_args(grad_output, input_size, weight.sizes(), stride, padding, dilation, op);
  check_grad_output_shape(grad_output, g, op);
  c10::cuda::CUDAGuard guard(grad_output.device());
  const bool channels_last = wants_channels_last(grad_output);
  at::Tensor dx = at::empty(input_size, grad_output.options().memory_format(format_of(channels_last)));
  const int64_t total = dx.numel();
  if (total == 0) return dx;
  const at::Tensor go = grad_output.contiguous(format_of(channels_last)), wc = weight.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), op, [&] {
    backward_input_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), strides_of(go), wc.const_data_ptr<scalar_t>(),
        dx.mutable_data_ptr<scalar_t>(), device_geometry(g), channels_last, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

at::Tensor depthwise_conv2d_backward_weight_cuda(const at::Tensor& grad_output,
                                                 const at::Tensor& x, at::IntArrayRef weight_size,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation) {
  constexpr const char* op = "depthwise_conv2d_backward_weight";
  const DepthwiseGeometry g =
      check_depthwise_args(x, x.sizes(), weight_size, stride, padding, dilation, op);
  check_grad_output_shape(grad_output, g, op);
  TORCH_CHECK(grad_output.scalar_type() == x.scalar_type() && grad_output.device() == x.device(),
              op, ": 'grad_output' and 'x' must have the same dtype and device");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dw = at::empty(weight_size, x.options());
  const int64_t positions = g.n * g.oh * g.ow, taps = g.kh * g.kw;
  if (positions == 0) return dw.zero_();
  const bool channels_last = wants_channels_last(x);
  const at::Tensor xc = x.contiguous(format_of(channels_last)),
                   go = grad_output.contiguous(format_of(channels_last));
  // slices per channel: enough blocks to fill the GPU, each slice at least 4 positions per thread
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t slices = std::clamp<int64_t>(
      std::min<int64_t>((4 * sms + g.out_channels() - 1) / g.out_channels(),
                        (positions + 4 * kThreads - 1) / (4 * kThreads)),
      1, 65535);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({g.out_channels() * slices * taps},
                                   x.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
    const dim3 grid(static_cast<unsigned>(g.out_channels()), static_cast<unsigned>(slices));
    backward_weight_partial_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), strides_of(go), xc.const_data_ptr<scalar_t>(),
        strides_of(xc), partial.mutable_data_ptr<opmath_t>(), device_geometry(g), slices);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_weight_sum_kernel<scalar_t><<<grid_for(g.out_channels() * taps), kThreads, 0, stream>>>(
        partial.const_data_ptr<opmath_t>(), dw.mutable_data_ptr<scalar_t>(), g.out_channels(), taps,
        slices);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dw;
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) {
  m.impl("depthwise_conv2d", &cnnkernels::depthwise_conv2d_cuda);
  m.impl("depthwise_conv2d_backward_input", &cnnkernels::depthwise_conv2d_backward_input_cuda);
  m.impl("depthwise_conv2d_backward_weight", &cnnkernels::depthwise_conv2d_backward_weight_cuda);
}
