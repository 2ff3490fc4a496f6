"""Activation math for Triton kernels, the twin of csrc/include/cnnkernels/activation.h.

`ACT` is a constexpr code from cnnkernels/activations.py, so every kernel specialises on it. The
formulas, the values at the kinks and NaN propagation equal ATen's; `CPU_MATH` selects ATen's CPU
rounding (divide by 6) for interpreter runs on CPU tensors and its CUDA rounding (multiply by 1/6)
on the GPU, so results are bit-identical to torch.nn.functional on the same device. Divisions use
div_rn because Triton's `/` on float32 is an approximate division on the GPU. No libdevice calls:
the kernels also run under TRITON_INTERPRET=1.
"""
import struct

import triton
import triton.language as tl

# ATen multiplies by 1.0f / 6.0f, a float32 constant, also when computing in float64.
ONE_SIXTH: tl.constexpr = tl.constexpr(float(struct.unpack("f", struct.pack("f", 1.0 / 6.0))[0]))

IDENTITY: tl.constexpr = tl.constexpr(0)
RELU: tl.constexpr = tl.constexpr(1)
RELU6: tl.constexpr = tl.constexpr(2)
LEAKY_RELU: tl.constexpr = tl.constexpr(3)
HARDSWISH: tl.constexpr = tl.constexpr(4)
HARDSIGMOID: tl.constexpr = tl.constexpr(5)


@triton.jit
def _max_like_std(a, b):
    return tl.where(a < b, b, a)


@triton.jit
def _min_like_std(a, b):
    return tl.where(b < a, b, a)


@triton.jit
def _precise_div(x, divisor: tl.constexpr):
    """IEEE round-to-nearest x / divisor (div_rn is float32 only; float64 `/` is already exact)."""
    if x.dtype == tl.float64:
        return x / divisor
    else:
        return tl.div_rn(x, tl.full(x.shape, divisor, x.dtype))


@triton.jit
def _divide_by_six(x, CPU_MATH: tl.constexpr):
    if CPU_MATH:
        return _precise_div(x, 6.0)
    else:
        return x * ONE_SIXTH


@triton.jit
def activation_forward(x, ACT: tl.constexpr, negative_slope, CPU_MATH: tl.constexpr):
    """act(x), x in the compute dtype (float32, or float64)."""
    if ACT == RELU:
        return tl.where(x <= 0.0, 0.0, x)
    elif ACT == RELU6:
        return _min_like_std(_max_like_std(x, 0.0), 6.0)
    elif ACT == LEAKY_RELU:
        return tl.where(x > 0.0, x, x * negative_slope)
    elif ACT == HARDSWISH:
        return _divide_by_six(x * _min_like_std(_max_like_std(x + 3.0, 0.0), 6.0), CPU_MATH)
    elif ACT == HARDSIGMOID:
        return _divide_by_six(_min_like_std(_max_like_std(x + 3.0, 0.0), 6.0), CPU_MATH)
    else:
        return x


@triton.jit
def activation_backward(g, x, ACT: tl.constexpr, negative_slope):
    """g * act'(x), from the pre-activation input x."""
    if ACT == RELU:
        return tl.where(x <= 0.0, 0.0, g)
    elif ACT == RELU6:
        return tl.where((x <= 0.0) | (x >= 6.0), 0.0, g)
    elif ACT == LEAKY_RELU:
        return tl.where(x > 0.0, g, g * negative_slope)
    elif ACT == HARDSWISH:
        slope = _precise_div(x, 3.0) + 0.5
        return tl.where(x <= -3.0, 0.0, tl.where(x < 3.0, g * slope, g))
    elif ACT == HARDSIGMOID:
        return tl.where((x > -3.0) & (x < 3.0), g * ONE_SIXTH, 0.0)
    else:
        return g
