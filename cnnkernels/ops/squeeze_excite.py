"""squeeze_excite: y = x · gate(fc2(act(fc1(mean_hw(x))))) per (image, channel), SENet's block.

Forward: the mean over H·W (one read of x), the two small fully connected layers on [N, C] in the
compute type, and one multiply pass. Backward, from x and the [N, C] intermediates: one fused pass
(`squeeze_excite_backward`) reads grad and x once and gives both grad · gate and the per-(n, c) sums
Σ grad · x the gate's gradient needs — autograd's composition spends three passes and an
input-sized temporary on them — then the small layers' gradients, and the pooling's gradient
added into dx in place (one more pass). Under create_graph=True (double backward) the gradients
come from autograd through the forward's torch ops instead, so that they can be differentiated
again. Kernels: csrc/cpu and csrc/cuda/squeeze_excite_kernel.*,
cnnkernels/triton/squeeze_excite.py; reference: cnnkernels/reference/squeeze_excite.py.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .. import _extension, activations, backend
from ..reference import squeeze_excite as reference
from ..reference.activation import activation_backward, apply_activation
from . import _args, _autograd
from .affine_act import _compute_dtype

_OP = "squeeze_excite"
KERNELS = frozenset({"cpu", "cuda", "triton"})
GATES = ("sigmoid", "hardsigmoid")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _backward_kernel(x: torch.Tensor):
    kind = backend.select(x.device, KERNELS, _OP)
    if (kind == "cpu" and _extension.cpu_ext) or (kind == "cuda" and _extension.cuda_ext):
        return torch.ops.cnnkernels.squeeze_excite_backward
    if kind == "triton":
        from ..triton import squeeze_excite as _triton  # noqa: F401  (registers the op)

        return torch.ops.cnnkernels.squeeze_excite_backward_triton
    return reference.squeeze_excite_backward


def _gate(pre: torch.Tensor, gate: str, recompute: bool = False) -> torch.Tensor:
    if gate == "sigmoid":
        return torch.sigmoid(pre)
    if recompute:
        return _autograd.activation_for_recompute(pre, activations.HARDSIGMOID, 0.0)
    return F.hardsigmoid(pre)


def _gate_backward(grad: torch.Tensor, pre: torch.Tensor, out: torch.Tensor, gate: str):
    if gate == "sigmoid":
        return torch.ops.aten.sigmoid_backward(grad, out)
    return torch.ops.aten.hardsigmoid_backward(grad, pre)


def _autocast_off(device: str):
    """A context with autocast off on `device`; entering torch.autocast costs ~20 µs, so only
    where autocast is on."""
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def _forward_math(x, w1, b1, w2, b2, code, negative_slope, gate, recompute=False):
    """(y, the [N, C] intermediates, the weights in the compute type), in torch ops: the forward,
    and with `recompute` (create_graph=True) the graph autograd differentiates twice."""
    compute = _compute_dtype(x.dtype)
    weights = [t if t is None or t.dtype == compute else t.to(compute) for t in (w1, b1, w2, b2)]
    # the small layers in the compute type even under autocast (which would run F.linear in
    # its lower precision and hand the backward kernel a gate it does not take)
    with _autocast_off(x.device.type):
        pooled = x.mean((2, 3), dtype=compute)
        hidden_pre = F.linear(pooled, weights[0], weights[1])
        if recompute:
            hidden = _autograd.activation_for_recompute(hidden_pre, code, negative_slope)
        else:
            hidden = apply_activation(hidden_pre, code, negative_slope)
        gate_pre = F.linear(hidden, weights[2], weights[3])
        scale = _gate(gate_pre, gate, recompute)
    y = x * scale[:, :, None, None].to(x.dtype)
    return y, (pooled, hidden_pre, hidden, gate_pre, scale), weights


class _SqueezeExcite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, code, negative_slope, gate):
        y, intermediates, weights = _forward_math(x, w1, b1, w2, b2, code, negative_slope, gate)
        ctx.config = (code, negative_slope, gate, [None if t is None else t.dtype for t in (w1, b1, w2, b2)])
        # the arguments themselves too (no copies): create_graph=True differentiates from them
        ctx.save_for_backward(x, *intermediates, weights[0], weights[2], w1, b1, w2, b2)
        return y

    @staticmethod
    def backward(ctx, grad):
        code, negative_slope, gate, dtypes = ctx.config
        x, pooled, hidden_pre, hidden, gate_pre, scale, w1, w2, *arguments = ctx.saved_tensors
        if _autograd.creating_graph():
            def forward(x, w1, b1, w2, b2):
                return _forward_math(x, w1, b1, w2, b2, code, negative_slope, gate,
                                     recompute=True)[0]

            grads = _autograd.gradients_by_recompute(forward, (x, *arguments),
                                                     ctx.needs_input_grad[:5], grad)
            return (*grads, None, None, None)
        grad_x, grad_scale = _backward_kernel(x)(grad, x, scale)
        grad_gate_pre = _gate_backward(grad_scale, gate_pre, scale, gate)
        grad_w2, grad_b2 = grad_gate_pre.t() @ hidden, grad_gate_pre.sum(0)
        grad_hidden_pre = activation_backward(grad_gate_pre @ w2, hidden_pre, code, negative_slope)
        grad_w1, grad_b1 = grad_hidden_pre.t() @ pooled, grad_hidden_pre.sum(0)
        if ctx.needs_input_grad[0]:  # the mean's gradient: grad_pooled / HW at every position
            grad_pooled = (grad_hidden_pre @ w1) / (x.shape[2] * x.shape[3])
            grad_x.add_(grad_pooled[:, :, None, None].to(grad_x.dtype))
        else:
            grad_x = None
        grads = [g.to(d) if d is not None and need else None
                 for g, d, need in zip((grad_w1, grad_b1, grad_w2, grad_b2), dtypes,
                                       ctx.needs_input_grad[1:5])]
        return (grad_x, *grads, None, None, None)


def _as_matrix(weight: torch.Tensor, name: str, rows: int | None, cols: int | None) -> torch.Tensor:
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        weight = weight.flatten(1)
    if weight.dim() != 2 or (rows is not None and weight.shape[0] != rows) or \
            (cols is not None and weight.shape[1] != cols):
        want = f"[{rows if rows is not None else 'S'}, {cols if cols is not None else 'S'}]"
        raise ValueError(f"{_OP}: expected argument '{name}' to have shape {want} (or "
                         f"{want[:-1]}, 1, 1] as a 1x1 convolution), got {tuple(weight.shape)}")
    return weight


def _check_types(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) -> None:
    """Tensors, all floating point: an integer x would get an integer gate (all zeros)."""
    named = (("x", x), ("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias),
             ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias))
    for name, t in named:
        if t is None and name.endswith("_bias"):
            continue
        _args.check_tensor(t, _OP, name)
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{_OP}: expected argument '{name}' to be a float32, float16, "
                            f"bfloat16 or float64 tensor, got {t.dtype}")


def squeeze_excite(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
                   fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None,
                   activation: str = "relu", gate: str = "hardsigmoid",
                   negative_slope: float = 0.01) -> torch.Tensor:
    """x · gate(fc2(act(fc1(mean_hw(x))))). fc1_weight: [S, C] (or [S, C, 1, 1]), fc2_weight:
    [C, S] (or [C, S, 1, 1]); `gate` is "sigmoid" (SENet) or "hardsigmoid" (MobileNetV3)."""
    _check_types(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if x.dim() != 4:
        raise ValueError(f"{_OP}: expected argument 'x' to be a 4-D tensor [N, C, H, W], got "
                         f"{tuple(x.shape)}")
    if gate not in GATES:
        raise ValueError(f"{_OP}: unknown gate {gate!r}; expected one of {', '.join(GATES)}")
    code = activations.activation_code(activation)
    channels = x.shape[1]
    w1 = _as_matrix(fc1_weight, "fc1_weight", None, channels)
    w2 = _as_matrix(fc2_weight, "fc2_weight", channels, w1.shape[0])
    for name, bias, size in (("fc1_bias", fc1_bias, w1.shape[0]), ("fc2_bias", fc2_bias, channels)):
        if bias is not None and tuple(bias.shape) != (size,):
            raise ValueError(f"{_OP}: expected argument '{name}' to have shape [{size}], got "
                             f"{tuple(bias.shape)}")
    for name, t in (("fc1_weight", w1), ("fc1_bias", fc1_bias), ("fc2_weight", w2),
                    ("fc2_bias", fc2_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{_OP}: argument '{name}' is on {t.device} but 'x' is on {x.device}")
    y = _SqueezeExcite.apply(x, w1, fc1_bias, w2, fc2_bias, code, float(negative_slope), gate)
    return y


if _extension.cpu_ext:

    @torch.library.register_fake("cnnkernels::squeeze_excite_backward")
    def _backward_fake(grad, x, gate):
        fmt = torch.channels_last if (not x.is_contiguous() and
                                      x.is_contiguous(memory_format=torch.channels_last)) \
            else torch.contiguous_format
        return torch.empty_like(x, memory_format=fmt), torch.empty_like(gate)
