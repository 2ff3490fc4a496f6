"""Depthwise 2-D convolution: the Python front of the op.

    depthwise_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1,
                     *, scale=None, shift=None, activation="identity", negative_slope=0.01)

equals F.conv2d(x, weight, bias, stride, padding, dilation, groups=C) for weight [C*m, 1, kh, kw]
(channel multiplier m >= 1), followed, when asked, by the inference epilogue
act(scale * conv + shift) per output channel (a folded BatchNorm and an activation in the same
pass). Gradients for x, weight and bias; the epilogue is for inference (no autograd through it).
Under create_graph=True (double backward) the gradients come from F.conv2d's autograd instead of
our gradient kernels, so that they can be differentiated again.
Output in the input's memory format (channels_last in, channels_last out).
Kernels: csrc/cpu/depthwise_conv2d_kernel.cpp, csrc/cuda/depthwise_conv2d_kernel.cu (not yet
run on a GPU; see AUTO_KERNELS), cnnkernels/triton/depthwise_conv2d.py. Autograd:
csrc/autograd/depthwise_conv2d.cpp for the C++ ops, _register_triton_autograd for the Triton one.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .. import _extension, activations, backend
from ._autocast import cast_for_autocast
from ..reference import depthwise_conv2d as reference
from . import _args, _autograd

IntPair = Union[int, Sequence[int]]
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: implementations that exist for this op
KERNELS = frozenset({"cpu", "cuda", "triton"})
#: what backend "auto" picks from: the CUDA C++ kernels (csrc/cuda/depthwise_conv2d_kernel.cu)
#: are not yet verified on a GPU, so Triton serves CUDA tensors until the tests pass there with
#: backend "cuda"; set_backend("cuda") selects them explicitly
AUTO_KERNELS = frozenset({"cpu", "triton"})
_OP = "depthwise_conv2d"


def _pair(value: IntPair, name: str) -> list[int]:
    return _args.as_int_pair(value, _OP, name)


def _same_padding(kernel: list[int], stride: list[int], dilation: list[int]) -> list[int]:
    if stride != [1, 1]:
        raise ValueError(f"{_OP}: padding='same' needs stride 1, got stride {stride}")
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if any(t % 2 for t in total):
        raise ValueError(f"{_OP}: padding='same' with kernel {kernel} and dilation {dilation} "
                         "needs asymmetric padding, which is not supported; pad explicitly")
    return [t // 2 for t in total]


def _check_types(x, weight, bias, scale, shift) -> None:
    _args.check_tensor(x, _OP, "x")
    _args.check_tensor(weight, _OP, "weight")
    for name, t in (("bias", bias), ("scale", scale), ("shift", shift)):
        _args.check_optional_tensor(t, _OP, name)


def _check_tensors(x, weight, bias, scale, shift) -> None:
    if x.dim() != 4:
        raise ValueError(f"{_OP}: expected 'x' to be a 4-D tensor [N, C, H, W], got "
                         f"{tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{_OP}: expected 'x' to be a float32, float16, bfloat16 or float64 "
                        f"tensor, got {x.dtype}")
    channels = x.shape[1]
    if (weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] == 0
            or weight.shape[0] % max(channels, 1)):
        raise ValueError(f"{_OP}: expected 'weight' of shape [C*multiplier, 1, kh, kw] for "
                         f"C={channels} input channels, got {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{_OP}: '{name}' must have the dtype and device of 'x' "
                             f"({x.dtype}, {x.device}), got {t.dtype}, {t.device}")
    out_channels = weight.shape[0]
    for name, t in (("bias", bias), ("scale", scale), ("shift", shift)):
        if t is not None and (t.dim() != 1 or t.shape[0] != out_channels):
            raise ValueError(f"{_OP}: '{name}' must have shape [{out_channels}], "
                             f"got {tuple(t.shape)}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{_OP}: '{name}' is on {t.device} but 'x' is on {x.device}")
    if (scale is None) != (shift is None):
        raise ValueError(f"{_OP}: 'scale' and 'shift' must be given together")


def _check_geometry(x, weight, stride, padding, dilation) -> None:
    if min(stride) < 1:
        raise ValueError(f"{_OP}: 'stride' must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"{_OP}: 'padding' must be >= 0, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"{_OP}: 'dilation' must be >= 1, got {dilation}")
    for dim, (size, k, p, d) in enumerate(zip(x.shape[2:], weight.shape[2:], padding, dilation)):
        if size + 2 * p < d * (k - 1) + 1:
            raise ValueError(f"{_OP}: the (dilated) kernel {tuple(weight.shape[2:])} is larger "
                             f"than the padded input {tuple(s + 2 * q for s, q in zip(x.shape[2:], padding))}")


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride: IntPair = 1, padding: IntPair | str = 0, dilation: IntPair = 1, *,
                     scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                     activation: str = "identity", negative_slope: float = 0.01) -> torch.Tensor:
    _check_types(x, weight, bias, scale, shift)
    x, weight, bias = cast_for_autocast(x, weight, bias)
    _check_tensors(x, weight, bias, scale, shift)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if isinstance(padding, str) and padding not in ("same", "valid"):
        raise ValueError(f"{_OP}: expected argument 'padding' to be an int, a pair of ints, "
                         f"'same' or 'valid', got {padding!r}")
    if padding == "same":
        padding = _same_padding(list(weight.shape[2:]), stride, dilation)
    elif padding == "valid":
        padding = [0, 0]
    else:
        padding = _pair(padding, "padding")
    _check_geometry(x, weight, stride, padding, dilation)
    code = activations.activation_code(activation)
    epilogue = scale is not None or code != activations.IDENTITY
    if epilogue and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, scale, shift)):
        raise RuntimeError(f"{_OP}: the fused scale/shift/activation epilogue is for inference; "
                           "call it under torch.no_grad() or apply BatchNorm and the activation "
                           "separately when training")
    kind = backend.select(x.device, AUTO_KERNELS if backend.get_backend() == "auto" else KERNELS,
                          _OP)
    args = (x, weight, bias, stride, padding, dilation, scale, shift, code, float(negative_slope))
    if kind == "torch" or (kind == "cuda" and not _extension.cuda_ext):
        return reference.depthwise_conv2d(*args)
    if kind == "triton":
        _load_triton_ops()
        return _autograd.call(_triton_formula[0], *args)
    return torch.ops.cnnkernels.depthwise_conv2d.default(*args)  # autograd in C++


# --- autograd and fake kernels ---------------------------------------------------------------

def _output_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last exactly when the kernels produce it (csrc/cpu/...: wants_channels_last)."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _register_triton_autograd(forward: str, backward_input: str,
                              backward_weight: str) -> _autograd.Formula:
    """The Triton ops' autograd; the C++ ops have theirs in csrc/autograd/depthwise_conv2d.cpp."""
    ops = torch.ops.cnnkernels
    grad_input_op = getattr(ops, backward_input).default
    grad_weight_op = getattr(ops, backward_weight).default

    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, scale, shift, code, _ = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        ctx.epilogue = scale is not None or code != activations.IDENTITY

    def backward(ctx, grad_output):
        if ctx.epilogue:
            raise RuntimeError(f"{_OP}: no gradient through the fused inference epilogue")
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        if _autograd.creating_graph():
            return _differentiable_gradients(ctx, grad_output, x, weight)
        # grad_x comes out in grad_output's memory format: make that x's, as F.conv2d's does.
        grad_output = grad_output.contiguous(memory_format=_output_format(x))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_input_op(grad_output, weight, list(x.shape), stride, padding, dilation)
        if ctx.needs_input_grad[1]:
            grad_w = grad_weight_op(grad_output, x, list(weight.shape), stride, padding, dilation)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_output.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None

    return _autograd.Formula(getattr(ops, forward).default, setup_context, backward).register(
        f"cnnkernels::{forward}")


def _differentiable_gradients(ctx, grad_output, x, weight) -> tuple:
    """The backward as F.conv2d's, for create_graph=True (our gradient kernels have no autograd of
    their own)."""
    stride, padding, dilation = ctx.geometry

    def forward(x, weight):
        return reference.depthwise_conv2d(x, weight, None, stride, padding, dilation)

    grad_x, grad_w = _autograd.gradients_by_recompute(forward, (x, weight),
                                                      ctx.needs_input_grad[:2], grad_output)
    grad_b = grad_output.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def _register_fakes(forward: str, backward_input: str, backward_weight: str) -> None:

    @torch.library.register_fake(f"cnnkernels::{forward}")
    def _forward_fake(x, weight, bias, stride, padding, dilation, scale=None, shift=None,
                      activation=0, negative_slope=0.01):
        oh = _out_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
        ow = _out_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
        return x.new_empty((x.shape[0], weight.shape[0], oh, ow)).contiguous(
            memory_format=_output_format(x))

    @torch.library.register_fake(f"cnnkernels::{backward_input}")
    def _grad_input_fake(grad_output, weight, input_size, stride, padding, dilation):
        return grad_output.new_empty(input_size).contiguous(
            memory_format=_output_format(grad_output))

    @torch.library.register_fake(f"cnnkernels::{backward_weight}")
    def _grad_weight_fake(grad_output, x, weight_size, stride, padding, dilation):
        return x.new_empty(weight_size)


#: the Triton op and its autograd, once loaded
_triton_formula: list[_autograd.Formula] = []


def _load_triton_ops() -> None:
    """Import the Triton kernels on first use (importing triton is lazy, see ops/hardswish.py)."""
    if _triton_formula:
        return
    from ..triton import depthwise_conv2d as _kernels  # noqa: F401  (registers the ops)

    _triton_formula.append(_register_triton_autograd(
        "depthwise_conv2d_triton", "depthwise_conv2d_backward_input_triton",
        "depthwise_conv2d_backward_weight_triton"))


if _extension.cpu_ext:  # the same ops serve CUDA tensors (csrc/cuda) when built with CUDA
    _register_fakes("depthwise_conv2d", "depthwise_conv2d_backward_input",
                    "depthwise_conv2d_backward_weight")
