// CUDA kernel of squeeze_excite_backward: dx = grad · gate[n, c] and Σ_hw grad · x, one pass.
//
// NCHW: one block per (n, c) plane, coalesced along the plane, a warp-shuffle block reduction.
// channels_last: one block of 32 channels × 8 rows per (n, channel block), each warp reading 32
// consecutive channels of a row; the 8 row-partials are added through shared memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../squeeze_excite.h"

namespace cnnkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 8;

template <typename F>
__device__ F warp_sum(F v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t>
__global__ void backward_planes(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                const at::opmath_type<scalar_t>* __restrict__ gate,
                                scalar_t* __restrict__ dx, at::opmath_type<scalar_t>* grad_gate,
                                int64_t plane) {
  using F = at::opmath_type<scalar_t>;
  const int64_t p = blockIdx.x;
  const int64_t base = p * plane;
  const F s = gate[p];
  F total = 0;
  for (int64_t i = threadIdx.x; i < plane; i += blockDim.x) {
    const F g = static_cast<F>(grad[base + i]);
    dx[base + i] = static_cast<scalar_t>(g * s);
    total += g * static_cast<F>(x[base + i]);
  }
  __shared__ F partial[kThreads / 32];
  total = warp_sum(total);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    F sum = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) sum += partial[w];
    grad_gate[p] = sum;
  }
}

template <typename scalar_t>
__global__ void backward_rows(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                              const at::opmath_type<scalar_t>* __restrict__ gate,
                              scalar_t* __restrict__ dx, at::opmath_type<scalar_t>* grad_gate,
                              int64_t rows, int64_t channels) {
  using F = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
  F total = 0;
  if (c < channels) {
    const F s = gate[n * channels + c];
    for (int64_t r = threadIdx.y; r < rows; r += kRows) {
      const int64_t i = (n * rows + r) * channels + c;
      const F g = static_cast<F>(grad[i]);
      dx[i] = static_cast<scalar_t>(g * s);
      total += g * static_cast<F>(x[i]);
    }
  }
  __shared__ F partial[kRows][32];
  partial[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    F sum = 0;
    for (int y = 0; y < kRows; ++y) sum += partial[y][threadIdx.x];
    grad_gate[n * channels + c] = sum;
  }
}

std::tuple<at::Tensor, at::Tensor> squeeze_excite_backward_cuda(const at::Tensor& grad_in,
                                                                const at::Tensor& x_in,
                                                                const at::Tensor& gate_in) {
  check_squeeze_excite_backward(grad_in, x_in, gate_in, "squeeze_excite_backward");
  c10::cuda::CUDAGuard guard(x_in.device());
  const bool rows = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto format = rows ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(format), grad = grad_in.contiguous(format);
  const at::Tensor gate = gate_in.contiguous();
  at::Tensor dx = at::empty_like(x, format);
  at::Tensor grad_gate = at::zeros_like(gate);
  const int64_t batch = x.size(0), channels = x.size(1), plane = x.size(2) * x.size(3);
  if (x.numel() == 0) return {dx, grad_gate};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cnnkernels_squeeze_excite_backward", [&] {
        using F = at::opmath_type<scalar_t>;
        if (rows) {
          const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>((channels + 31) / 32));
          backward_rows<scalar_t><<<grid, dim3(32, kRows), 0, stream>>>(
              grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gate.const_data_ptr<F>(),
              dx.mutable_data_ptr<scalar_t>(), grad_gate.mutable_data_ptr<F>(), plane, channels);
        } else {
          backward_planes<scalar_t><<<static_cast<unsigned>(batch * channels), kThreads, 0, stream>>>(
              grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gate.const_data_ptr<F>(),
              dx.mutable_data_ptr<scalar_t>(), grad_gate.mutable_data_ptr<F>(), plane);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {dx, grad_gate};
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) {
  m.impl("squeeze_excite_backward", &cnnkernels::squeeze_excite_backward_cuda);
}
