"""h-swish and h-sigmoid: the Python front of the ops.

    hardswish(x)   = x * relu6(x + 3) / 6          (MobileNetV3)
    hardsigmoid(x) = relu6(x + 3) / 6

Forward and backward equal torch.nn.functional.hardswish / hardsigmoid bit for bit (same values at
the kinks, NaN propagated), for float32/float16/bfloat16/float64, any shape and strides, with the
output in the input's memory format. Autograd saves only the input. Kernels: csrc/cpu and
csrc/cuda/hardswish_kernel.*, cnnkernels/triton/hardswish.py. Autograd: csrc/autograd/hardswish.cpp
for the C++ ops, _register_autograd below for the Triton ones. Reference: cnnkernels/reference.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .. import _extension, backend
from ..reference import hardswish as reference
from . import _autograd

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclasses.dataclass(frozen=True)
class _Impl:
    """The three entry points of one activation on one backend."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    forward_: Callable[[torch.Tensor], object]
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    formula: _autograd.Formula | None = None  # forward with its autograd (ours; None: the reference)


def _check_input(x: object, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected argument 'x' to be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: expected argument 'x' to be a float32, float16, bfloat16 or float64 "
                        f"tensor, got {x.dtype}")


def _check_inplace_autograd(x: torch.Tensor, op: str) -> bool:
    """True if the in-place op must be recorded by autograd; raises for a leaf that needs grad."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return False
    if x.is_leaf:
        raise RuntimeError(
            f"{op}(inplace=True): argument 'x' is a leaf tensor that requires grad, and autograd "
            "cannot differentiate through overwriting it; use inplace=False")
    return True


class _InplaceWithGrad(torch.autograd.Function):
    """In-place activation of a non-leaf tensor that needs grad. The activations are not
    invertible, so the original input is saved (one copy: what the out-of-place op keeps too)."""

    @staticmethod
    def forward(ctx, x, impl):
        ctx.impl = impl
        ctx.save_for_backward(x.clone())
        impl.forward_(x)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return ctx.impl.backward(grad_output, x), None


class _Activation:
    """The front of one activation: validates, picks the backend's implementation, and runs it."""

    def __init__(self, name: str, impls: dict[str, _Impl]):
        self.name = name
        self.impls = impls
        self.__name__ = name

    def _impl(self, kind: str) -> _Impl:
        if kind not in self.impls:  # only "triton" is added late: importing triton is lazy
            self.impls[kind] = _triton_impl(self.name)
        return self.impls[kind]

    def __call__(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        _check_input(x, self.name)
        impl = self._impl(backend.select(x.device))
        if not inplace:
            return _autograd.call(impl.formula, x) if impl.formula else impl.forward(x)
        if _check_inplace_autograd(x, self.name):
            return _InplaceWithGrad.apply(x, impl)
        impl.forward_(x)
        return x


def _register_autograd(forward_op: str, backward_op: str,
                       second_derivative: Callable[[torch.Tensor], torch.Tensor]
                       ) -> _autograd.Formula:
    """forward: save x, grad = backward(g, x). backward: differentiable too (double backward),
    d/dg = backward(gg, x) and d/dx = gg * g * act''(x). Returns the forward's formula."""
    ops = torch.ops.cnnkernels
    backward_fn = getattr(ops, backward_op).default  # skips overload resolution

    def setup_forward(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def forward_grad(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return (_autograd.call(backward_formula, grad_output, x),)

    def setup_backward(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_grad(ctx, grad_grad_input):
        grad_output, x = ctx.saved_tensors
        grad_grad_output = _autograd.call(backward_formula, grad_grad_input, x)
        grad_x = grad_grad_input * grad_output * second_derivative(x)
        return grad_grad_output, grad_x

    backward_formula = _autograd.Formula(backward_fn, setup_backward, backward_grad).register(
        f"cnnkernels::{backward_op}")
    return _autograd.Formula(getattr(ops, forward_op).default, setup_forward,
                             forward_grad).register(f"cnnkernels::{forward_op}")


def _register_python_kernels(name: str) -> None:
    """Fake kernels (shapes and strides, for torch.compile and meta tensors) of the compiled ops,
    and the version-counter bump of the in-place one."""
    @torch.library.register_fake(f"cnnkernels::{name}")
    def _forward_fake(x):
        return torch.empty_like(x)

    @torch.library.register_fake(f"cnnkernels::{name}_")
    def _inplace_fake(x):
        return None

    @torch.library.impl(f"cnnkernels::{name}_", "ADInplaceOrView")
    def _inplace_bumps_version(x):
        # A C++ schema's (a!) does not bump the version counter by itself; without this, autograd
        # would not notice that a tensor it saved was overwritten and return wrong gradients.
        with torch._C._AutoDispatchBelowADInplaceOrView():
            getattr(torch.ops.cnnkernels, f"{name}_")(x)
        torch.autograd.graph.increment_version(x)

    @torch.library.register_fake(f"cnnkernels::{name}_backward")
    def _backward_fake(grad_output, x):
        torch._check(grad_output.shape == x.shape,
                     lambda: f"{name}_backward: 'grad_output' and 'x' must have the same shape")
        return torch.empty_like(x)


def _compiled_impl(name: str) -> _Impl:
    """The C++ ops, whose autograd is C++ too (csrc/autograd/hardswish.cpp): called directly."""
    ops = torch.ops.cnnkernels
    return _Impl(getattr(ops, name).default, getattr(ops, f"{name}_").default,
                 getattr(ops, f"{name}_backward").default)


_triton_formulas: dict[str, _autograd.Formula] = {}


def _load_triton_ops() -> None:
    if _triton_formulas:
        return
    from ..triton import hardswish as _triton_kernels  # noqa: F401  (registers the ops)

    for name in ("hardswish", "hardsigmoid"):
        _triton_formulas[name] = _register_autograd(
            f"{name}_triton", f"{name}_backward_triton",
            getattr(reference, f"{name}_second_derivative"))


def _triton_impl(name: str) -> _Impl:
    """Triton entry points, imported on first use so that `import cnnkernels` never imports
    triton (TRITON_INTERPRET must be set before that import to take effect)."""
    _load_triton_ops()
    ops = torch.ops.cnnkernels
    return _Impl(getattr(ops, f"{name}_triton").default, getattr(ops, f"{name}_triton_").default,
                 getattr(ops, f"{name}_backward_triton").default, _triton_formulas[name])


def _make(name: str) -> _Activation:
    impls = {
        "torch": _Impl(getattr(reference, name), getattr(reference, f"{name}_"),
                       getattr(reference, f"{name}_backward")),
    }
    if _extension.cpu_ext:
        _register_python_kernels(name)
        impls["cpu"] = impls["cuda"] = _compiled_impl(name)
    return _Activation(name, impls)


hardswish = _make("hardswish")
hardswish.__doc__ = """hardswish(x, inplace=False) -> Tensor: x * relu6(x + 3) / 6.

Same values and gradients as torch.nn.functional.hardswish. With inplace=True, x is overwritten and
returned; a leaf tensor that requires grad is refused."""

hardsigmoid = _make("hardsigmoid")
hardsigmoid.__doc__ = """hardsigmoid(x, inplace=False) -> Tensor: relu6(x + 3) / 6.

Same values and gradients as torch.nn.functional.hardsigmoid. With inplace=True, x is overwritten
and returned; a leaf tensor that requires grad is refused."""
