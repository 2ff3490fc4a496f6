"""Triton kernel of affine_act, y = act(x * scale[c] + shift[c] (+ residual)), and the op that
launches it.

`cnnkernels::affine_act_triton` is a `torch.library.triton_op` (torch.compile sees the kernel).
Dense NCHW and channels_last tensors are walked as flat arrays in storage order, the channel of
element i being (i // inner) % C or i % C; other layouts go through a contiguous copy. The multiply
-add is one fma, rounded once, as in the C++ kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import activation_forward
from .hardswish import _block, _compute_dtype, _grid


@triton.jit
def channel_of(offsets, channels, inner, CHANNELS_LAST: tl.constexpr):
    """The channel of flat element `offsets` of a dense NCHW (`inner` = H·W) or channels_last tensor."""
    if CHANNELS_LAST:
        return offsets % channels
    return (offsets // inner) % channels


@triton.jit
def _affine_act_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, residual_ptr, n, channels, inner,
                       negative_slope, ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr, CPU_MATH: tl.constexpr, COMPUTE: tl.constexpr,
                       BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    c = channel_of(offsets, channels, inner, CHANNELS_LAST)
    x = tl.load(x_ptr + offsets, mask=mask).to(COMPUTE)
    scale = tl.load(scale_ptr + c, mask=mask)
    shift = tl.load(shift_ptr + c, mask=mask)
    pre = tl.fma(x, scale, shift)
    if HAS_RESIDUAL:
        pre += tl.load(residual_ptr + offsets, mask=mask).to(COMPUTE)
    y = activation_forward(pre, ACT, negative_slope, CPU_MATH)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
            residual: torch.Tensor | None, activation: int, negative_slope: float,
            channels_last: bool) -> None:
    n = x.numel()
    if n == 0:
        return
    channels = x.shape[1]
    inner = n // max(1, x.shape[0] * channels)
    block = _block(x)
    torch.library.wrap_triton(_affine_act_kernel)[_grid(n, block)](
        x, y, scale, shift, x if residual is None else residual, n, channels, inner, negative_slope,
        ACT=activation, CHANNELS_LAST=channels_last, HAS_RESIDUAL=residual is not None,
        CPU_MATH=not x.is_cuda, COMPUTE=_compute_dtype(x), BLOCK=block)


@torch.library.triton_op("cnnkernels::affine_act_triton", mutates_args=())
def affine_act_triton(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      activation: int = 0, negative_slope: float = 0.01,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
    y = torch.empty_like(x)
    scale, shift = scale.contiguous(), shift.contiguous()
    if x.is_contiguous() and y.is_contiguous():
        residual = None if residual is None else residual.contiguous()
        _launch(x, y, scale, shift, residual, activation, negative_slope, channels_last=False)
    elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and \
            y.is_contiguous(memory_format=torch.channels_last):
        residual = None if residual is None else residual.contiguous(memory_format=torch.channels_last)
        _launch(x, y, scale, shift, residual, activation, negative_slope, channels_last=True)
    else:  # other strides: through a contiguous copy
        dense = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        residual = None if residual is None else residual.contiguous()
        _launch(x.contiguous(), dense, scale, shift, residual, activation, negative_slope,
                channels_last=False)
        y.copy_(dense)
    return y
