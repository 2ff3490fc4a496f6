"""Triton kernel of pointwise_conv2d: a 1x1 convolution as one GEMM per group with the input
prologue applied while the operand is loaded, the epilogue applied to the accumulator, and
optionally the per-output-channel statistics of the result, and the op that launches it.

    u = input_act(input_scale[k] · x + input_shift[k])      (prologue, in the loads of x)
    y = act(scale[n] · Σ_k u·W[n, k] + shift[n] (+ residual))   (epilogue, before the one store)

Rows of the GEMM are output pixels (n, h, w), columns output channels, the reduction runs over the
input channels of one group. x, the output and the residual are addressed through their strides,
so NCHW, channels_last and stride 2 are the same kernel (a pixel's input is x[n, :, h·s, w·s]).
The accumulator is float32 (float32 inputs use IEEE products, not TF32). With STATS, each program
also writes, for its rows and channels, the count, mean and centred sum of squares of the stored
output (as rounded to its dtype), and the host combines these partials with Chan's formula: the
mean and biased variance a following BatchNorm needs, without cancellation when |mean| >> std and
without reading the output again.

`cnnkernels::pointwise_conv2d_triton` is a `torch.library.triton_op` (torch.compile sees the
kernel). Float64 is not a Triton GEMM type on every GPU: it stays on the torch reference (see
cnnkernels/ops/pointwise_conv2d.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import RELU, activation_backward, activation_forward


@triton.jit
def _output_pixels(m, out_h, out_w):
    """(image, oh, ow) of output pixels (GEMM rows) m: rows run over n, then h, then w."""
    pixel = m % (out_h * out_w)
    return m // (out_h * out_w), pixel // out_w, pixel % out_w


@triton.jit
def _epilogue_rows(BLOCK_M: tl.constexpr, out_h, out_w, s_n, s_h, s_w):
    """Offsets of this program's output rows in a tensor of strides (s_n, ·, s_h, s_w), computed
    after the reduction loop and in int32 (the launcher checks that rows fit): the same values
    kept alive across the loop would be one int64 per row per thread in the store layout, which
    made the GEMMs spill (hundreds of registers at 128-row tiles). Being int32, these operations
    also differ from the int64 ones before the loop, so the compiler cannot merge and hoist them."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    image, oh, ow = _output_pixels(m, out_h, out_w)
    return image.to(tl.int64) * s_n + oh.to(tl.int64) * s_h + ow.to(tl.int64) * s_w


@triton.jit
def _pointwise_conv2d_kernel(
        x_ptr, w_ptr, y_ptr, scale_ptr, shift_ptr, residual_ptr, in_scale_ptr, in_shift_ptr,
        partials_ptr,
        rows, k_per_group, n_per_group, out_h, out_w,
        sx_n, sx_c, sx_h, sx_w, sw_n, sw_k, sy_n, sy_c, sy_h, sy_w, sr_n, sr_c, sr_h, sr_w,
        negative_slope, in_negative_slope,
        ACT: tl.constexpr, IN_ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        HAS_PROLOGUE: tl.constexpr, STATS: tl.constexpr, CPU_MATH: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    group = tl.program_id(2).to(tl.int64)
    # the output pixels of this tile, and where their inputs and outputs live
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = m < rows
    image, oh, ow = _output_pixels(m, out_h, out_w)
    x_row = image * sx_n + oh * sx_h + ow * sx_w  # sx_h, sx_w already include the stride
    # the output channels of this tile (inside the group)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = j < n_per_group
    channel = group * n_per_group + j

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_per_group, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < k_per_group
        in_channel = group * k_per_group + kk
        # x is read as a [K, M] tile: the pixels run along the threads, so each thread keeps
        # a few row offsets instead of one per row of the tile
        a_mask = mask_k[:, None] & mask_m[None, :]
        a = tl.load(x_ptr + x_row[None, :] + in_channel[:, None] * sx_c, mask=a_mask, other=0.0)
        if HAS_PROLOGUE:
            s_in = tl.load(in_scale_ptr + in_channel, mask=mask_k, other=0.0)
            t_in = tl.load(in_shift_ptr + in_channel, mask=mask_k, other=0.0)
            u = activation_forward(tl.fma(a.to(tl.float32), s_in[:, None], t_in[:, None]), IN_ACT,
                                   in_negative_slope, CPU_MATH)
            # padding lanes must stay 0 whatever act(shift) is; u is rounded to x's dtype, as
            # the unfused prologue stores it
            a = tl.where(a_mask, u, 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + channel[None, :] * sw_n + kk[:, None] * sw_k,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(tl.trans(a), b, input_precision="ieee")

    scale = tl.load(scale_ptr + channel, mask=mask_n, other=0.0)
    shift = tl.load(shift_ptr + channel, mask=mask_n, other=0.0)
    pre = tl.fma(acc, scale[None, :], shift[None, :])
    out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        r_row = _epilogue_rows(BLOCK_M, out_h, out_w, sr_n, sr_h, sr_w)
        residual = tl.load(residual_ptr + r_row[None, :] + channel[:, None] * sr_c,
                           mask=mask_n[:, None] & mask_m[None, :], other=0.0)
        pre += tl.trans(residual).to(tl.float32)
    y = activation_forward(pre, ACT, negative_slope, CPU_MATH).to(y_ptr.dtype.element_ty)
    y_row = _epilogue_rows(BLOCK_M, out_h, out_w, sy_n, sy_h, sy_w)
    # stored as a [N, M] tile, pixels along the threads, for the reason the loads of x are
    tl.store(y_ptr + y_row[None, :] + channel[:, None] * sy_c, tl.trans(y),
             mask=mask_n[:, None] & mask_m[None, :])

    if STATS:
        # count, mean and centred sum of squares of this tile's stored values, per channel
        count = tl.sum(mask_m.to(tl.float32), axis=0)
        values = tl.where(out_mask, y.to(tl.float32), 0.0)
        mean = tl.sum(values, axis=0) / count
        centred = tl.where(out_mask, values - mean[None, :], 0.0)
        m2 = tl.sum(centred * centred, axis=0)
        channels = n_per_group * tl.num_programs(2)
        slot = pid_m * channels + channel
        tl.store(partials_ptr + slot, tl.zeros_like(mean) + count, mask=mask_n)
        plane = tl.num_programs(0).to(tl.int64) * channels  # one [row tiles, C] plane per partial
        tl.store(partials_ptr + plane + slot, mean, mask=mask_n)
        tl.store(partials_ptr + 2 * plane + slot, m2, mask=mask_n)


def _pow2_between(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(1, value))))


def _blocks(rows: int, k_per_group: int, n_per_group: int, on_gpu: bool) -> tuple[int, int, int]:
    """Tile sizes: tl.dot needs every dimension >= 16; the interpreter's cost is per program, so
    on the CPU the tiles are as large as the problem allows."""
    if on_gpu:
        return (_pow2_between(rows, 16, 128), _pow2_between(n_per_group, 16, 128),
                _pow2_between(k_per_group, 16, 32))
    return (_pow2_between(rows, 16, 256), _pow2_between(n_per_group, 16, 256),
            _pow2_between(k_per_group, 16, 256))


# GPU tile limits below which every variant compiles for sm_90 without spilling (the audit,
# `cnnkernels kernels --target sm_90`, checks each tile the launchers pick)
FUSED_GPU_MAX_CHANNELS = 64  # forward with a prologue, residual or statistics; grad_W
BACKWARD_GPU_MAX_PIXELS = 64
GRAD_WEIGHT_GPU_MAX_PIXELS = 32


def _num_warps(block_m: int, block_n: int) -> int:
    """8 warps from [128 pixels, 64 channels] tiles up (the forward's accumulator, the backward's
    output-gradient tile): at 4 such a tile alone takes 64+ float32 registers per thread and the
    fused variants spill (checked with `cnnkernels kernels --target sm_90`)."""
    return 8 if block_m * block_n >= 128 * 64 else 4


def _grad_weight_num_warps(block_n: int, block_k: int) -> int:
    """8 warps from [64 channels, 32 input channels] grad_W tiles up: with 4, the accumulator,
    the output-gradient tile and the input tile (with its prologue) spill."""
    return 8 if block_n * block_k >= 64 * 32 else 4


def combine_partials(partials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel from per-tile (count, mean, M2) rows, by Chan et al.'s
    pairwise formula (stable: no difference of large sums of squares)."""
    count, mean, m2 = partials[0], partials[1], partials[2]
    total = count.sum(0)
    grand_mean = (count * mean).sum(0) / total
    m2_total = m2.sum(0) + (count * (mean - grand_mean) ** 2).sum(0)
    return grand_mean, m2_total / total


def _output_like(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    n, _, h, w = x.shape
    size = (n, out_channels, (h - 1) // stride + 1, (w - 1) // stride + 1)
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty(size, dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@torch.library.triton_op("cnnkernels::pointwise_conv2d_triton", mutates_args=())
def pointwise_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                            shift: torch.Tensor, stride: int = 1, groups: int = 1,
                            residual: torch.Tensor | None = None, activation: int = 0,
                            negative_slope: float = 0.01, input_scale: torch.Tensor | None = None,
                            input_shift: torch.Tensor | None = None, input_activation: int = 0,
                            input_negative_slope: float = 0.01,
                            stats: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var): y = act(scale·conv1x1(u) + shift (+ residual)), u the prologue of x when
    input_scale / input_shift are given; mean and biased var of y per output channel when `stats`
    (else empty). scale and shift are [C_out] float32 (bias already in shift), checked by the
    caller (cnnkernels.ops.pointwise_conv2d)."""
    out_channels = weight.shape[0]
    y = _output_like(x, out_channels, stride)
    n, _, out_h, out_w = y.shape
    rows = n * out_h * out_w
    k_per_group, n_per_group = weight.shape[1], out_channels // groups
    block_m, block_n, block_k = _blocks(rows, k_per_group, n_per_group, x.is_cuda)
    if x.is_cuda and (stats or residual is not None or input_scale is not None):
        block_n = min(block_n, FUSED_GPU_MAX_CHANNELS)  # the fused parts' registers
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n_per_group, block_n), groups)
    partials = torch.empty((3, grid[0], out_channels) if stats else (0,), dtype=torch.float32,
                           device=x.device)
    if rows > 0 and out_channels > 0:
        has_prologue = input_scale is not None
        res = residual if residual is not None else y
        torch.library.wrap_triton(_pointwise_conv2d_kernel)[grid](
            x, weight, y, scale.contiguous(), shift.contiguous(), res,
            input_scale if has_prologue else scale, input_shift if has_prologue else shift,
            partials, rows, k_per_group, n_per_group, out_h, out_w,
            x.stride(0), x.stride(1), x.stride(2) * stride, x.stride(3) * stride,
            weight.stride(0), weight.stride(1), *y.stride(), *res.stride(),
            negative_slope, input_negative_slope,
            ACT=activation, IN_ACT=input_activation, HAS_RESIDUAL=residual is not None,
            HAS_PROLOGUE=has_prologue, STATS=stats, CPU_MATH=not x.is_cuda,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=_num_warps(block_m, block_n))
    if not stats:
        empty = x.new_empty(0, dtype=torch.float32)
        return y, empty, empty.clone()
    if rows == 0:
        nan = torch.full((out_channels,), float("nan"), dtype=torch.float32, device=x.device)
        return y, nan, nan.clone()
    mean, var = combine_partials(partials)
    return y, mean, var


# --- backward: the two gradient GEMMs with the activation derivatives in their loads and stores -----
#
# With dz = scale[n] · act'(pre) · grad (dz rounded to x's dtype, as the unfused backward hands it
# to the convolution's backward) and u the prologue of x:
#     grad_u[m, k] = Σ_n dz[m, n] · W[n, k]            (_grad_input_kernel, over output channels)
#     grad_W[n, k] = Σ_m dz[m, n] · u[m, k]            (_grad_weight_kernel, over output pixels)
# act'(pre) is taken in the loads of grad: for identity it is 1, for ReLU 0 where y <= 0, else 1
# (y = relu(pre), so the saved output is enough; NaN included, as torch). Other activations need pre, which only a recomputed GEMM gives:
# the caller hands these kernels grad · act'(pre) instead, with ACT = identity. The prologue is
# applied in _grad_weight_kernel's loads of x (u is never stored), and its derivative in
# _grad_input_kernel's store: grad_x = in_act'(in_scale·x + in_shift) · in_scale · grad_u, with
# per-tile sums of d·x and d (d = in_act'(…)·grad_u) for the gradients of in_scale and in_shift.


@triton.jit
def _output_grad_tile(g_ptr, y_ptr, scale_ptr, g_row, y_row, channel, mask_m, mask_n, sg_c, sy_c,
                      ACT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """(dpre, dz) of one [channels, rows] tile in float32, 0 outside the masks:
    dpre = act'(pre)·grad, dz = scale·dpre. Pixels run along the threads (see the forward)."""
    mask = mask_n[:, None] & mask_m[None, :]
    g = tl.load(g_ptr + g_row[None, :] + channel[:, None] * sg_c, mask=mask, other=0.0)
    dpre = g.to(tl.float32)
    if ACT == RELU:
        y = tl.load(y_ptr + y_row[None, :] + channel[:, None] * sy_c, mask=mask, other=0.0)
        dpre = tl.where(y <= 0, 0.0, dpre)  # NaN passes the gradient, as torch's threshold_backward
    dz = dpre
    if HAS_SCALE:
        s = tl.load(scale_ptr + channel, mask=mask_n, other=0.0)
        dz = dpre * s[:, None]
    return dpre, dz


@triton.jit
def _grad_input_kernel(
        g_ptr, y_ptr, w_ptr, scale_ptr, x_ptr, in_scale_ptr, in_shift_ptr, gx_ptr, partials_ptr,
        rows, k_per_group, n_per_group, out_h, out_w,
        sg_n, sg_c, sg_h, sg_w, sy_n, sy_c, sy_h, sy_w, sw_n, sw_k,
        sx_n, sx_c, sx_h, sx_w, sgx_n, sgx_c, sgx_h, sgx_w, in_negative_slope,
        ACT: tl.constexpr, IN_ACT: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_PROLOGUE: tl.constexpr, PROLOGUE_SUMS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    group = tl.program_id(2).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = m < rows
    image, oh, ow = _output_pixels(m, out_h, out_w)
    g_row = image * sg_n + oh * sg_h + ow * sg_w
    y_row = image * sy_n + oh * sy_h + ow * sy_w
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = kk < k_per_group
    in_channel = group * k_per_group + kk

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, n_per_group, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        mask_n = j < n_per_group
        channel = tl.where(mask_n, group * n_per_group + j, 0)
        _, dz = _output_grad_tile(g_ptr, y_ptr, scale_ptr, g_row, y_row, channel, mask_m, mask_n,
                                  sg_c, sy_c, ACT, HAS_SCALE)
        dz = dz.to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + channel[:, None] * sw_n + kk[None, :] * sw_k,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += tl.dot(tl.trans(dz), w, input_precision="ieee")

    # the epilogue works on [K, M] tiles, pixels along the threads (see the forward)
    out_mask = mask_k[:, None] & mask_m[None, :]
    # grad_u as the unfused backward stores it (x's dtype) before the prologue's derivative
    grad = tl.trans(acc.to(x_ptr.dtype.element_ty))
    if HAS_PROLOGUE:
        x_row = _epilogue_rows(BLOCK_M, out_h, out_w, sx_n, sx_h, sx_w)
        x = tl.load(x_ptr + x_row[None, :] + in_channel[:, None] * sx_c, mask=out_mask,
                    other=0.0).to(tl.float32)
        s_in = tl.load(in_scale_ptr + in_channel, mask=mask_k, other=0.0)
        t_in = tl.load(in_shift_ptr + in_channel, mask=mask_k, other=0.0)
        d = activation_backward(grad.to(tl.float32), tl.fma(x, s_in[:, None], t_in[:, None]),
                                IN_ACT, in_negative_slope)
        d = tl.where(out_mask, d, 0.0)
        grad = (d * s_in[:, None]).to(x_ptr.dtype.element_ty)
        if PROLOGUE_SUMS:  # Σ over this tile's pixels of d·x (in_scale) and d (in_shift)
            channels = k_per_group * tl.num_programs(2)
            slot = pid_m * channels + in_channel
            plane = tl.num_programs(0).to(tl.int64) * channels
            tl.store(partials_ptr + slot, tl.sum(d * x, axis=1), mask=mask_k)
            tl.store(partials_ptr + plane + slot, tl.sum(d, axis=1), mask=mask_k)
    gx_row = _epilogue_rows(BLOCK_M, out_h, out_w, sgx_n, sgx_h, sgx_w)
    tl.store(gx_ptr + gx_row[None, :] + in_channel[:, None] * sgx_c, grad, mask=out_mask)


@triton.jit
def _grad_weight_kernel(
        g_ptr, y_ptr, scale_ptr, x_ptr, in_scale_ptr, in_shift_ptr, gw_ptr, gb_ptr,
        rows, rows_per_split, splits, k_per_group, n_per_group, out_h, out_w,
        sg_n, sg_c, sg_h, sg_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w, in_negative_slope,
        ACT: tl.constexpr, IN_ACT: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_PROLOGUE: tl.constexpr, BIAS_SUMS: tl.constexpr, CPU_MATH: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One split of the pixel range: partial grad_W [BLOCK_N, BLOCK_K] of one group into
    gw[split], and with BIAS_SUMS (column tile 0 only) the partial Σ dpre per channel into
    gb[split]; the host adds the splits (a fixed order: deterministic, unlike atomics)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    group = (tl.program_id(2) // splits).to(tl.int64)
    split = tl.program_id(2) % splits
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = j < n_per_group
    channel = tl.where(mask_n, group * n_per_group + j, 0)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = kk < k_per_group
    in_channel = group * k_per_group + kk
    if HAS_PROLOGUE:
        s_in = tl.load(in_scale_ptr + in_channel, mask=mask_k, other=0.0)
        t_in = tl.load(in_shift_ptr + in_channel, mask=mask_k, other=0.0)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = split.to(tl.int64) * rows_per_split
    last = tl.minimum(first + rows_per_split, rows)
    for m0 in range(first, last, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        mask_m = m < last
        image, oh, ow = _output_pixels(m, out_h, out_w)
        dpre, dz = _output_grad_tile(g_ptr, y_ptr, scale_ptr, image * sg_n + oh * sg_h + ow * sg_w,
                                     image * sy_n + oh * sy_h + ow * sy_w, channel, mask_m,
                                     mask_n, sg_c, sy_c, ACT, HAS_SCALE)
        if BIAS_SUMS:
            bias_sum += tl.sum(dpre, axis=1)
        # u read as a [K, M] tile, pixels along the threads (see the forward)
        a_mask = mask_k[:, None] & mask_m[None, :]
        u = tl.load(x_ptr + (image * sx_n + oh * sx_h + ow * sx_w)[None, :] + in_channel[:, None] * sx_c,
                    mask=a_mask, other=0.0)
        if HAS_PROLOGUE:  # u recomputed as the forward computed it, rounded to x's dtype
            u = activation_forward(tl.fma(u.to(tl.float32), s_in[:, None], t_in[:, None]), IN_ACT,
                                   in_negative_slope, CPU_MATH)
            u = tl.where(a_mask, u, 0.0).to(x_ptr.dtype.element_ty)
        acc += tl.dot(dz.to(x_ptr.dtype.element_ty), tl.trans(u), input_precision="ieee")

    out_channels = n_per_group * (tl.num_programs(2) // splits)
    gw = gw_ptr + split.to(tl.int64) * out_channels * k_per_group
    tl.store(gw + channel[:, None] * k_per_group + kk[None, :], acc,
             mask=mask_n[:, None] & mask_k[None, :])
    if BIAS_SUMS:
        tl.store(gb_ptr + split.to(tl.int64) * out_channels + channel, bias_sum,
                 mask=mask_n & (pid_k == 0))


def _weight_splits(rows: int, block_m: int, programs: int, on_gpu: bool) -> int:
    """How many pixel ranges grad_W's reduction is cut into: on a GPU enough programs to fill it
    (~4 per SM of a 132-SM H100); under the interpreter 2 (the split combine is exercised, and the
    interpreter's cost is per program)."""
    row_tiles = triton.cdiv(max(rows, 1), block_m)
    wanted = triton.cdiv(528, max(programs, 1)) if on_gpu else 2
    return max(1, min(row_tiles, wanted))


@torch.library.triton_op("cnnkernels::pointwise_conv2d_triton_backward", mutates_args=())
def pointwise_conv2d_triton_backward(
        grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
        scale: torch.Tensor | None, stride: int, groups: int, activation: int,
        input_scale: torch.Tensor | None, input_shift: torch.Tensor | None, input_activation: int,
        input_negative_slope: float, need_input: bool, need_weight: bool, need_bias_sums: bool,
        need_prologue_sums: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, Σ dpre per output channel, grad_input_scale, grad_input_shift) of
    y = act(scale·conv1x1(u) + …), u = in_act(input_scale·x + input_shift) when a prologue is
    given. `activation`: identity or ReLU (see above). `need_bias_sums`: Σ dpre (bias, shift);
    `need_prologue_sums` (with a prologue and need_input): the input_scale / input_shift
    gradients. Empty tensors for what is not needed."""
    out_channels, k_per_group = weight.shape[0], weight.shape[1]
    n_per_group = out_channels // groups
    n, _, out_h, out_w = y.shape
    rows = n * out_h * out_w
    compute = torch.float32

    def empty(dtype=compute):  # a fresh one each time: the op's outputs must not alias
        return x.new_empty(0, dtype=dtype)

    has_prologue = input_scale is not None
    has_scale = scale is not None
    on_gpu = x.is_cuda
    block_m, block_n, block_k = _blocks(rows, k_per_group, n_per_group, on_gpu)
    if on_gpu:  # the backward keeps more tiles live than the forward: 128-pixel tiles spill
        block_m = min(block_m, BACKWARD_GPU_MAX_PIXELS)
    in_scale = input_scale if has_prologue else empty()
    in_shift = input_shift if has_prologue else empty()
    sc = scale if has_scale else empty()
    xs = (x.stride(0), x.stride(1), x.stride(2) * stride, x.stride(3) * stride)
    work = rows > 0 and out_channels > 0

    grad_x = empty(x.dtype)
    in_sums = x.new_zeros((2, 0, x.shape[1]), dtype=compute)
    if need_input:
        # the unsampled pixels of a strided 1x1 convolution get no gradient (nor does any pixel
        # when there is no output channel and no kernel runs)
        grad_x = (torch.zeros_like if stride > 1 or not work else torch.empty_like)(x)
        grid = (triton.cdiv(rows, block_m), triton.cdiv(k_per_group, block_k), groups)
        prologue_sums = has_prologue and need_prologue_sums
        in_sums = x.new_zeros((2, grid[0], x.shape[1]) if prologue_sums else (2, 0, x.shape[1]),
                              dtype=compute)
        if work:
            torch.library.wrap_triton(_grad_input_kernel)[grid](
                grad, y, weight, sc, x, in_scale, in_shift, grad_x, in_sums,
                rows, k_per_group, n_per_group, out_h, out_w,
                *grad.stride(), *y.stride(), weight.stride(0), weight.stride(1), *xs,
                grad_x.stride(0), grad_x.stride(1), grad_x.stride(2) * stride,
                grad_x.stride(3) * stride, input_negative_slope,
                ACT=activation, IN_ACT=input_activation, HAS_SCALE=has_scale,
                HAS_PROLOGUE=has_prologue, PROLOGUE_SUMS=prologue_sums,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=_num_warps(block_m, block_n))

    grad_w = empty(weight.dtype)
    bias_sums = x.new_zeros((0, out_channels), dtype=compute)
    if need_weight or need_bias_sums:
        if on_gpu:  # pixels are grad_W's reduction: short steps keep its tiles in registers
            block_m = min(block_m, GRAD_WEIGHT_GPU_MAX_PIXELS)
            block_n = min(block_n, FUSED_GPU_MAX_CHANNELS)
        tiles = triton.cdiv(n_per_group, block_n) * triton.cdiv(k_per_group, block_k) * groups
        splits = _weight_splits(rows, block_m, tiles, on_gpu)
        rows_per_split = triton.cdiv(triton.cdiv(max(rows, 1), splits), block_m) * block_m
        partial_w = x.new_zeros((splits, out_channels, k_per_group), dtype=compute)
        bias_sums = x.new_zeros((splits, out_channels), dtype=compute)
        if work:
            grid = (triton.cdiv(n_per_group, block_n), triton.cdiv(k_per_group, block_k),
                    groups * splits)
            torch.library.wrap_triton(_grad_weight_kernel)[grid](
                grad, y, sc, x, in_scale, in_shift, partial_w, bias_sums,
                rows, rows_per_split, splits, k_per_group, n_per_group, out_h, out_w,
                *grad.stride(), *y.stride(), *xs, input_negative_slope,
                ACT=activation, IN_ACT=input_activation, HAS_SCALE=has_scale,
                HAS_PROLOGUE=has_prologue, BIAS_SUMS=need_bias_sums, CPU_MATH=not on_gpu,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=_grad_weight_num_warps(block_n, block_k))
        if need_weight:
            grad_w = partial_w.sum(0).to(weight.dtype).view(weight.shape)
    sums = bias_sums.sum(0) if need_bias_sums else empty()
    if need_prologue_sums and has_prologue and need_input:
        grad_in_scale, grad_in_shift = in_sums.sum(1).unbind(0)
        return grad_x, grad_w, sums, grad_in_scale.clone(), grad_in_shift.clone()
    return grad_x, grad_w, sums, empty(), empty()
