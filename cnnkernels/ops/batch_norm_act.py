"""batch_norm_act: act(BatchNorm(x) (+ residual)) whose autograd keeps only the input.

Training forward: per-channel mean and variance in one pass over x (`batch_norm_act_stats`), the
running statistics updated as nn.BatchNorm2d updates them, then one elementwise pass
act(fma(x, scale, shift) + residual) (`affine_act`). Evaluation: the elementwise pass alone, with
the running statistics folded into scale and shift.

Backward, from the saved x (and residual) and per-channel mean / inverse std only — never the
normalised tensor or the activation output: one pass for the per-channel sums Σdz and Σdz·(x − mean)
with dz = act'(pre)·grad recomputed (`batch_norm_act_backward_reduce`), then one pass writing
dx (and dresidual = dz) (`batch_norm_act_backward_elemt`). With `process_group` (SyncBN) the
forward's statistics and the backward's sums are combined across ranks between the passes, so
the result equals BatchNorm over the concatenated batch. Under create_graph=True (double
backward) the gradients come from autograd through the op in torch ops instead of these kernels,
so that they can be differentiated again (not with SyncBN over several ranks: refused).

Kernels: C++ (csrc/cpu/batch_norm_act_kernel.cpp), CUDA (csrc/cuda/batch_norm_act_kernel.cu),
Triton (cnnkernels/triton/batch_norm_act.py); on CUDA without compiled CUDA kernels the Triton
ones run. Reference: cnnkernels/reference.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _extension, activations, backend
from ..reference import affine_act as affine_reference
from ..reference import batch_norm_act as reference
from . import _args, _autograd
from .affine_act import _compute_dtype

_OP = "batch_norm_act"
KERNELS = frozenset({"cpu", "cuda", "triton"})
WORLD = "world"  # process_group: torch.distributed's default group (nn.SyncBatchNorm's None)


def fold_statistics(mean, invstd, weight, bias, compute):
    """(scale, shift) with which fma(x, scale, shift) is BatchNorm's output, folded as ATen's CPU
    kernel folds it: alpha = invstd·weight, beta = fma(−mean, alpha, bias) (float32: an exact
    float64 product and one subtraction)."""
    invstd = invstd.to(compute)
    scale = invstd if weight is None else invstd * weight.to(compute)
    bias_ = torch.zeros_like(scale) if bias is None else bias.to(compute)
    shift = (bias_.double() - mean.double() * scale.double()).to(compute)
    return scale, shift


def _eval_invstd(running_var, eps, compute):
    return torch.reciprocal(torch.sqrt(running_var.to(compute) + eps))


def _eval_fold(kernels, running_mean, running_var, weight, bias, eps, compute):
    """(mean, scale, shift, invstd) of evaluation with the running statistics: one call of the fold
    kernel with no running statistics to update (not six small ops), which rounds shift once as
    ATen's CPU BatchNorm does. The Triton fold takes eps as float32: float64 there folds in torch."""
    mean = running_mean.to(compute, copy=True)  # backward uses the statistics of now
    cpp_fold = getattr(getattr(torch.ops.cnnkernels, "batch_norm_act_fold", None), "default", None)
    if compute == torch.float64 and kernels.fold is not cpp_fold:
        invstd = _eval_invstd(running_var, eps, compute)
        return (mean, *fold_statistics(mean, invstd, weight, bias, compute), invstd)
    scale, shift, invstd = kernels.fold(mean, running_var.to(compute), weight, bias, None, None,
                                        0.0, eps, 1)
    return mean, scale, shift, invstd


# --- the three kernels, on the active backend ----------------------------------------------------

class _Kernels(NamedTuple):
    stats: object
    fold: object            # (mean, var, weight, bias, running_mean!, running_var!, m, eps, n)
    backward_reduce: object
    backward_coefs: object  # (Σdz, Σdz·(x − mean), scale, invstd, n) -> (Σdz·x̂, k_xmu, k_1)
    backward_elemt: object
    affine: object          # (x, scale, shift, activation code, negative_slope, residual)


def _kernels(x: torch.Tensor) -> _Kernels:
    """The kernels for x's device and the active backend."""
    kind = backend.select(x.device, KERNELS, _OP)
    if (kind == "cpu" and _extension.cpu_ext) or (kind == "cuda" and _extension.cuda_ext):
        ops = torch.ops.cnnkernels
        return _Kernels(ops.batch_norm_act_stats.default, ops.batch_norm_act_fold.default,
                        ops.batch_norm_act_backward_reduce.default,
                        ops.batch_norm_act_backward_coefs.default,
                        ops.batch_norm_act_backward_elemt.default, ops.affine_act.default)
    if kind == "triton":
        from ..triton import affine_act as _triton_affine  # noqa: F401  (registers the op)
        from ..triton import batch_norm_act as _triton

        return _Kernels(_triton.stats, _triton.fold, _triton.backward_reduce,
                        _triton.backward_coefs, _triton.backward_elemt,
                        torch.ops.cnnkernels.affine_act_triton)
    return _Kernels(_reference_stats, reference.fold, reference.backward_reduce,
                    reference.backward_coefs, reference.backward_elemt,
                    affine_reference.affine_act)


def _reference_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (mean, biased var), the mean as ATen's batch norm takes it (sum / count):
    torch.var_mean's running (Welford) mean turns a channel holding an inf into NaN, where
    F.batch_norm's running_mean becomes inf."""
    _, var = reference.stats(x)
    return x.to(var.dtype).mean([d for d in range(x.dim()) if d != 1]), var


# --- SyncBN: combining per-rank statistics and sums ----------------------------------------------

def _group(process_group):
    """The group argument torch.distributed takes (None: its default group)."""
    return None if process_group == WORLD else process_group


def _world_size(process_group) -> int:
    if process_group is None or not torch.distributed.is_available() or \
            not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(_group(process_group))


def _combine_statistics(mean, var, count, process_group):
    """Mean, biased variance and count over all ranks, from each rank's (Chan et al.'s parallel
    combination: no cancellation, ranks with an empty batch count for nothing)."""
    world = _world_size(process_group)
    # float64 on the wire: counts above 2^24 stay exact
    local = torch.cat([mean.double(), var.double(), mean.new_full((1,), float(count), dtype=torch.float64)])
    gathered = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(gathered, local, group=_group(process_group))
    gathered = torch.stack(gathered)
    channels = mean.numel()
    means, vars_, counts = gathered[:, :channels], gathered[:, channels:2 * channels], gathered[:, -1:]
    means = torch.where(counts > 0, means, torch.zeros_like(means))
    vars_ = torch.where(counts > 0, vars_, torch.zeros_like(vars_))
    total = counts.sum()
    mean_all = (counts * means).sum(0) / total
    var_all = (counts * (vars_ + (means - mean_all) ** 2)).sum(0) / total
    return mean_all.to(mean.dtype), var_all.to(var.dtype), int(total.item())


def _all_reduce_sums(sum_dz, sum_dz_xmu, process_group):
    both = torch.cat([sum_dz, sum_dz_xmu])
    torch.distributed.all_reduce(both, group=_group(process_group))
    return both[:sum_dz.numel()], both[sum_dz.numel():]


# --- autograd ------------------------------------------------------------------------------------

class _BatchNormAct(torch.autograd.Function):
    # Per step, besides the four passes over memory, two per-channel kernels (fold,
    # backward_coefs): on a GPU every small op is a launch plus host work, which decides the
    # speed of a layer at MobileNet sizes. Keep the Python here to the minimum.
    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, training, momentum, eps,
                code, negative_slope, process_group, batch_stats):
        k = _kernels(x)
        count = x.shape[0] * math.prod(x.shape[2:])  # values per channel (C may be 0)
        if training:
            mean, var = k.stats(x) if batch_stats is None else \
                (batch_stats[0].detach(), batch_stats[1].detach())
            if process_group is not None and _world_size(process_group) > 1:
                mean, var, count = _combine_statistics(mean, var, count, process_group)
            if count == 0:  # an empty batch: statistics undefined, saved as zeros for backward
                mean = torch.zeros_like(mean)
            # one kernel: scale, shift, invstd, and the running statistics' update in place
            scale, shift, invstd = k.fold(mean, var, weight, bias, running_mean, running_var,
                                          momentum, eps, count)
        else:  # backward uses the statistics of now, even if the buffers move later
            mean, scale, shift, invstd = _eval_fold(k, running_mean, running_var, weight, bias, eps,
                                                    _compute_dtype(x.dtype))
        y = k.affine(x, scale, shift, code, negative_slope, residual)
        ctx.config = (training, count, code, negative_slope, process_group,
                      None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.eps = eps
        # weight and bias (the arguments, no copies) only for create_graph=True
        ctx.save_for_backward(x, residual, mean, invstd, scale, shift, weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad):
        training, count, code, negative_slope, process_group, weight_dtype, bias_dtype = ctx.config
        x, residual, mean, invstd, scale, shift, weight, bias = ctx.saved_tensors
        if _autograd.creating_graph():
            return _differentiable_gradients(ctx, grad, x, weight, bias, residual, mean, invstd)
        k = _kernels(x)
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        sum_dz = dz_xhat = k_xmu = k_1 = None
        if training or need_w or need_b:
            sum_dz, sum_dz_xmu = k.backward_reduce(grad, x, scale, shift, mean, residual, code,
                                                   negative_slope)
            # Σ dz·x̂ = Σ dz·(x − mean)·invstd (the weight's gradient), and dx's coefficients
            # dx = scale·dz + k_xmu·(x − mean) + k_1 (training; SyncBN: from the global sums)
            dz_xhat, k_xmu, k_1 = k.backward_coefs(sum_dz, sum_dz_xmu, scale, invstd, count)
            if training and (need_x or need_r) and process_group is not None \
                    and _world_size(process_group) > 1:
                _, k_xmu, k_1 = k.backward_coefs(
                    *_all_reduce_sums(sum_dz, sum_dz_xmu, process_group), scale, invstd, count)
        grad_w = dz_xhat.to(weight_dtype) if need_w else None
        grad_b = sum_dz.to(bias_dtype) if need_b else None
        grad_x = grad_r = None
        if need_x or need_r:
            if not training:  # running statistics are constants: dx = scale·dz
                k_xmu = k_1 = torch.zeros_like(scale)
            grad_x, grad_r = k.backward_elemt(grad, x, scale, shift, mean, scale, k_xmu, k_1,
                                              residual, code, negative_slope, need_r)
            grad_x = grad_x if need_x else None
            grad_r = grad_r if need_r else None
        return grad_x, grad_w, grad_b, grad_r, None, None, None, None, None, None, None, None, None


def _differentiable_gradients(ctx, grad, x, weight, bias, residual, mean, invstd) -> tuple:
    """The backward for create_graph=True, by autograd through the op in torch ops (our backward
    kernels have no autograd of their own): training normalises with x's own statistics,
    evaluation with the saved running ones (constants, as in F.batch_norm)."""
    training, count, code, negative_slope, process_group = ctx.config[:5]
    if training and process_group is not None and _world_size(process_group) > 1:
        raise RuntimeError(f"cnnkernels.ops.{_OP}: double backward (create_graph=True) is not "
                           "supported with a process_group (SyncBN) over several ranks; use "
                           "nn.SyncBatchNorm for that")
    compute = mean.dtype
    view = [1, -1] + [1] * (x.dim() - 2)
    eps = ctx.eps

    def forward(x, weight, bias, residual):
        xc = x.to(compute)
        if training:
            var, batch_mean = torch.var_mean(xc, [d for d in range(x.dim()) if d != 1],
                                             correction=0)
            normalised = (xc - batch_mean.view(view)) * torch.rsqrt(var + eps).view(view)
        else:
            normalised = (xc - mean.view(view)) * invstd.view(view)
        pre = normalised if weight is None else normalised * weight.to(compute).view(view)
        if bias is not None:
            pre = pre + bias.to(compute).view(view)
        if residual is not None:
            pre = pre + residual.to(compute)
        return _autograd.activation_for_recompute(pre, code, negative_slope).to(x.dtype)

    grads = _autograd.gradients_by_recompute(forward, (x, weight, bias, residual),
                                             ctx.needs_input_grad[:4], grad)
    return (*grads, None, None, None, None, None, None, None, None, None)


def _strided_rows(x) -> bool:
    """x[:, :C] of a wider channels_last tensor: pixels are rows of C channels further apart than
    C, which the CPU backward kernels read in place (csrc: channels_last_row_stride)."""
    if x.dim() != 4 or x.numel() == 0:
        return False
    n, c, h, w = x.shape
    row = x.stride(3)
    return (x.stride(1) == 1 and row > c and (h == 1 or x.stride(2) == w * row)
            and (n == 1 or x.stride(0) == h * w * row))


def _format(x):
    if x.dim() == 4 and not x.is_contiguous() and (
            x.is_contiguous(memory_format=torch.channels_last) or _strided_rows(x)):
        return torch.channels_last
    return torch.contiguous_format


def _check(x, weight, bias, residual, running_mean, running_var, training):
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"{_OP}: expected argument 'x' to be a tensor [N, C, ...], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and (t.dim() != 1 or t.shape[0] != channels):
            raise ValueError(f"{_OP}: expected argument '{name}' to have shape [{channels}] (one "
                             f"value per channel of x), got {tuple(t.shape)}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{_OP}: argument '{name}' is on {t.device} but 'x' is on {x.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or
                                 residual.device != x.device):
        raise ValueError(f"{_OP}: 'residual' must have x's shape, dtype and device "
                         f"({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                         f"({tuple(residual.shape)}, {residual.dtype}, {residual.device})")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{_OP}: pass both running_mean and running_var, or neither")
    if training:
        F._verify_batch_size(x.size())
    elif running_mean is None:
        raise ValueError(f"{_OP}: evaluation (training=False) needs running_mean and running_var")


def _check_eps(eps) -> float:
    value = _args.as_real(eps, _OP, "eps")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{_OP}: expected argument 'eps' to be a finite number > 0 (eps = 0 "
                         f"divides by zero on a constant channel), got {eps!r}")
    return value


def _momentum_factor(momentum, num_batches_tracked, updates_running: bool) -> float:
    """The running statistics' update weight: momentum, or with momentum None 1 / the count of
    batches (num_batches_tracked, incremented here), nn.BatchNorm2d's cumulative average."""
    if momentum is not None:
        value = _args.as_real(momentum, _OP, "momentum")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{_OP}: expected argument 'momentum' to be in [0, 1] or None, got "
                             f"{momentum!r}")
    if num_batches_tracked is not None:
        _args.check_tensor(num_batches_tracked, _OP, "num_batches_tracked")
        if num_batches_tracked.numel() != 1 or num_batches_tracked.is_floating_point() or \
                num_batches_tracked.dtype == torch.bool:
            raise ValueError(f"{_OP}: expected argument 'num_batches_tracked' to be a one-element "
                             f"integer tensor (nn.BatchNorm2d's buffer), got "
                             f"{tuple(num_batches_tracked.shape)} {num_batches_tracked.dtype}")
    if not updates_running:
        return 0.0 if momentum is None else value
    if momentum is None and num_batches_tracked is None:
        raise ValueError(f"{_OP}: momentum=None (a cumulative average of the batch statistics) "
                         "needs the count of batches seen: pass num_batches_tracked (a one-element "
                         "integer tensor, as nn.BatchNorm2d's buffer), or a momentum in [0, 1]")
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
    return value


def _check_batch_stats(x, batch_stats) -> None:
    compute = _compute_dtype(x.dtype)
    if not isinstance(batch_stats, (tuple, list)) or len(batch_stats) != 2:
        raise ValueError(f"{_OP}: expected argument 'batch_stats' to be a pair (mean, var), got "
                         f"{type(batch_stats).__name__}")
    for name, t in zip(("mean", "var"), batch_stats):
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[1],) or t.dtype != compute or \
                t.device != x.device:
            raise ValueError(
                f"{_OP}: expected batch_stats' {name} to be a [{x.shape[1]}] {compute} tensor on "
                f"{x.device} (one value per channel of x), got "
                f"{(tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else t!r}")


def _runs_in_cpp(x: torch.Tensor, process_group) -> bool:
    """Whether the whole op, autograd included, is the C++ op (csrc/autograd/batch_norm_act.cpp):
    our compiled kernels serve x, no SyncBN collective sits between them, and torch.compile is not
    tracing (it traces _BatchNormAct's kernels one by one, with their running-statistics update)."""
    kind = backend.select(x.device, KERNELS, _OP)
    compiled = (kind == "cpu" and _extension.cpu_ext) or (kind == "cuda" and _extension.cuda_ext)
    return compiled and not torch.compiler.is_compiling() and (
        process_group is None or _world_size(process_group) == 1)


def batch_norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                   training: bool, momentum: float = 0.1, eps: float = 1e-5,
                   activation: str = "relu", negative_slope: float = 0.01, *,
                   residual: torch.Tensor | None = None, process_group=None,
                   batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                   num_batches_tracked: torch.Tensor | None = None) -> torch.Tensor:
    """act(batch_norm(x, ...) + residual) with F.batch_norm's arguments: training uses the batch
    statistics and updates running_mean / running_var in place with `momentum` (unbiased variance),
    evaluation uses them. `residual` (x's shape) is added before the activation. `process_group`
    (a torch.distributed group, or WORLD for the default one) makes it SyncBN: statistics and
    gradient sums over all its ranks, when torch.distributed is initialised. `batch_stats`:
    (mean, biased var) of x per channel in the compute type, when already known (from
    pointwise_conv2d_stats): training then skips its statistics pass; ignored in evaluation.

    `eps` > 0. `momentum` in [0, 1], or None for nn.BatchNorm2d's cumulative average, which needs
    `num_batches_tracked` (a one-element integer tensor, nn.BatchNorm2d's buffer of that name):
    when training updates the running statistics, the op adds 1 to it in place, as
    nn.BatchNorm2d.forward does, and momentum None then weighs this batch 1 / num_batches_tracked."""
    code = activations.activation_code(activation)
    _check(x, weight, bias, residual, running_mean, running_var, training)
    eps = _check_eps(eps)
    momentum = _momentum_factor(momentum, num_batches_tracked,
                                training and running_mean is not None)
    if batch_stats is not None:
        _check_batch_stats(x, batch_stats)
    if _runs_in_cpp(x, process_group):
        batch_mean, batch_var = (None, None) if batch_stats is None else batch_stats
        return torch.ops.cnnkernels.batch_norm_act.default(
            x, weight, bias, residual, running_mean, running_var, training, momentum, eps, code,
            float(negative_slope), batch_mean, batch_var)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual))
    if not training and not needs_grad:  # one fused pass with the running statistics
        kernels = _kernels(x)
        _, scale, shift, _ = _eval_fold(kernels, running_mean, running_var, weight, bias, eps,
                                        _compute_dtype(x.dtype))
        return kernels.affine(x, scale, shift, code, float(negative_slope), residual)
    return _BatchNormAct.apply(x, weight, bias, residual, running_mean, running_var, training,
                               momentum, eps, code, float(negative_slope), process_group,
                               batch_stats)


if _extension.cpu_ext:

    def _per_channel_like(x):
        compute = _compute_dtype(x.dtype)
        return x.new_empty(x.shape[1], dtype=compute)

    @torch.library.register_fake("cnnkernels::batch_norm_act")
    def _batch_norm_act_fake(x, weight, bias, residual, running_mean, running_var, training,
                             momentum, eps, activation, negative_slope, batch_mean=None,
                             batch_var=None):
        return torch.empty_like(x)  # as affine_act's, which writes it

    @torch.library.register_fake("cnnkernels::batch_norm_act_stats")
    def _stats_fake(x):
        return _per_channel_like(x), _per_channel_like(x)

    @torch.library.register_fake("cnnkernels::batch_norm_act_backward_reduce")
    def _backward_reduce_fake(grad, x, scale, shift, mean, residual=None, activation=0,
                              negative_slope=0.01):
        return torch.empty_like(scale), torch.empty_like(scale)

    @torch.library.register_fake("cnnkernels::batch_norm_act_fold")
    def _fold_fake(mean, var, weight, bias, running_mean, running_var, momentum, eps, count):
        return torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)

    @torch.library.register_fake("cnnkernels::batch_norm_act_backward_coefs")
    def _backward_coefs_fake(sum_dz, sum_dz_xmu, scale, invstd, count):
        return torch.empty_like(sum_dz), torch.empty_like(sum_dz), torch.empty_like(sum_dz)

    @torch.library.register_fake("cnnkernels::batch_norm_act_backward_reduce_add_")
    def _backward_reduce_add_fake(out, grad, x, scale, shift, mean, coef_dz, activation=0,
                                  negative_slope=0.01):
        return torch.empty_like(scale), torch.empty_like(scale)

    @torch.library.register_fake("cnnkernels::batch_norm_act_backward_elemt")
    def _backward_elemt_fake(grad, x, scale, shift, mean, coef_dz, coef_xmu, coef_1, residual=None,
                             activation=0, negative_slope=0.01, residual_grad=False):
        dx = torch.empty_like(x, memory_format=_format(x))
        grad_residual = torch.empty_like(dx) if residual is not None and residual_grad \
            else x.new_empty(0)
        return dx, grad_residual
