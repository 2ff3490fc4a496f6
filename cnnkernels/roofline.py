"""Roofline lower bounds for the kernel benchmark cases (`cnnkernels bench kernels`).

For one case and pass, `work()` counts the bytes the op must move through device memory and the
floating-point operations it must do; with a GPU's peak bandwidth and compute (`peaks_for`), the
time no implementation can beat is max(bytes / bandwidth, FLOPs / compute rate), and
"% of roofline" is that lower bound over a measured time.

What is counted, the same for every op:
- Bytes: each activation-sized tensor and each weight read once and each output written once per
  pass; "fwd+bwd" is the forward plus a backward that reads the output gradient and the inputs it
  needs and writes the gradient of every tensor the benchmark case differentiates. Per-channel
  vectors (biases, BatchNorm statistics and affine parameters, folded scales) are left out: a few
  values per channel against N*H*W per channel of each activation (well under 1% at the
  benchmarked shapes).
- FLOPs: the multiply-adds of convolutions and GEMMs, 2 per multiply-add. Elementwise and
  reduction arithmetic is left out: a few FLOPs per element never outweighs the element's bytes.
- Ops that need a statistic of the whole input before their output (BatchNorm in training, the
  squeeze-and-excitation pool) are counted as reading it once too: reachable only when the
  second read hits the L2 cache, so their practical ceiling sits below 100%.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .cases import Case


@dataclasses.dataclass(frozen=True)
class Work:
    """What one pass of one case must do at least."""
    bytes: int
    flops: int
    on_tensor_cores: bool = False  # a GEMM, whose FLOPs can run on the matrix units


@dataclasses.dataclass(frozen=True)
class Peaks:
    """A GPU's datasheet rates, dense (no sparsity)."""
    name: str
    bytes_per_s: float
    fp32_flops_per_s: float  # plain float32 on the CUDA cores (no TF32)
    half_flops_per_s: float  # bfloat16 / float16 on the tensor cores

    def flops_per_s(self, dtype: torch.dtype, on_tensor_cores: bool) -> float:
        # Depthwise and elementwise arithmetic runs on the CUDA cores whatever the dtype (our
        # kernels and cuDNN accumulate in float32), so only GEMMs in 16-bit get the tensor rate.
        if on_tensor_cores and dtype in (torch.bfloat16, torch.float16):
            return self.half_flops_per_s
        return self.fp32_flops_per_s


H100_SXM = Peaks("H100 SXM", 3.35e12, 67e12, 989e12)
H200 = Peaks("H200", 4.8e12, 67e12, 989e12)

# Matched against torch.cuda.get_device_name() (an H100 SXM reads "NVIDIA H100 80GB HBM3"). The
# PCIe and NVL parts share the name "H100"/"H200" but run at lower clocks and, for the H100
# PCIe, from slower memory: they stay unknown rather than borrow the SXM part's numbers.
_KNOWN = (("H200", H200), ("H100", H100_SXM))
_OTHER_VARIANTS = ("PCIe", "NVL")


def peaks_for(device_name: str) -> Peaks | None:
    """The peaks of the GPU called `device_name`, or None for a GPU not in the table."""
    if any(variant in device_name for variant in _OTHER_VARIANTS):
        return None
    for key, peaks in _KNOWN:
        if key in device_name:
            return peaks
    return None


def device_peaks(device: torch.device) -> Peaks | None:
    """The peaks of `device`; None on a CPU or an unknown GPU (then no roofline is shown)."""
    if device.type != "cuda":
        return None
    return peaks_for(torch.cuda.get_device_name(device))


def _conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def elementwise(case: Case, direction: str, element_size: int) -> Work:
    """h-swish, h-sigmoid, affine_act, BatchNorm + act: x -> y; backward grad, x -> dx."""
    numel = math.prod(case.shape)
    passes = 2 if direction == "fwd" else 5
    return Work(passes * numel * element_size, 0)


def depthwise_conv2d(case: Case, direction: str, element_size: int) -> Work:
    """k x k depthwise convolution, padding k // 2: x, weight -> y; backward grad, x, weight ->
    dx, dweight (the case's bias takes no gradient)."""
    n, c, h, w = case.shape
    k, s = case.kernel, case.stride
    x = n * c * h * w
    y = n * c * _conv_output_size(h, k, s, k // 2) * _conv_output_size(w, k, s, k // 2)
    weight = c * k * k
    forward = Work((x + weight + y) * element_size, 2 * y * k * k)
    if direction == "fwd":
        return forward
    backward_bytes = (y + x + weight + x + weight) * element_size
    return Work(forward.bytes + backward_bytes, 3 * forward.flops)  # y, dx, dweight


def squeeze_excite(case: Case, direction: str, element_size: int) -> Work:
    """Pool, C -> S and S -> C 1x1 convs, gate, scale: x, w1, w2 -> y; backward grad, x, w1, w2
    -> dx, dw1, dw2. The two small GEMMs are N x C x S each way."""
    n, c, h, w = case.shape
    squeeze = case.kernel
    x = n * c * h * w
    weights = 2 * squeeze * c
    gemm_flops = 2 * n * c * squeeze
    forward = Work((2 * x + weights) * element_size, 2 * gemm_flops, on_tensor_cores=True)
    if direction == "fwd":
        return forward
    backward_bytes = (3 * x + 2 * weights) * element_size
    return Work(forward.bytes + backward_bytes, 6 * gemm_flops, on_tensor_cores=True)


def pointwise_conv2d(case: Case, direction: str, element_size: int) -> Work:
    """1x1 conv (a GEMM over N*H'*W' pixels) with BatchNorm and activation in its epilogue:
    x, weight (+ residual) -> y. Training ("fwd+bwd"): backward grad, x, weight -> dx, dweight
    (the case's residual takes no gradient). A strided 1x1 conv reads only the pixels it samples."""
    n, c_in, h, w = case.shape
    c_out, s = case.kernel, case.stride
    pixels = n * _conv_output_size(h, 1, s, 0) * _conv_output_size(w, 1, s, 0)
    x_read, x_full = pixels * c_in, n * c_in * h * w
    y = pixels * c_out
    weight = c_in * c_out
    gemm_flops = 2 * pixels * c_in * c_out
    forward_bytes = x_read + weight + y * (2 if case.residual else 1)
    if direction == "fwd":
        return Work(forward_bytes * element_size, gemm_flops, on_tensor_cores=True)
    backward_bytes = y + x_read + weight + x_full + weight
    return Work((forward_bytes + backward_bytes) * element_size, 3 * gemm_flops,
                on_tensor_cores=True)  # y, dx, dweight


_MODELS = {
    "hardswish": elementwise, "hardsigmoid": elementwise, "affine_act": elementwise,
    "batch_norm_act": elementwise, "depthwise_conv2d": depthwise_conv2d,
    "squeeze_excite": squeeze_excite, "pointwise_conv2d": pointwise_conv2d,
}


def work(case: Case, direction: str, element_size: int) -> Work:
    """The bytes and FLOPs of `case`'s pass `direction` ("fwd" or "fwd+bwd")."""
    if case.op not in _MODELS:
        raise ValueError(f"no roofline model for op {case.op!r}; known: {', '.join(_MODELS)}")
    if direction not in ("fwd", "fwd+bwd"):
        raise ValueError(f"unknown pass {direction!r}; expected 'fwd' or 'fwd+bwd'")
    return _MODELS[case.op](case, direction, element_size)


def lower_bound_s(done: Work, peaks: Peaks, dtype: torch.dtype) -> float:
    """Seconds no implementation can beat on that GPU: the slower of moving the bytes and doing
    the FLOPs at peak."""
    return max(done.bytes / peaks.bytes_per_s,
               done.flops / peaks.flops_per_s(dtype, done.on_tensor_cores))


def row(case: Case, direction: str, dtype: torch.dtype, peaks: Peaks,
        medians: dict[str, float]) -> dict:
    """The JSON fields of one benchmark row: the work, the lower bound, which side of the roof
    bounds it, and each timed side's fraction of the roofline (lower bound / its median)."""
    done = work(case, direction, torch.empty(0, dtype=dtype).element_size())
    floor = lower_bound_s(done, peaks, dtype)
    memory_s = done.bytes / peaks.bytes_per_s
    return {"gpu": peaks.name, "bytes": done.bytes, "flops": done.flops, "lower_bound_s": floor,
            "bound": "memory" if memory_s >= floor else "compute",
            "fraction": {side: floor / seconds for side, seconds in medians.items()
                         if side != "copy" and seconds > 0}}


HEADER = "%roof"


def header(peaks: Peaks | None) -> str:
    """The printed table's "% of roofline" column title; "" where there is no roofline."""
    return f" {HEADER:>6}" if peaks else ""


def cell(roof: dict | None, side: str) -> str:
    """`side`'s "% of roofline" cell for a row's roofline fields (`row`); "" where there is no
    roofline, "-" where the side was not timed."""
    if roof is None:
        return ""
    fraction = roof["fraction"].get(side)
    if fraction is None:
        return f" {'-':>6}"
    percent = fraction * 100  # a decimal under 10%, where launch-bound small cases sit
    return f" {percent:>5.1f}%" if percent < 10 else f" {percent:>5.0f}%"


def legend(peaks: Peaks) -> str:
    """The line printed under the table: what %roof means, with the peaks it used."""
    tera = 1e12
    return (f"%roof = lower-bound time / measured time; lower bound = max(minimum bytes / "
            f"{peaks.bytes_per_s / tera:g} TB/s, conv and GEMM FLOPs / "
            f"{peaks.fp32_flops_per_s / tera:g} TFLOP/s fp32 or {peaks.half_flops_per_s / tera:g} "
            f"TFLOP/s bf16/fp16 GEMMs), {peaks.name} datasheet peaks (cnnkernels/roofline.py); "
            "eager float32 convs may run in TF32 (torch.backends.cudnn.allow_tf32) and pass 100%")
