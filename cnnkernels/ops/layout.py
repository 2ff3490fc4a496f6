"""contiguous_from_channels_last: a contiguous (NCHW) copy of a 4-D tensor whose pixels are rows
of channels (channels_last, or a channel slice of a channels_last tensor), the same values as
`x.contiguous()`. ATen's CPU copy in that direction is a generic strided copy (6 GB/s on the dev
VM); the CPU kernel (csrc/cpu/layout_kernel.cpp) transposes 16x16 tiles in registers (26-56 GB/s
there). Elsewhere, and for other dtypes or layouts, it is `x.contiguous()`.

copy_to_channels_last_ / to_channels_last: the other direction (ATen's copy reaches 6-11 GB/s there,
the same register transposes 20-30); to_channels_last's gradient goes back to NCHW through
contiguous_from_channels_last. For layers that run much faster in channels_last on the CPU (pools,
the DenseNet block).
"""
from __future__ import annotations

import torch

from .. import _extension


def copy_to_channels_last_(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`out.copy_(x)` for an NCHW-contiguous x and an out whose pixels are rows of channels (a
    channels_last tensor, or a channel slice of one): on the CPU by register transposes, faster
    than ATen's generic strided copy. Returns out."""
    # a meta (or any non-CPU) x goes to copy_, which refuses what it must ("Cannot copy out of
    # meta tensor") instead of the kernel reading no data
    if out.device.type == "cpu" and x.device.type == "cpu" and _extension.cpu_ext and \
            out.dim() == 4 and x.dim() == 4:
        torch.ops.cnnkernels.copy_to_channels_last_(out, x)
    else:
        out.copy_(x)
    return out


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x.contiguous(memory_format=torch.channels_last)` whose gradient goes back to x's layout
    through contiguous_from_channels_last (autograd's own copy would hand an NCHW input a
    channels_last gradient, and the next NCHW kernel would pay ATen's slow copy for it)."""
    if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last) or \
            not x.is_contiguous() or x.device.type != "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return _ToChannelsLast.apply(x)


class _ToChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        return copy_to_channels_last_(out, x)

    @staticmethod
    def backward(ctx, grad):
        return contiguous_from_channels_last(grad)


def contiguous_from_channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x.contiguous()`, faster on the CPU when x is (a channel slice of) a channels_last tensor."""
    if x.device.type != "cpu" or not _extension.cpu_ext or x.dim() != 4 or x.is_contiguous():
        return x.contiguous()
    return torch.ops.cnnkernels.contiguous_from_channels_last(x)


if _extension.cpu_ext:
    @torch.library.register_fake("cnnkernels::contiguous_from_channels_last")
    def _fake(x):
        torch._check(x.dim() == 4, lambda: "contiguous_from_channels_last: expected argument 'x' "
                     f"to be a 4-D [N, C, H, W] tensor, got {x.dim()} dimensions")
        return x.new_empty(x.shape)

    @torch.library.register_fake("cnnkernels::copy_to_channels_last_")
    def _copy_fake(out, x):
        return None

    def _backward(ctx, grad):
        # in the input's layout: the channels_last kernel before this op gets a gradient it reads
        # in place (ATen's CPU max-pool backward takes 16 ms instead of 3.4 ms on an NCHW one)
        return grad.contiguous(memory_format=torch.channels_last)

    torch.library.register_autograd("cnnkernels::contiguous_from_channels_last", _backward)
