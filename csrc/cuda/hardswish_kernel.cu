// CUDA kernels of h-swish / h-sigmoid (forward, backward, in place).
//
// Dense tensors (NCHW, channels_last or any other non-overlapping dense strides) are processed as
// flat arrays in storage order with 16-byte vector loads and stores; anything else is first made
// dense. Output strides equal the input's (as at::empty_like gives, and as the fake kernel says).
// Arithmetic is done in float (double for double) and rounded once, as ATen's CUDA kernels do.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "../hardswish.h"
#include "cnnkernels/activation.h"

namespace cnnkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kVectorBytes = 16;

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

template <typename scalar_t, int kVec, typename Act>
__global__ void forward_kernel(const scalar_t* x, scalar_t* y, int64_t n, Act act) {
  using opmath_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, kVec>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_packs = n / kVec;
  for (int64_t i = first; i < n_packs; i += stride) {
    pack_t p = reinterpret_cast<const pack_t*>(x)[i];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      p.v[k] = static_cast<scalar_t>(act.forward(static_cast<opmath_t>(p.v[k])));
    }
    reinterpret_cast<pack_t*>(y)[i] = p;
  }
  for (int64_t i = n_packs * kVec + first; i < n; i += stride) {  // the tail
    y[i] = static_cast<scalar_t>(act.forward(static_cast<opmath_t>(x[i])));
  }
}

template <typename scalar_t, int kVec, typename Act>
__global__ void backward_kernel(const scalar_t* g, const scalar_t* x, scalar_t* out, int64_t n,
                                Act act) {
  using opmath_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, kVec>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_packs = n / kVec;
  for (int64_t i = first; i < n_packs; i += stride) {
    const pack_t gp = reinterpret_cast<const pack_t*>(g)[i];
    const pack_t xp = reinterpret_cast<const pack_t*>(x)[i];
    pack_t o;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      o.v[k] = static_cast<scalar_t>(
          act.backward(static_cast<opmath_t>(gp.v[k]), static_cast<opmath_t>(xp.v[k])));
    }
    reinterpret_cast<pack_t*>(out)[i] = o;
  }
  for (int64_t i = n_packs * kVec + first; i < n; i += stride) {
    out[i] = static_cast<scalar_t>(
        act.backward(static_cast<opmath_t>(g[i]), static_cast<opmath_t>(x[i])));
  }
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0; }

// Enough blocks to fill the GPU a few times over; the grid-stride loops cover the rest.
int grid_size(int64_t work_items) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (std::max<int64_t>(work_items, 1) + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(wanted, sms * 16));
}

at::Tensor make_dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous(t.suggest_memory_format());
}

// `like` has the strides the kernel walks; returns `t` laid out the same way.
at::Tensor same_strides_as(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}

template <typename Act>
void launch_forward(const at::Tensor& x, const at::Tensor& y) {
  const Act act{};
  const int64_t n = x.numel();
  if (n == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnnkernels_activation", [&] {
    constexpr int kVec = kVectorBytes / sizeof(scalar_t);
    const auto* xp = x.const_data_ptr<scalar_t>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    if (aligned(xp) && aligned(yp)) {
      forward_kernel<scalar_t, kVec><<<grid_size(n / kVec), kThreads, 0, stream>>>(xp, yp, n, act);
    } else {
      forward_kernel<scalar_t, 1><<<grid_size(n), kThreads, 0, stream>>>(xp, yp, n, act);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The kernels below are registered directly for each functor; Act::name names the op in errors.
template <typename Act>
at::Tensor forward_cuda(const at::Tensor& x) {
  check_activation_input(x, Act::name);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = make_dense(x);
  at::Tensor y = at::empty_like(xd);
  launch_forward<Act>(xd, y);
  return y;
}

template <typename Act>
void forward_inplace_cuda(const at::Tensor& x) {
  check_activation_inplace(x, (std::string(Act::name) + "_").c_str());
  c10::cuda::CUDAGuard guard(x.device());
  if (x.is_non_overlapping_and_dense()) {
    launch_forward<Act>(x, x);
    return;
  }
  const at::Tensor tmp = make_dense(x);
  launch_forward<Act>(tmp, tmp);
  x.copy_(tmp);
}

template <typename Act>
at::Tensor backward_cuda(const at::Tensor& grad_output, const at::Tensor& x) {
  const Act act{};
  check_activation_backward(grad_output, x, (std::string(Act::name) + "_backward").c_str());
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = make_dense(x);
  const at::Tensor gd = same_strides_as(grad_output, xd);
  at::Tensor grad_input = at::empty_like(xd);
  const int64_t n = xd.numel();
  if (n == 0) return grad_input;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnnkernels_activation", [&] {
    constexpr int kVec = kVectorBytes / sizeof(scalar_t);
    const auto* gp = gd.const_data_ptr<scalar_t>();
    const auto* xp = xd.const_data_ptr<scalar_t>();
    auto* op_ = grad_input.mutable_data_ptr<scalar_t>();
    if (aligned(gp) && aligned(xp) && aligned(op_)) {
      backward_kernel<scalar_t, kVec>
          <<<grid_size(n / kVec), kThreads, 0, stream>>>(gp, xp, op_, n, act);
    } else {
      backward_kernel<scalar_t, 1><<<grid_size(n), kThreads, 0, stream>>>(gp, xp, op_, n, act);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) {
  using namespace cnnkernels;
  m.impl("hardswish", &forward_cuda<HardSwish>);
  m.impl("hardswish_", &forward_inplace_cuda<HardSwish>);
  m.impl("hardswish_backward", &backward_cuda<HardSwish>);
  m.impl("hardsigmoid", &forward_cuda<HardSigmoid>);
  m.impl("hardsigmoid_", &forward_inplace_cuda<HardSigmoid>);
  m.impl("hardsigmoid_backward", &backward_cuda<HardSigmoid>);
}
