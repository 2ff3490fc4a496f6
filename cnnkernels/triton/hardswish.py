"""Triton kernels of h-swish / h-sigmoid and the ops that launch them.

The ops `cnnkernels::hardswish_triton` (and `_backward`, in-place twins for hardsigmoid) are
`torch.library.triton_op`s, so torch.compile sees through them to the kernel. Tensors are walked
as flat arrays in storage order; output strides equal the input's (torch.empty_like), and a
non-dense input is first copied into that layout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import activations
from .activation import activation_backward, activation_forward

BLOCK_GPU = 1024
BLOCK_INTERPRETER = 8192  # fewer, larger programs: the interpreter's cost is per program


@triton.jit
def _forward_kernel(x_ptr, y_ptr, n, ACT: tl.constexpr, CPU_MATH: tl.constexpr,
                    COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask).to(COMPUTE)
    y = activation_forward(x, ACT, 0.0, CPU_MATH)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(g_ptr, x_ptr, out_ptr, n, ACT: tl.constexpr, COMPUTE: tl.constexpr,
                     BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(g_ptr + offsets, mask=mask).to(COMPUTE)
    x = tl.load(x_ptr + offsets, mask=mask).to(COMPUTE)
    out = activation_backward(g, x, ACT, 0.0)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Its elements fill one block of memory without gaps or aliasing, in some dimension order
    (NCHW, channels_last, a permutation...): a kernel may walk it as a flat array."""
    if t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _compute_dtype(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _block(t: torch.Tensor) -> int:
    return BLOCK_GPU if t.is_cuda else BLOCK_INTERPRETER


def _grid(n: int, block: int):
    return (triton.cdiv(n, block),)


def _in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` with the strides of `like` (a dense tensor), copying only when they differ."""
    if t.stride() == like.stride() and is_non_overlapping_and_dense(t):
        return t
    return torch.empty_like(like).copy_(t)


def _launch_forward(x: torch.Tensor, y: torch.Tensor, act: int) -> None:
    n = x.numel()
    if n == 0:
        return
    block = _block(x)
    torch.library.wrap_triton(_forward_kernel)[_grid(n, block)](
        x, y, n, ACT=act, CPU_MATH=not x.is_cuda, COMPUTE=_compute_dtype(x), BLOCK=block)


def _forward(x: torch.Tensor, act: int) -> torch.Tensor:
    y = torch.empty_like(x)
    _launch_forward(_in_layout_of(x, y), y, act)
    return y


def _forward_(x: torch.Tensor, act: int) -> None:
    if is_non_overlapping_and_dense(x):
        _launch_forward(x, x, act)
        return
    tmp = torch.empty_like(x).copy_(x)
    _launch_forward(tmp, tmp, act)
    x.copy_(tmp)


def _backward(grad_output: torch.Tensor, x: torch.Tensor, act: int) -> torch.Tensor:
    grad_input = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return grad_input
    block = _block(x)
    torch.library.wrap_triton(_backward_kernel)[_grid(n, block)](
        _in_layout_of(grad_output, grad_input), _in_layout_of(x, grad_input), grad_input, n,
        ACT=act, COMPUTE=_compute_dtype(x), BLOCK=block)
    return grad_input


@torch.library.triton_op("cnnkernels::hardswish_triton", mutates_args=())
def hardswish_triton(x: torch.Tensor) -> torch.Tensor:
    return _forward(x, activations.HARDSWISH)


@torch.library.triton_op("cnnkernels::hardswish_triton_", mutates_args={"x"})
def hardswish_triton_(x: torch.Tensor) -> None:
    _forward_(x, activations.HARDSWISH)


@torch.library.triton_op("cnnkernels::hardswish_backward_triton", mutates_args=())
def hardswish_backward_triton(grad_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _backward(grad_output, x, activations.HARDSWISH)


@torch.library.triton_op("cnnkernels::hardsigmoid_triton", mutates_args=())
def hardsigmoid_triton(x: torch.Tensor) -> torch.Tensor:
    return _forward(x, activations.HARDSIGMOID)


@torch.library.triton_op("cnnkernels::hardsigmoid_triton_", mutates_args={"x"})
def hardsigmoid_triton_(x: torch.Tensor) -> None:
    _forward_(x, activations.HARDSIGMOID)


@torch.library.triton_op("cnnkernels::hardsigmoid_backward_triton", mutates_args=())
def hardsigmoid_backward_triton(grad_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _backward(grad_output, x, activations.HARDSIGMOID)
