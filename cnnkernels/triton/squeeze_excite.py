"""Triton kernel of squeeze_excite_backward: dx = grad · gate[n, c] and Σ_hw grad · x in one pass.

One program per (image, block of channels) walks the image's H·W positions in tiles
[BLOCK_HW, BLOCK_C], writing dx and summing grad · x per channel; NCHW or channels_last addressing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hardswish import _compute_dtype


@triton.jit
def _backward_kernel(grad_ptr, x_ptr, gate_ptr, dx_ptr, grad_gate_ptr, channels, plane,
                     CHANNELS_LAST: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_HW: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cs = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_mask = cs < channels
    gate = tl.load(gate_ptr + n * channels + cs, mask=c_mask, other=0.0)
    acc = tl.zeros([BLOCK_HW, BLOCK_C], dtype=COMPUTE)
    image = n * channels * plane
    for start in range(0, plane, BLOCK_HW):
        hw = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        mask = (hw < plane)[:, None] & c_mask[None, :]
        if CHANNELS_LAST:
            offsets = image + hw[:, None] * channels + cs[None, :]
        else:
            offsets = image + cs[None, :] * plane + hw[:, None]
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        tl.store(dx_ptr + offsets, (g * gate[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
        acc += g * x
    tl.store(grad_gate_ptr + n * channels + cs, tl.sum(acc, axis=0), mask=c_mask)


@torch.library.triton_op("cnnkernels::squeeze_excite_backward_triton", mutates_args=())
def squeeze_excite_backward_triton(grad: torch.Tensor, x: torch.Tensor,
                                   gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, grad, gate = x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt), gate.contiguous()
    dx = torch.empty_like(x)
    grad_gate = torch.zeros_like(gate)
    batch, channels = x.shape[:2]
    plane = x.shape[2] * x.shape[3]
    if x.numel():
        block_c = min(32 if channels_last else 4, triton.next_power_of_2(channels))
        block_hw = 64 if channels_last else 256
        torch.library.wrap_triton(_backward_kernel)[(batch, triton.cdiv(channels, block_c))](
            grad, x, gate, dx, grad_gate, channels, plane, CHANNELS_LAST=channels_last,
            COMPUTE=_compute_dtype(x), BLOCK_HW=block_hw, BLOCK_C=block_c)
    return dx, grad_gate
