"""pointwise_conv2d: a 1x1 convolution as a GEMM over channels with a fused per-output-channel
epilogue, act(scale·(W ⊛ x) + shift + bias (+ residual)).

Conv1×1 → BatchNorm (eval: fold it into scale/shift) → activation, and MobileNetV2's projection +
residual add, in one op. CPU: csrc/cpu/pointwise_conv2d_kernel.cpp (NCHW planes of 28x28 or
more: one batched BLAS GEMM, then the epilogue in place while the output fits in the cache;
otherwise oneDNN's fused convolution, or BLAS on cache-sized output tiles with the epilogue
applied to each tile while it is in cache). Triton: cnnkernels/triton/pointwise_conv2d.py, one tl.dot GEMM with
the epilogue on its accumulator (float64 stays on the reference). CUDA: torch's convolution
(cuDNN) then our affine_act kernel in place, one extra pass; with autograd, the torch reference.

Autograd. Triton: two Triton gradient GEMMs (grad_x, grad_W) with the activation's derivative in
their loads of grad (identity, ReLU from the saved output; other activations and the gradients of
scale and residual recompute the pre-activation in torch first). The C++ op: the GEMM gradients by
aten.convolution_backward, or for NCHW CPU input with stride 1 and one group by batched BLAS
matmuls (faster there than oneDNN's NCHW convolution backward), the epilogue's by recomputing its
input (from the output for identity and ReLU).

The input prologue, input_act(input_scale·x + input_shift) per input channel (DenseNet-B's and
pre-activation ResNet's BN → ReLU → Conv1×1): on Triton in the GEMM's operand loads, forward and
backward (grad_W's loads recompute it, grad_x's store applies its derivative); on the other
backends one elementwise pass (our affine_act kernel) before the GEMM, inside an autograd
Function that saves x, not the normalised tensor, and recomputes it in backward.

Under create_graph=True (double backward) every backend's gradients come from autograd through
the op in torch ops (F.conv2d and the epilogue), so that they can be differentiated again.

pointwise_conv2d_stats also returns the mean and biased variance of each output channel, for a
following training-mode BatchNorm: the Triton GEMM computes them from its output tiles in
registers; the other backends read the output once more.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _extension, activations, backend
from ..reference import pointwise_conv2d as reference
from ..reference.activation import activation_backward, apply_activation
from . import _args, _autograd
from ._autocast import cast_for_autocast
from .affine_act import _compute_dtype, affine_act

_OP = "pointwise_conv2d"
KERNELS = frozenset({"cpu", "cuda", "triton"})
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(x, weight, bias, stride, groups, scale, shift, residual) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: expected argument '{name}' to be a torch.Tensor, got "
                            f"{type(t).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{_OP}: expected argument 'x' to be a float32, float16, bfloat16 or "
                        f"float64 tensor, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{_OP}: expected argument 'x' to be 4-D [N, C, H, W], got shape "
                         f"{tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[2:] != (1, 1):
        raise ValueError(f"{_OP}: expected argument 'weight' to be [C_out, C_in / groups, 1, 1] "
                         f"(a 1x1 kernel), got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"{_OP}: 'weight' must have x's dtype and device ({x.dtype}, {x.device}), "
                        f"got {weight.dtype}, {weight.device}")
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups or weight.shape[0] % groups:
        raise ValueError(f"{_OP}: 'groups' ({groups}) must be a positive int dividing both the "
                         f"input channels ({x.shape[1]}) and the output channels ({weight.shape[0]})")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"{_OP}: 'weight' has {weight.shape[1]} input channels per group, but x "
                         f"has {x.shape[1]} channels in {groups} group(s)")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{_OP}: expected argument 'stride' to be a positive int, got {stride!r}")
    _check_channel_vectors(x, (("bias", bias), ("scale", scale), ("shift", shift)),
                           weight.shape[0], "output")
    if residual is not None:
        size = (x.shape[0], weight.shape[0], (x.shape[2] - 1) // stride + 1,
                (x.shape[3] - 1) // stride + 1)
        if tuple(residual.shape) != size or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"{_OP}: 'residual' must have the output's shape {size} and x's dtype "
                             f"and device, got {tuple(residual.shape)}, {residual.dtype}, "
                             f"{residual.device}")


def _check_channel_vectors(x, named, length, side) -> None:
    """Each given (name, tensor): [length] (one value per `side` channel), in the compute type of
    x, on x's device."""
    want = _compute_dtype(x.dtype)
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != length:
            raise ValueError(f"{_OP}: expected argument '{name}' to have shape [{length}] (one "
                             f"value per {side} channel), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != want or t.device != x.device:
            raise TypeError(f"{_OP}: expected argument '{name}' to be {want} on {x.device} (the "
                            f"compute type of {x.dtype} x), got {t.dtype} on {t.device}")


def _check_prologue(x, input_scale, input_shift) -> None:
    _check_channel_vectors(x, (("input_scale", input_scale), ("input_shift", input_shift)),
                           x.shape[1], "input")


def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     stride: int = 1, groups: int = 1, scale: torch.Tensor | None = None,
                     shift: torch.Tensor | None = None, activation: str = "identity",
                     negative_slope: float = 0.01,
                     residual: torch.Tensor | None = None,
                     input_scale: torch.Tensor | None = None,
                     input_shift: torch.Tensor | None = None,
                     input_activation: str = "identity",
                     input_negative_slope: float = 0.01) -> torch.Tensor:
    """act(scale · conv1x1(u, weight, stride, groups) + shift + bias (+ residual)) with
    u = input_act(input_scale · x + input_shift) (u = x when no prologue is given).

    `weight`: [C_out, C_in / groups, 1, 1] (or [C_out, C_in / groups]); `bias`, `scale`, `shift`:
    [C_out], `input_scale`, `input_shift`: [C_in], all in the compute type (float32 for
    float32/16/bfloat16 x, float64 for float64); `residual`: the output's shape. Differentiable in
    every tensor argument."""
    return _pointwise_conv2d(x, weight, bias, stride, groups, scale, shift, activation,
                             negative_slope, residual, input_scale, input_shift, input_activation,
                             input_negative_slope, stats=False)[0]


def pointwise_conv2d_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                           *, stride: int = 1, groups: int = 1, scale: torch.Tensor | None = None,
                           shift: torch.Tensor | None = None, activation: str = "identity",
                           negative_slope: float = 0.01, residual: torch.Tensor | None = None,
                           input_scale: torch.Tensor | None = None,
                           input_shift: torch.Tensor | None = None,
                           input_activation: str = "identity",
                           input_negative_slope: float = 0.01
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var): pointwise_conv2d's output y and, per output channel, the mean and biased
    variance of y as stored (compute type), which a following training-mode BatchNorm needs
    (`batch_norm_act(..., batch_stats=(mean, var))` then skips its statistics pass).

    The Triton backend computes them in the GEMM's epilogue from the tile in registers, so y is
    never read again; the other backends read y once more with batch_norm_act's statistics kernel.
    y is differentiable as pointwise_conv2d's output is; mean and var are not (a BatchNorm given
    them accounts for their gradient in its own backward)."""
    y, mean, var = _pointwise_conv2d(x, weight, bias, stride, groups, scale, shift, activation,
                                     negative_slope, residual, input_scale, input_shift,
                                     input_activation, input_negative_slope, stats=True)
    if mean is None:
        from .batch_norm_act import _kernels as batch_norm_kernels

        with torch.no_grad():
            mean, var = batch_norm_kernels(y).stats(y.detach())
    return y, mean, var


def _pointwise_conv2d(x, weight, bias, stride, groups, scale, shift, activation, negative_slope,
                      residual, input_scale, input_shift, input_activation, input_negative_slope,
                      stats):
    """(y, mean, var), mean and var None unless `stats` and the Triton kernel computed them."""
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        weight = weight[:, :, None, None]
    stride, groups = _args.as_int(stride, _OP, "stride"), _args.as_int(groups, _OP, "groups")
    x, weight, residual = cast_for_autocast(x, weight, residual)
    _check(x, weight, bias, stride, groups, scale, shift, residual)
    _check_prologue(x, input_scale, input_shift)
    code = activations.activation_code(activation)
    input_code = activations.activation_code(input_activation)
    if x.shape[1] == 0:
        return _no_input_channels(x, weight, bias, stride, scale, shift, residual, code,
                                  float(negative_slope)), None, None
    has_prologue = input_scale is not None or input_shift is not None or \
        input_code != activations.IDENTITY
    if has_prologue and _triton_gemm(x):
        tensors = (x, weight, bias, scale, shift, residual, input_scale, input_shift)
        if not _needs_grad(tensors):
            prologue = _prologue_vectors(x, input_scale, input_shift) + (
                input_code, float(input_negative_slope))
            y, mean, var = _triton_forward(x, weight, bias, stride, groups, scale, shift, residual,
                                           code, float(negative_slope), prologue, stats)
        else:
            y, mean, var = _TritonConv.apply(x, weight, bias, stride, groups, scale, shift,
                                             residual, code, float(negative_slope), stats,
                                             input_scale, input_shift, input_code,
                                             float(input_negative_slope))
        return (y, mean, var) if stats else (y, None, None)
    if has_prologue:
        return _PrologueConv.apply(x, input_scale, input_shift, input_activation,
                                   float(input_negative_slope), weight, bias, stride, groups, scale,
                                   shift, residual, code, float(negative_slope)), None, None
    return _conv(x, weight, bias, stride, groups, scale, shift, residual, code,
                 float(negative_slope), stats)


def _no_input_channels(x, weight, bias, stride, scale, shift, residual, code, negative_slope):
    """The op with C_in = 0: the convolution is zeros (F.conv2d returns no output channels
    there, oneDNN has no primitive for it), then the epilogue; gradients for every tensor
    (zeros for x and weight, which are empty)."""
    size = (x.shape[0], weight.shape[0], (x.shape[2] - 1) // stride + 1,
            (x.shape[3] - 1) // stride + 1)
    s, t = reference.epilogue_vectors(x, weight.shape[0], bias, scale, shift)
    # x and weight are empty: their sums are exactly 0, and tie them into the graph
    empty_sum = (x.sum() + weight.sum()).to(s.dtype)
    z = torch.zeros(size, dtype=s.dtype, device=x.device) + empty_sum
    pre = z * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)
    if residual is not None:
        pre = pre + residual.to(s.dtype)
    y = apply_activation(pre, code, negative_slope).to(x.dtype)
    return y.contiguous(memory_format=_layout(x))


def _conv(x, weight, bias, stride, groups, scale, shift, residual, code, negative_slope,
          stats=False):
    """(y, mean, var) of the op without a prologue on the selected backend (autograd where
    needed); mean and var only from the Triton kernel with `stats`, else None."""
    activation = activations.NAMES[code]
    kind = backend.select(x.device, KERNELS, _OP)
    needs_grad = _needs_grad((x, weight, bias, scale, shift, residual))
    if kind == "cpu" and _extension.cpu_ext:
        args = (x, weight, bias, stride, groups, scale, shift, residual, code, float(negative_slope))
        if needs_grad or torch.compiler.is_compiling():
            return torch.ops.cnnkernels.pointwise_conv2d.default(*args), None, None
        # nothing to record: straight to the kernel, past the autograd kernel
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.cnnkernels.pointwise_conv2d.default(*args), None, None
    if kind == "triton" and x.dtype != torch.float64:
        if not needs_grad:
            y, mean, var = _triton_forward(x, weight, bias, stride, groups, scale, shift, residual,
                                           code, negative_slope, stats=stats)
        else:
            y, mean, var = _TritonConv.apply(x, weight, bias, stride, groups, scale, shift, residual,
                                             code, negative_slope, stats, None, None,
                                             activations.IDENTITY, 0.01)
        return (y, mean, var) if stats else (y, None, None)
    if kind == "cuda" and not needs_grad:
        # cuDNN's GEMM, then our epilogue kernel over its output in place
        z = F.conv2d(x, weight, None, stride, 0, 1, groups)
        s, t = reference.epilogue_vectors(x, weight.shape[0], bias, scale, shift)
        return affine_act(z, s, t, activation, negative_slope, residual=residual, out=z), None, None
    x, stride = stride_one_input(x, stride)
    return reference.pointwise_conv2d(x, weight, bias, stride, groups, scale, shift, residual, code,
                                      float(negative_slope)), None, None


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --- the Triton GEMM (cnnkernels/triton/pointwise_conv2d.py) ---------------------------------------

def _triton_gemm(x) -> bool:
    """Whether the Triton GEMMs run the op (forward and backward, prologue fused): the Triton
    backend and a Triton GEMM dtype (float64 stays on the reference)."""
    return x.dtype != torch.float64 and backend.select(x.device, KERNELS, _OP) == "triton"


def _prologue_vectors(x, input_scale, input_shift):
    compute = _compute_dtype(x.dtype)
    channels = x.shape[1]
    s = input_scale if input_scale is not None else torch.ones(channels, dtype=compute,
                                                                device=x.device)
    t = input_shift if input_shift is not None else torch.zeros(channels, dtype=compute,
                                                                 device=x.device)
    # contiguous: the Triton GEMM indexes them by channel
    return s.detach().contiguous(), t.detach().contiguous()


def _triton_forward(x, weight, bias, stride, groups, scale, shift, residual, code, negative_slope,
                    prologue=None, stats=False):
    """(y, mean, var) from the Triton kernel; prologue: (input_scale, input_shift, code, slope)."""
    from ..triton import pointwise_conv2d as _triton  # noqa: F401  (registers the op)

    s, t = reference.epilogue_vectors(x, weight.shape[0], bias, scale, shift)
    in_scale, in_shift, in_code, in_slope = prologue if prologue is not None else (None, None, 0, 0.01)
    return torch.ops.cnnkernels.pointwise_conv2d_triton(
        x, weight, s.detach(), t.detach(), stride, groups, residual, code, negative_slope,
        in_scale, in_shift, in_code, in_slope, stats)


class _TritonConv(torch.autograd.Function):
    """The Triton forward (prologue in the operand loads, epilogue on the accumulator) and the
    Triton backward GEMMs (cnnkernels::pointwise_conv2d_triton_backward: the activation's
    derivative in the loads of grad, the prologue recomputed in the loads of x and its derivative
    in the store of grad_x). Saves x and y, never the normalised input."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, groups, scale, shift, residual, code, negative_slope,
                stats, input_scale, input_shift, input_code, input_slope):
        has_prologue = input_scale is not None or input_shift is not None or \
            input_code != activations.IDENTITY
        prologue = _prologue_vectors(x, input_scale, input_shift) + (input_code, input_slope) \
            if has_prologue else None
        y, mean, var = _triton_forward(x, weight, bias, stride, groups, scale, shift, residual,
                                       code, negative_slope, prologue, stats=stats)
        ctx.config = (stride, groups, code, negative_slope)
        ctx.prologue = None if prologue is None else prologue[2:]  # activation code, slope
        in_scale, in_shift = (None, None) if prologue is None else prologue[:2]
        # the prologue's arguments themselves too: create_graph=True differentiates from them
        ctx.save_for_backward(x, weight, bias, scale, shift, residual, y, in_scale, in_shift,
                              input_scale, input_shift)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var):
        return _triton_gradients(ctx, grad)


def _triton_gradients(ctx, grad):
    """_TritonConv's gradients, in the order of its forward's arguments."""
    from ..triton import pointwise_conv2d as _triton  # noqa: F401  (registers the op)

    x, weight, bias, scale, shift, residual, y, in_scale, in_shift, input_scale, input_shift = \
        ctx.saved_tensors
    stride, groups, code, negative_slope = ctx.config
    needs = ctx.needs_input_grad
    need_x, need_w, need_b, need_s, need_t, need_r = (needs[i] for i in (0, 1, 2, 5, 6, 7))
    need_in_scale, need_in_shift = needs[11], needs[12]
    prologue = ctx.prologue
    in_code, in_slope = prologue if prologue is not None else (activations.IDENTITY, 0.01)
    if _autograd.creating_graph():
        g = _differentiable_gradients(
            grad, (x, weight, bias, scale, shift, residual, input_scale, input_shift),
            (need_x, need_w, need_b, need_s, need_t, need_r, need_in_scale, need_in_shift),
            ctx.config, (in_code, in_slope))
        return (g[0], g[1], g[2], None, None, g[3], g[4], g[5], None, None, None, g[6], g[7],
                None, None)
    grad_scale = grad_residual = None
    act = code
    if need_s or need_r or code not in (activations.IDENTITY, activations.RELU):
        # act'(pre) needs pre (and grad_scale needs the GEMM's output): recompute the GEMM in
        # torch, then the Triton GEMMs take the finished dpre
        u = x if prologue is None else _prologue(x, in_scale, in_shift, activations.NAMES[in_code],
                                                   in_slope)
        dpre, grad_scale = _output_side(grad, u, weight, bias, scale, shift, residual, y, stride,
                                        groups, code, negative_slope, need_s)
        grad_residual = dpre.to(x.dtype) if need_r else None
        grad, act = dpre, activations.IDENTITY
    need_prologue_sums = need_in_scale or need_in_shift
    need_input = need_x or need_prologue_sums
    grad_x, grad_w, sums, grad_in_scale, grad_in_shift = \
        torch.ops.cnnkernels.pointwise_conv2d_triton_backward(
            grad, x, weight, y, None if scale is None else scale.detach().contiguous(), stride,
            groups, act, in_scale, in_shift, in_code, in_slope, need_input, need_w,
            need_b or need_t, need_prologue_sums)
    return (grad_x if need_x else None, grad_w if need_w else None, sums if need_b else None,
            None, None, grad_scale, sums if need_t else None, grad_residual, None, None, None,
            grad_in_scale if need_in_scale else None, grad_in_shift if need_in_shift else None,
            None, None)


# --- the input prologue ------------------------------------------------------------------------

def _prologue(x, input_scale, input_shift, activation, negative_slope):
    """u = act(input_scale · x + input_shift), one pass (affine_act), without autograd."""
    s, t = _prologue_vectors(x, input_scale, input_shift)
    with torch.no_grad():
        return affine_act(x, s, t, activation, negative_slope)


class _PrologueConv(torch.autograd.Function):
    """pointwise_conv2d with an input prologue. Saves x (not the normalised u, which it
    recomputes in backward), so that autograd keeps one input-sized tensor, as for a plain conv."""

    @staticmethod
    def forward(ctx, x, input_scale, input_shift, input_activation, input_slope, weight, bias,
                stride, groups, scale, shift, residual, code, negative_slope):
        u = _prologue(x, input_scale, input_shift, input_activation, input_slope)
        y = _conv(u, weight, bias, stride, groups, scale, shift, residual, code, negative_slope)[0]
        ctx.prologue = (input_activation, input_slope)
        ctx.config = (stride, groups, code, negative_slope)
        ctx.save_for_backward(x, input_scale, input_shift, weight, bias, scale, shift, residual, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, input_scale, input_shift, weight, bias, scale, shift, residual, y = ctx.saved_tensors
        input_activation, input_slope = ctx.prologue
        stride, groups, code, negative_slope = ctx.config
        needs = ctx.needs_input_grad
        if _autograd.creating_graph():
            g = _differentiable_gradients(
                grad, (x, weight, bias, scale, shift, residual, input_scale, input_shift),
                tuple(needs[i] for i in (0, 5, 6, 9, 10, 11, 1, 2)), ctx.config,
                (activations.activation_code(input_activation), input_slope))
            return (g[0], g[6], g[7], None, None, g[1], g[2], None, None, g[3], g[4], g[5], None,
                    None)
        need_prologue = needs[0] or needs[1] or needs[2]
        u = _prologue(x, input_scale, input_shift, input_activation, input_slope)
        grad_u, grad_w, grad_b, grad_s, grad_t, grad_r = _gradients(
            grad, u, weight, bias, scale, shift, residual, y, stride, groups, code, negative_slope,
            (need_prologue, needs[5], needs[6], needs[9], needs[10], needs[11]))
        grad_x = grad_in_scale = grad_in_shift = None
        if need_prologue:
            compute = _compute_dtype(x.dtype)
            view = (1, -1, 1, 1)
            xc = x.to(compute)
            pre = xc if input_scale is None else xc * input_scale.view(view)
            if input_shift is not None:
                pre = pre + input_shift.view(view)
            dpre = activation_backward(grad_u.to(compute), pre,
                                       activations.activation_code(input_activation), input_slope)
            if needs[0]:
                grad_x = (dpre if input_scale is None else dpre * input_scale.view(view)).to(x.dtype)
            if needs[1]:
                grad_in_scale = (dpre * xc).sum((0, 2, 3))
            if needs[2]:
                grad_in_shift = dpre.sum((0, 2, 3))
        return (grad_x, grad_in_scale, grad_in_shift, None, None, grad_w, grad_b, None, None,
                grad_s, grad_t, grad_r, None, None)


# --- create_graph=True: gradients autograd can differentiate again ------------------------------

def _differentiable_gradients(grad, inputs, needs, config, prologue=(activations.IDENTITY, 0.01)):
    """Gradients for inputs (x, weight, bias, scale, shift, residual, input_scale, input_shift)
    by autograd through the op in torch ops (our GEMM and prologue kernels have no autograd of
    their own), for create_graph=True."""
    stride, groups, code, negative_slope = config
    in_code, in_slope = prologue

    def forward(x, weight, bias, scale, shift, residual, input_scale, input_shift):
        u = x
        if input_scale is not None or input_shift is not None or in_code != activations.IDENTITY:
            view = (1, -1, 1, 1)
            pre = x.to(_compute_dtype(x.dtype))
            pre = pre if input_scale is None else pre * input_scale.view(view)
            pre = pre if input_shift is None else pre + input_shift.view(view)
            u = _autograd.activation_for_recompute(pre, in_code, in_slope).to(x.dtype)
        u, sampled_stride = stride_one_input(u, stride)
        z = F.conv2d(u, weight, None, sampled_stride, 0, 1, groups)
        s, t = reference.epilogue_vectors(x, weight.shape[0], bias, scale, shift)
        pre = z.to(s.dtype) * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)
        if residual is not None:
            pre = pre + residual.to(s.dtype)
        return _autograd.activation_for_recompute(pre, code, negative_slope).to(x.dtype)

    return _autograd.gradients_by_recompute(forward, inputs, needs, grad)


def _gradients(grad, x, weight, bias, scale, shift, residual, y, stride, groups, code,
               negative_slope, needs):
    """Gradients of act(scale·conv1x1(x) + shift + bias (+ residual)) = y for x, weight, bias,
    scale, shift and residual (None where `needs` says not needed)."""
    need_x, need_w, need_b, need_s, need_t, need_r = needs
    dpre, grad_scale = _output_side(grad, x, weight, bias, scale, shift, residual, y, stride,
                                    groups, code, negative_slope, need_s)
    dims = (0, 2, 3)
    grad_shift = grad_bias = None
    if need_b or need_t:
        total = dpre.sum(dims)
        grad_bias, grad_shift = (total if need_b else None), (total if need_t else None)
    grad_residual = dpre.to(x.dtype) if need_r else None
    grad_x = grad_w = None
    if need_x or need_w:
        dz = (dpre if scale is None else dpre * scale.view(1, -1, 1, 1)).to(x.dtype)
        if matmul_applies(x, stride, groups):
            grad_x, grad_w = _matmul_gradients(dz, x, weight, need_x, need_w)
        else:
            grad_x, grad_w = _convolution_backward(dz, x, weight, stride, groups, need_x, need_w)
    return grad_x, grad_w, grad_bias, grad_scale, grad_shift, grad_residual


def stride_one_input(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, int]:
    """(x[:, :, ::stride, ::stride] dense in x's layout, 1) for a CPU x with stride > 1, else
    (x, stride): a 1x1 convolution of either is the same. On the CPU, torch's (oneDNN's) weight
    gradient of a channels_last 1x1 stride-2 convolution corrupts memory (seen with torch 2.14.1,
    oneDNN 3.12, 1 and 2 threads: crashes, hangs or wrong weight gradients from 48x48 inputs up,
    tests/test_pointwise_conv2d.py::test_strided_channels_last_weight_gradient_avoids_torch_bug);
    at stride 1 it is right."""
    if stride == 1 or x.device.type != "cpu" or x.dim() != 4:
        return x, stride
    sampled = x[:, :, ::stride, ::stride]
    return sampled.contiguous(memory_format=_layout(x)), 1


def _layout(x: torch.Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _convolution_backward(dz, x, weight, stride, groups, need_x, need_w):
    """(grad_x, grad_w) of the 1x1 convolution, at stride 1 on the sampled input where
    stride_one_input says so (grad_x scattered back into x's shape, zeros between samples)."""
    sampled, sampled_stride = stride_one_input(x, stride)
    grad_sampled, grad_w, _ = torch.ops.aten.convolution_backward(
        dz, sampled, weight, None, [sampled_stride] * 2, [0, 0], [1, 1], False, [0, 0], groups,
        [need_x, need_w, False])
    if grad_sampled is None or sampled is x:
        return grad_sampled, grad_w
    grad_x = torch.zeros_like(x, memory_format=_layout(x))
    grad_x[:, :, ::stride, ::stride] = grad_sampled
    return grad_x, grad_w


def matmul_applies(x, stride, groups) -> bool:
    """Whether the CPU runs this 1x1 convolution's GEMMs as batched BLAS matmuls (the C++ op's
    forward without an epilogue, and the backward here): a CPU NCHW float32/float64 input, stride
    1, one group, planes of at least 28x28. There the matmuls beat ATen's oneDNN convolution,
    which reorders NCHW to its blocked layout and back; on smaller planes and in channels_last
    oneDNN is as fast or faster, so it stays. The C++ forward applies the same rule
    (kMatmulMinPlane in csrc/cpu/pointwise_conv2d_kernel.cpp)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and \
        stride == 1 and groups == 1 and x.dim() == 4 and x.is_contiguous() and \
        x.shape[2] * x.shape[3] >= _MATMUL_MIN_PLANE


_MATMUL_MIN_PLANE = 28 * 28


# grad_W as one batched matmul then a sum over the batch while that [N, C_out, C_in] temporary
# stays below this many elements (64 MiB in float32); above it, one accumulating GEMM per image
_BATCHED_WEIGHT_GRAD_LIMIT = 16 * 1024 * 1024


def _matmul_gradients(dz, x, weight, need_x, need_w):
    """grad_x[n] = Wᵀ·dz[n] and grad_W = Σ_n dz[n]·x[n]ᵀ by BLAS, NCHW (see matmul_applies)."""
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    d3 = dz.contiguous().view(n, cout, h * w)
    w2 = weight.view(cout, cin)
    grad_x = grad_w = None
    if need_x:
        # bmm over the expanded weight: torch.matmul(2-D, 3-D) folds the batch into one mm
        # through transposed copies of dz and of the result (2 x 8.5 ms on 8x64x56x56)
        grad_x = torch.bmm(w2.t().expand(n, cin, cout), d3).view(n, cin, h, w)
    if need_w:
        x3 = x.view(n, cin, h * w)
        if n * cout * cin <= _BATCHED_WEIGHT_GRAD_LIMIT:
            grad_w = torch.bmm(d3, x3.transpose(1, 2)).sum(0)
        else:
            grad_w = torch.zeros(cout, cin, dtype=x.dtype, device=x.device)
            for image in range(n):
                grad_w.addmm_(d3[image], x3[image].t())
        grad_w = grad_w.view(weight.shape)
    return grad_x, grad_w


def _output_side(grad, x, weight, bias, scale, shift, residual, y, stride, groups, code,
                 negative_slope, need_s):
    """(dpre, grad_scale): act'(pre)·grad in the compute type, and Σ dpre·conv1x1(x) per channel
    when `need_s` (else None). Recomputes the GEMM where act' or grad_scale needs it."""
    compute = _compute_dtype(x.dtype)
    z = None
    if code == activations.CODES["identity"]:
        dpre = grad.to(compute)
    elif code == activations.CODES["relu"]:
        # relu'(pre) from y = relu(pre) as threshold_backward takes it: 0 where y <= 0, else 1,
        # NaN included (torch passes the gradient through a NaN)
        dpre = torch.ops.aten.threshold_backward(grad, y, 0).to(compute)
    else:  # recompute the activation's input: one more GEMM
        z = F.conv2d(x, weight, None, stride, 0, 1, groups).to(compute)
        s, t = reference.epilogue_vectors(x, weight.shape[0], bias, scale, shift)
        pre = z * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)
        if residual is not None:
            pre = pre + residual.to(compute)
        dpre = activation_backward(grad.to(compute), pre, code, negative_slope)
    grad_scale = None
    if need_s:
        if z is None:
            z = F.conv2d(x, weight, None, stride, 0, 1, groups).to(compute)
        grad_scale = (dpre * z).sum((0, 2, 3))
    return dpre, grad_scale


if _extension.cpu_ext:  # the op's autograd is C++: csrc/autograd/pointwise_conv2d.cpp

    @torch.library.register_fake("cnnkernels::pointwise_conv2d")
    def _pointwise_conv2d_fake(x, weight, bias=None, stride=1, groups=1, scale=None, shift=None,
                               residual=None, activation=0, negative_slope=0.01):
        size = (x.shape[0], weight.shape[0], (x.shape[2] - 1) // stride + 1,
                (x.shape[3] - 1) // stride + 1)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return x.new_empty(size).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
