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


def gradients_by_recompute(forward: Callable[..., torch.Tensor], inputs: tuple, needs,
                           grad: torch.Tensor) -> list:
    """The gradients of forward(*inputs) for the inputs where `needs` is true (None elsewhere),
    themselves differentiable: what a backward must return under create_graph=True (double
    backward: gradient penalties, MAML, Hessian-vector products). Our kernels' backwards are not
    differentiable, so `forward` (the op in plain torch ops, e.g. its reference) is run again on
    the saved inputs and autograd differentiates that; it costs one more forward, only then."""
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs))
              if need and isinstance(t, torch.Tensor) and t.requires_grad]
    result = [None] * len(inputs)
    if not wanted:
        return result
    with torch.enable_grad():
        output = forward(*inputs)
    got = torch.autograd.grad(output, [inputs[i] for i in wanted], grad, create_graph=True,
                              allow_unused=True)
    for i, g in zip(wanted, got):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return result


def creating_graph() -> bool:
    """Inside a backward: whether autograd records it (create_graph=True), so that the gradients
    it returns must be differentiable. Not while torch.compile traces the backward."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def activation_for_recompute(pre: torch.Tensor, code: int, negative_slope: float) -> torch.Tensor:
    """act(pre) for gradients_by_recompute: the reference activation, except hardsigmoid as
    relu6(pre + 3) / 6, whose backward autograd can differentiate (torch has no derivative for
    aten::hardsigmoid_backward); same values and the same derivative, 0 at ±3."""
    from .. import activations
    from ..reference.activation import apply_activation

    if code == activations.HARDSIGMOID:
        return torch.nn.functional.relu6(pre + 3) / 6
    return apply_activation(pre, code, negative_slope)
