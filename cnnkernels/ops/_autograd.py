"""Eager-mode autograd for our ops, with less Python per call than torch.library's.

Every op registers its autograd formula with `torch.library.register_autograd`, so that
torch.ops.cnnkernels.* is differentiable, torch.compile traces it and opcheck checks it. In eager
mode the Python fronts call the *same* formula through one plain torch.autograd.Function instead:
register_autograd's generic wrapper costs ~10 µs per forward and ~30 µs per forward+backward more
on our 2-vCPU dev machine, which is most of the time of a small tensor (and more than a GPU kernel
takes). Under torch.compile the fronts call the op itself.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


@dataclasses.dataclass(frozen=True)
class Formula:
    """An op and its autograd formula, in register_autograd's calling convention."""

    forward: Callable[..., Any]  # the op (an OpOverload)
    setup_context: Callable[[Any, tuple, Any], None]  # (ctx, inputs, output)
    backward: Callable[..., tuple]  # (ctx, *grads) -> one gradient (or None) per input

    def register(self, qualname: str) -> "Formula":
        torch.library.register_autograd(qualname, self.backward, setup_context=self.setup_context)
        return self


class _Function(torch.autograd.Function):
    """Runs formula.forward below the autograd dispatch key and records formula.backward."""

    @staticmethod
    def forward(ctx, *args):
        *inputs, formula = args
        with torch._C._AutoDispatchBelowAutograd():
            output = formula.forward(*inputs)
        formula.setup_context(ctx, tuple(inputs), output)
        ctx.formula = formula
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (*ctx.formula.backward(ctx, *grads), None)


def _needs_grad(inputs: tuple) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


def call(formula: Formula, *inputs):
    """formula.forward(*inputs), differentiable, with the least eager overhead."""
    if torch.compiler.is_compiling():
        return formula.forward(*inputs)  # traced through the registered autograd and fake kernels
    if _needs_grad(inputs):
        return _Function.apply(*inputs, formula)
    with torch._C._AutoDispatchBelowAutograd():  # nothing to record
        return formula.forward(*inputs)
