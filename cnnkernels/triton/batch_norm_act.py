"""Triton kernels of batch_norm_act's statistics and backward passes, and the ops that launch them.

The input is seen as a matrix of rows × channels: a row is an (n, h, w) position. In channels_last
a row is C contiguous values; in NCHW the value of (row, c) lies at
(row // HW)·C·HW + c·HW + row % HW. Both reductions are one kernel, `_pair_sums_kernel`: each
program sums a range of rows for a block of channels into per-program partials (float32 tiles,
the partials then added in float64 by torch), and computes either
  MODE 0 (statistics):       (x − K, (x − K)²), K a value of the channel (stable variance), or
  MODE 1 (backward sums):    (dz, dz·(x − mean)), dz = act'(fma(x, scale, shift) + residual)·grad.
The elementwise backward pass is a flat kernel like affine_act's. Semantics and the math:
csrc/batch_norm_act.cpp; reference: cnnkernels/reference/batch_norm_act.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import activation_backward
from .affine_act import channel_of
from .hardswish import _block, _compute_dtype, _grid

MOMENTS, GRAD_SUMS = 0, 1


@triton.jit
def _offsets(rows, cs, channels, inner, CHANNELS_LAST: tl.constexpr):
    cs = cs.to(tl.int64)  # 64-bit offsets: one image may hold more than 2^31 values
    if CHANNELS_LAST:
        return rows[:, None] * channels + cs[None, :]
    return (rows // inner)[:, None] * channels * inner + cs[None, :] * inner + (rows % inner)[:, None]


@triton.jit
def _pair_sums_kernel(x_ptr, g_ptr, r_ptr, scale_ptr, shift_ptr, center_ptr, part_a_ptr, part_b_ptr,
                      n_rows, channels, inner, rows_per_program, negative_slope,
                      MODE: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                      CHANNELS_LAST: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(1)  # row ranges on axis 1 (at most 1024), channel blocks on axis 0
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < channels
    center = tl.load(center_ptr + cs, mask=c_mask, other=0.0)
    if MODE == 1:
        scale = tl.load(scale_ptr + cs, mask=c_mask, other=0.0)
        shift = tl.load(shift_ptr + cs, mask=c_mask, other=0.0)
    acc_a = tl.zeros([BLOCK_R, BLOCK_C], dtype=COMPUTE)
    acc_b = tl.zeros([BLOCK_R, BLOCK_C], dtype=COMPUTE)
    first = pid_r.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < last)[:, None] & c_mask[None, :]
        offsets = _offsets(rows, cs, channels, inner, CHANNELS_LAST)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        if MODE == 0:
            d = tl.where(mask, x - center[None, :], 0.0)
            acc_a += d
            acc_b += d * d
        else:
            g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
            pre = tl.fma(x, scale[None, :], shift[None, :])
            if HAS_RESIDUAL:
                pre += tl.load(r_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
            dz = tl.where(mask, activation_backward(g, pre, ACT, negative_slope), 0.0)
            acc_a += dz
            acc_b += dz * (x - center[None, :])
    out = pid_r.to(tl.int64) * channels + cs
    tl.store(part_a_ptr + out, tl.sum(acc_a, axis=0), mask=c_mask)
    tl.store(part_b_ptr + out, tl.sum(acc_b, axis=0), mask=c_mask)


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _dense(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _geometry(x: torch.Tensor):
    """(rows, channels, inner): rows = N·H·W positions, inner = H·W (1 for 2-D x)."""
    channels = x.shape[1]
    rows = x.numel() // max(channels, 1)
    inner = rows // max(x.shape[0], 1) if x.shape[0] else 1
    return rows, channels, max(inner, 1)


def _pair_sums(mode, x, grad, residual, scale, shift, center, activation, negative_slope):
    """Per-channel (Σa, Σb) in float64."""
    channels_last = _channels_last(x) or x.dim() == 2
    x = _dense(x, channels_last and x.dim() == 4)
    grad = None if grad is None else _dense(grad, channels_last and x.dim() == 4)
    residual = None if residual is None else _dense(residual, channels_last and x.dim() == 4)
    rows, channels, inner = _geometry(x)
    block_c = min(64, triton.next_power_of_2(channels)) if channels_last else 2
    block_r = (32 if channels_last else 512) if x.is_cuda else (256 if channels_last else 4096)
    row_programs = max(1, min(triton.cdiv(rows, block_r), 1024 if x.is_cuda else 8))
    rows_per_program = triton.cdiv(triton.cdiv(rows, row_programs), block_r) * block_r
    row_programs = triton.cdiv(rows, rows_per_program)
    part_a = torch.empty(row_programs, channels, device=x.device, dtype=center.dtype)
    part_b = torch.empty_like(part_a)
    torch.library.wrap_triton(_pair_sums_kernel)[(triton.cdiv(channels, block_c), row_programs)](
        x, x if grad is None else grad, x if residual is None else residual,
        center if scale is None else scale, center if shift is None else shift, center,
        part_a, part_b, rows, channels, inner, rows_per_program, negative_slope,
        MODE=mode, ACT=activation, HAS_RESIDUAL=residual is not None,
        CHANNELS_LAST=channels_last, COMPUTE=_compute_dtype(x), BLOCK_R=block_r, BLOCK_C=block_c)
    return part_a.double().sum(0), part_b.double().sum(0)


def _anchor(x: torch.Tensor) -> torch.Tensor:
    """K: each channel's first value (index 0 of every other dim), 0 where that is not finite:
    an infinite K would make x − K NaN and the mean NaN where torch's is ±inf."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    first = x.select(0, 0).reshape(x.shape[1], -1)[:, 0].to(compute)
    return torch.where(torch.isfinite(first), first, torch.zeros_like(first)).contiguous()


@torch.library.triton_op("cnnkernels::batch_norm_act_stats_triton", mutates_args=())
def batch_norm_act_stats_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    channels = x.shape[1]
    count = x.numel() // max(channels, 1)
    if count == 0 or channels == 0:
        nan = torch.full((channels,), float("nan"), dtype=compute, device=x.device)
        return nan, nan.clone()
    anchor = _anchor(x)
    s1, s2 = _pair_sums(MOMENTS, x, None, None, None, None, anchor, 0, 0.0)
    shifted_mean = s1 / count
    mean = (anchor.double() + shifted_mean).to(compute)
    var = (s2 / count - shifted_mean * shifted_mean).clamp_min(0).to(compute)
    return mean, var


@torch.library.triton_op("cnnkernels::batch_norm_act_backward_reduce_triton", mutates_args=())
def batch_norm_act_backward_reduce_triton(
        grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
        mean: torch.Tensor, residual: torch.Tensor | None = None, activation: int = 0,
        negative_slope: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        return torch.zeros_like(scale), torch.zeros_like(scale)
    a, b = _pair_sums(GRAD_SUMS, x, grad, residual, scale.contiguous(), shift.contiguous(),
                      mean.contiguous(), activation, negative_slope)
    return a.to(scale.dtype), b.to(scale.dtype)


@triton.jit
def _elemt_kernel(x_ptr, g_ptr, r_ptr, dx_ptr, dr_ptr, scale_ptr, shift_ptr, mean_ptr, k_dz_ptr,
                  k_xmu_ptr, k_1_ptr, n, channels, inner, negative_slope, ACT: tl.constexpr,
                  HAS_RESIDUAL: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                  COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    c = channel_of(offsets, channels, inner, CHANNELS_LAST)
    x = tl.load(x_ptr + offsets, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offsets, mask=mask).to(COMPUTE)
    pre = tl.fma(x, tl.load(scale_ptr + c, mask=mask), tl.load(shift_ptr + c, mask=mask))
    if HAS_RESIDUAL:
        pre += tl.load(r_ptr + offsets, mask=mask).to(COMPUTE)
    dz = activation_backward(g, pre, ACT, negative_slope)
    xmu = x - tl.load(mean_ptr + c, mask=mask)
    dx = tl.load(k_dz_ptr + c, mask=mask) * dz + tl.load(k_xmu_ptr + c, mask=mask) * xmu \
        + tl.load(k_1_ptr + c, mask=mask)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_RESIDUAL:
        tl.store(dr_ptr + offsets, dz.to(dr_ptr.dtype.element_ty), mask=mask)


@torch.library.triton_op("cnnkernels::batch_norm_act_backward_elemt_triton", mutates_args=())
def batch_norm_act_backward_elemt_triton(
        grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
        mean: torch.Tensor, coef_dz: torch.Tensor, coef_xmu: torch.Tensor, coef_1: torch.Tensor,
        residual: torch.Tensor | None = None, activation: int = 0, negative_slope: float = 0.01,
        residual_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    channels_last = _channels_last(x)
    x = _dense(x, channels_last)
    grad = _dense(grad, channels_last)
    residual = None if residual is None else _dense(residual, channels_last)
    dx = torch.empty_like(x)
    dr = torch.empty_like(x) if residual is not None else x.new_empty(0)
    n = x.numel()
    if n:
        _, channels, inner = _geometry(x)
        block = _block(x)
        per_channel = [t.contiguous() for t in (scale, shift, mean, coef_dz, coef_xmu, coef_1)]
        torch.library.wrap_triton(_elemt_kernel)[_grid(n, block)](
            x, grad, x if residual is None else residual, dx, dx if residual is None else dr,
            *per_channel, n, channels, inner, negative_slope, ACT=activation,
            HAS_RESIDUAL=residual is not None, CHANNELS_LAST=channels_last,
            COMPUTE=_compute_dtype(x), BLOCK=block)
    if residual is not None and not residual_grad:
        dr = x.new_empty(0)
    return dx, dr


# --- the per-channel steps: fold (forward) and the backward's coefficients ----------------------

@triton.jit
def _sqrt_rn(x):
    if x.dtype == tl.float64:
        return tl.sqrt(x)  # float64 sqrt is already correctly rounded
    else:
        return tl.sqrt_rn(x)  # tl.sqrt on float32 is an approximation on the GPU


@triton.jit
def _div_rn(a, b):
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _fold_kernel(mean_ptr, var_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, scale_ptr, shift_ptr,
                 invstd_ptr, channels, eps, momentum, count, HAS_WEIGHT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr, BLOCK: tl.constexpr):
    # Python floats reach a Triton kernel as float32: eps and momentum are rounded to float32 also
    # for float64 tensors (the count-derived factors are computed here, in the compute type).
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < channels
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
    var = tl.load(var_ptr + c, mask=mask, other=1.0)
    one = tl.full(var.shape, 1.0, var.dtype)
    # an empty batch: scale 0, shift = bias, running statistics untouched
    inv = tl.where(count > 0, _div_rn(one, _sqrt_rn(var + eps)), 0.0)
    s = inv
    if HAS_WEIGHT:
        s = inv * tl.load(w_ptr + c, mask=mask)
    b = tl.zeros(var.shape, var.dtype)
    if HAS_BIAS:
        b = tl.load(b_ptr + c, mask=mask)
    tl.store(invstd_ptr + c, inv, mask=mask)
    tl.store(scale_ptr + c, s, mask=mask)
    tl.store(shift_ptr + c, tl.where(count > 0, b - mean * s, b), mask=mask)
    if HAS_RUNNING:
        if count > 0:
            running_ty = rm_ptr.dtype.element_ty
            rm = tl.load(rm_ptr + c, mask=mask)
            rv = tl.load(rv_ptr + c, mask=mask)
            if running_ty != tl.float64:  # op-math: float32 for float32 / half / bfloat16 buffers
                rm = rm.to(tl.float32)
                rv = rv.to(tl.float32)
            n = tl.full(var.shape, count, var.dtype)
            unbias = _div_rn(n, tl.maximum(n - 1.0, 1.0))
            batch_m = mean.to(running_ty).to(rm.dtype)
            batch_v = (var * unbias).to(running_ty).to(rv.dtype)
            tl.store(rm_ptr + c, (momentum * batch_m + (1.0 - momentum) * rm).to(running_ty),
                     mask=mask)
            tl.store(rv_ptr + c, (momentum * batch_v + (1.0 - momentum) * rv).to(running_ty),
                     mask=mask)


@torch.library.triton_op("cnnkernels::batch_norm_act_fold_triton",
                         mutates_args=("running_mean", "running_var"))
def batch_norm_act_fold_triton(
        mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
        bias: torch.Tensor | None, running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None, momentum: float, eps: float,
        count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, var = mean.contiguous(), var.contiguous()
    scale, shift, invstd = (torch.empty_like(mean) for _ in range(3))
    channels = mean.numel()
    if channels:
        w = None if weight is None else weight.to(mean.dtype).contiguous()
        b = None if bias is None else bias.to(mean.dtype).contiguous()
        block = 256
        torch.library.wrap_triton(_fold_kernel)[(triton.cdiv(channels, block),)](
            mean, var, mean if w is None else w, mean if b is None else b,
            mean if running_mean is None else running_mean,
            mean if running_var is None else running_var, scale, shift, invstd, channels, eps,
            momentum, count, HAS_WEIGHT=w is not None,
            HAS_BIAS=b is not None, HAS_RUNNING=running_mean is not None, BLOCK=block)
    return scale, shift, invstd


@triton.jit
def _coefs_kernel(dz_ptr, dz_xmu_ptr, scale_ptr, invstd_ptr, dz_xhat_ptr, k_xmu_ptr, k_1_ptr,
                  channels, count, BLOCK: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < channels
    inv = tl.load(invstd_ptr + c, mask=mask)
    # −1/count in the compute type (a Python float would arrive rounded to float32)
    minus_one_over_n = _div_rn(tl.full(inv.shape, -1.0, inv.dtype),
                               tl.full(inv.shape, tl.maximum(count, 1), inv.dtype))
    s = tl.load(scale_ptr + c, mask=mask)
    xhat_sum = tl.load(dz_xmu_ptr + c, mask=mask) * inv
    tl.store(dz_xhat_ptr + c, xhat_sum, mask=mask)
    tl.store(k_xmu_ptr + c, s * xhat_sum * inv * minus_one_over_n, mask=mask)
    tl.store(k_1_ptr + c, s * tl.load(dz_ptr + c, mask=mask) * minus_one_over_n, mask=mask)


@torch.library.triton_op("cnnkernels::batch_norm_act_backward_coefs_triton", mutates_args=())
def batch_norm_act_backward_coefs_triton(
        sum_dz: torch.Tensor, sum_dz_xmu: torch.Tensor, scale: torch.Tensor, invstd: torch.Tensor,
        count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sum_dz, sum_dz_xmu, scale, invstd = (t.contiguous() for t in (sum_dz, sum_dz_xmu, scale, invstd))
    dz_xhat, k_xmu, k_1 = (torch.empty_like(sum_dz) for _ in range(3))
    channels = sum_dz.numel()
    if channels:
        block = 256
        torch.library.wrap_triton(_coefs_kernel)[(triton.cdiv(channels, block),)](
            sum_dz, sum_dz_xmu, scale, invstd, dz_xhat, k_xmu, k_1, channels, count,
            BLOCK=block)
    return dz_xhat, k_xmu, k_1


def stats(x):
    return torch.ops.cnnkernels.batch_norm_act_stats_triton(x)


def fold(mean, var, weight, bias, running_mean, running_var, momentum, eps, count):
    return torch.ops.cnnkernels.batch_norm_act_fold_triton(
        mean, var, weight, bias, running_mean, running_var, momentum, eps, count)


def backward_coefs(sum_dz, sum_dz_xmu, scale, invstd, count):
    return torch.ops.cnnkernels.batch_norm_act_backward_coefs_triton(
        sum_dz, sum_dz_xmu, scale, invstd, count)


def backward_reduce(grad, x, scale, shift, mean, residual=None, activation=0, negative_slope=0.01):
    return torch.ops.cnnkernels.batch_norm_act_backward_reduce_triton(
        grad, x, scale, shift, mean, residual, activation, negative_slope)


def backward_elemt(grad, x, scale, shift, mean, coef_dz, coef_xmu, coef_1, residual=None,
                   activation=0, negative_slope=0.01, residual_grad=False):
    return torch.ops.cnnkernels.batch_norm_act_backward_elemt_triton(
        grad, x, scale, shift, mean, coef_dz, coef_xmu, coef_1, residual, activation,
        negative_slope, residual_grad)
