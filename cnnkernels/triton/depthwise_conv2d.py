"""Triton kernels of depthwise 2-D convolution (groups == in_channels) and the ops that launch them.

Semantics equal ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` with
weight [C*m, 1, kh, kw]: output channel o reads input channel o // m (channel multiplier m).

Ops (``torch.library.triton_op``, so torch.compile sees through them to the kernels):

* ``cnnkernels::depthwise_conv2d_triton``: forward with an optional fused inference epilogue
  ``act(scale[o] * (conv + bias[o]) + shift[o])`` (folded BatchNorm + activation code).
* ``cnnkernels::depthwise_conv2d_backward_input_triton``: grad w.r.t. x.
* ``cnnkernels::depthwise_conv2d_backward_weight_triton``: grad w.r.t. weight, a two-level
  reduction (per-program partial sums in float32/float64, then a deterministic sum of partials).

Layouts: every kernel takes the element strides of each tensor, so NCHW, channels_last and even
non-dense inputs are read in place, without copies. Outputs keep the input's memory format
(channels_last in -> channels_last out). Each program owns a [BLOCK_C, BLOCK_H, BLOCK_W] tile
(channels x rows x columns); the launcher picks the tile so that the dimension that is contiguous in
memory (W for NCHW, C for channels_last) is the long one, which gives coalesced, vectorisable loads
on the GPU (Triton specialises strides equal to 1, so it knows which dimension is contiguous).

Offsets that can exceed 2**31 elements (anything multiplied by a tensor stride) are int64; the
small per-tile indices (channel, row, column numbers) stay int32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .activation import activation_forward

# Tile budgets (elements per program). On the GPU ~512 outputs per program keeps 4 warps busy with
# a few accumulators per thread and no register pressure even for 9x9 kernels. The interpreter's
# cost is per program and per tl op, not per element, so there we cover whole planes and many
# channels with one program.
GPU_TILE = 512
GPU_MAX_CONTIGUOUS = 64  # 64 contiguous float32 = 256 B: full 128-B lines, 16-B vector loads
INTERPRETER_MAX_C = 16
INTERPRETER_MAX_HW = 32
# Backward weight: at most this many output tiles per program on the GPU (its g/x tiles, re-read
# once per tap, then mostly stay in L1/L2), fewer when that would leave fewer than
# GPU_MIN_PROGRAMS programs (~8 per SM of an H100) to fill the GPU with. The interpreter does all
# of a channel block's tiles in one program.
GPU_ITEMS_PER_PROGRAM = 8
GPU_MIN_PROGRAMS = 1024
REDUCE_BLOCK_GPU = 256
REDUCE_BLOCK_INTERPRETER = 4096

# Tests set this to exercise the GPU tiling (many partial tiles, several programs per plane, the
# backward-weight partial sums) under the interpreter.
_GPU_TILES_ON_CPU = False

_INT32_MAX = 2**31 - 1


# --- kernels -----------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
        x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, y_ptr,
        C_out, H, W, OH, OW,
        sxn, sxc, sxh, sxw, swc, swh, sww, syn, syc, syh, syw,
        pad_h, pad_w, dil_h, dil_w, negative_slope,
        tiles_w, tiles_per_plane, c_blocks,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
        MULT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, CPU_MATH: tl.constexpr,
        COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr):
    """One program: output tile y[n, oc-block, oh-block, ow-block].

    The tile's input offsets are computed once (x_off); each of the KH*KW taps then only adds a
    scalar to them and builds its halo mask from a row and a column vector, so the inner loop is
    one masked load and one FMA per element. Each tap's weight vector is loaded once per program
    into registers. Kernel rows are a runtime loop and columns are unrolled (static_range): fully
    unrolling 7x7 / 9x9 made the compiler hoist all the loads and spill (checked on sm_90 PTX);
    one unrolled row keeps KW loads in flight at about 40 registers for 3x3.
    """
    pid = tl.program_id(0)  # programs = N * c_blocks * tiles_per_plane < 2**31 (launcher)
    tile = pid % tiles_per_plane  # tiles of one plane are neighbours: they share halo rows in L2
    plane = pid // tiles_per_plane
    cb = plane % c_blocks
    n = plane // c_blocks

    oc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    oh = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    ow = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    c_ok = oc < C_out
    ih0 = oh * STRIDE_H - pad_h  # top-left input of each output's window (may be in the padding)
    iw0 = ow * STRIDE_W - pad_w

    x_base = x_ptr + tl.cast(n, tl.int64) * sxn
    x_off = ((oc // MULT).to(tl.int64) * sxc)[:, None, None] \
        + (ih0.to(tl.int64) * sxh)[None, :, None] + (iw0.to(tl.int64) * sxw)[None, None, :]
    # tl.cast, not .to: a stride/dilation equal to 1 arrives as a constexpr on the GPU.
    step_h = tl.cast(dil_h, tl.int64) * sxh
    step_w = tl.cast(dil_w, tl.int64) * sxw
    w_base = w_ptr + oc * swc  # the weight has C_out*KH*KW elements: int32 is enough

    acc = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=COMPUTE)
    for i in range(KH):
        ih = ih0 + i * dil_h
        h_ok = (ih >= 0) & (ih < H)
        for j in tl.static_range(KW):
            iw = iw0 + j * dil_w
            w_ok = (iw >= 0) & (iw < W)
            mask = c_ok[:, None, None] & h_ok[None, :, None] & w_ok[None, None, :]
            wv = tl.load(w_base + i * swh + j * sww, mask=c_ok, other=0.0).to(COMPUTE)
            xv = tl.load(x_base + x_off + (i * step_h + j * step_w), mask=mask, other=0.0)
            acc += xv.to(COMPUTE) * wv[:, None, None]

    # Fused epilogue: bias, folded BatchNorm (scale, shift), activation; all per output channel.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + oc, mask=c_ok, other=0.0).to(COMPUTE)[:, None, None]
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + oc, mask=c_ok, other=0.0).to(COMPUTE)[:, None, None]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + oc, mask=c_ok, other=0.0).to(COMPUTE)[:, None, None]
    acc = activation_forward(acc, ACT, negative_slope, CPU_MATH)

    y_off = (oc.to(tl.int64) * syc)[:, None, None] + (oh.to(tl.int64) * syh)[None, :, None] \
        + (ow.to(tl.int64) * syw)[None, None, :]
    y_mask = c_ok[:, None, None] & (oh < OH)[None, :, None] & (ow < OW)[None, None, :]
    y_base = y_ptr + tl.cast(n, tl.int64) * syn
    tl.store(y_base + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _backward_input_kernel(
        g_ptr, w_ptr, dx_ptr,
        C, H, W, OH, OW,
        sgn, sgc, sgh, sgw, swc, swh, sww, sdn, sdc, sdh, sdw,
        pad_h, pad_w, dil_h, dil_w,
        tiles_w, tiles_per_plane, c_blocks,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
        MULT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """One program: input-gradient tile dx[n, c-block, ih-block, iw-block] (a gather, no atomics).

    dx[n, c, ih, iw] = sum over k < MULT, taps (i, j) of g[n, c*MULT+k, oh, ow] * w[c*MULT+k, i, j]
    where ih = oh*STRIDE_H - pad_h + i*dil_h, i.e. oh = (ih + pad_h - i*dil_h) / STRIDE_H when that
    divides exactly and lands in [0, OH). Strides are constexprs: for stride 1 the divisibility
    test and the division disappear. Rows are a runtime loop, as in _forward_kernel.
    """
    pid = tl.program_id(0)
    tile = pid % tiles_per_plane
    plane = pid // tiles_per_plane
    cb = plane % c_blocks
    n = plane // c_blocks

    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ih = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    iw = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    c_ok = c < C
    g_base = g_ptr + tl.cast(n, tl.int64) * sgn

    acc = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=COMPUTE)
    for i in range(KH):
        th = ih + pad_h - i * dil_h
        if STRIDE_H == 1:
            oh = th
            h_ok = (th >= 0) & (th < OH)
        else:
            oh = th // STRIDE_H  # only used where th >= 0
            h_ok = (th >= 0) & (th % STRIDE_H == 0) & (oh < OH)
        h_off = oh.to(tl.int64) * sgh
        for j in tl.static_range(KW):
            tw = iw + pad_w - j * dil_w
            if STRIDE_W == 1:
                ow = tw
                w_ok = (tw >= 0) & (tw < OW)
            else:
                ow = tw // STRIDE_W
                w_ok = (tw >= 0) & (tw % STRIDE_W == 0) & (ow < OW)
            sp_off = h_off[:, None] + (ow.to(tl.int64) * sgw)[None, :]
            mask = c_ok[:, None, None] & (h_ok[:, None] & w_ok[None, :])[None, :, :]
            for k in tl.static_range(MULT):
                o = c * MULT + k
                wv = tl.load(w_ptr + o * swc + i * swh + j * sww, mask=c_ok, other=0.0)
                gv = tl.load(g_base + (o.to(tl.int64) * sgc)[:, None, None] + sp_off[None, :, :],
                             mask=mask, other=0.0)
                acc += gv.to(COMPUTE) * wv.to(COMPUTE)[:, None, None]

    d_off = (c.to(tl.int64) * sdc)[:, None, None] + (ih.to(tl.int64) * sdh)[None, :, None] \
        + (iw.to(tl.int64) * sdw)[None, None, :]
    d_mask = c_ok[:, None, None] & (ih < H)[None, :, None] & (iw < W)[None, None, :]
    d_base = dx_ptr + tl.cast(n, tl.int64) * sdn
    tl.store(d_base + d_off, acc.to(dx_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _backward_weight_kernel(
        g_ptr, x_ptr, part_ptr,
        C_out, H, W, OH, OW,
        sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
        pad_h, pad_w, dil_h, dil_w,
        tiles_w, tiles_per_plane, n_items, items_per_program, n_parts,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
        MULT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """One program: partial sums of grad_w[oc-block, :, :] over a run of output tiles.

    Work items are the (n, output tile) pairs of a channel block; program `part` takes items
    [part*items_per_program, ...). For each tap it accumulates g * x elementwise in a tile-shaped
    register accumulator across its items (no reduction, no synchronisation inside the loop), then
    reduces the tile once and writes part_ptr[part, oc, tap]. _sum_partials_kernel adds the parts
    in a fixed order (deterministic, no atomics). g's tiles are re-read once per tap; with few items
    per program they are still in L1/L2.
    """
    pid = tl.program_id(0)
    part = pid % n_parts
    cb = pid // n_parts
    oc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = oc < C_out
    gc_off = (oc.to(tl.int64) * sgc)[:, None, None]
    xc_off = ((oc // MULT).to(tl.int64) * sxc)[:, None, None]
    rh = tl.arange(0, BLOCK_H)
    rw = tl.arange(0, BLOCK_W)
    start = part * items_per_program
    end = tl.minimum(start + items_per_program, n_items)
    part_base = part_ptr + (tl.cast(part, tl.int64) * C_out + oc) * (KH * KW)

    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            acc = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=COMPUTE)
            for it in range(start, end):
                n = tl.cast(it // tiles_per_plane, tl.int64)
                tile = it % tiles_per_plane
                oh = (tile // tiles_w) * BLOCK_H + rh
                ow = (tile % tiles_w) * BLOCK_W + rw
                ih = oh * STRIDE_H - pad_h + i * dil_h
                iw = ow * STRIDE_W - pad_w + j * dil_w
                # Where x is padding the product is zero: skip loading g there too.
                h_ok = (oh < OH) & (ih >= 0) & (ih < H)
                w_ok = (ow < OW) & (iw >= 0) & (iw < W)
                mask = c_ok[:, None, None] & (h_ok[:, None] & w_ok[None, :])[None, :, :]
                g_off = gc_off + ((oh.to(tl.int64) * sgh)[:, None]
                                  + (ow.to(tl.int64) * sgw)[None, :])[None, :, :]
                x_off = xc_off + ((ih.to(tl.int64) * sxh)[:, None]
                                  + (iw.to(tl.int64) * sxw)[None, :])[None, :, :]
                gv = tl.load(g_ptr + n * sgn + g_off, mask=mask, other=0.0)
                xv = tl.load(x_ptr + n * sxn + x_off, mask=mask, other=0.0)
                acc += gv.to(COMPUTE) * xv.to(COMPUTE)
            total = tl.sum(tl.sum(acc, axis=2), axis=1)
            tl.store(part_base + (i * KW + j), total, mask=c_ok)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, n_parts, n_cols, COMPUTE: tl.constexpr,
                         BLOCK: tl.constexpr):
    """out[col] = sum over p of part[p, col], in order p = 0, 1, ... (deterministic)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    ptrs = part_ptr + cols  # advanced row by row: 64-bit pointer arithmetic, no int32 overflow
    acc = tl.zeros([BLOCK], dtype=COMPUTE)
    for _ in range(n_parts):
        acc += tl.load(ptrs, mask=ok, other=0.0).to(COMPUTE)
        ptrs += n_cols
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


# --- launch helpers ----------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _compute_dtype(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _gpu_tiles(t: torch.Tensor) -> bool:
    return t.is_cuda or _GPU_TILES_ON_CPU


def _channels_contiguous(t: torch.Tensor) -> bool:
    """C is the unit-stride dimension (channels_last), so tiles should be long along C."""
    return t.size(1) > 1 and t.stride(1) == 1


def _output_memory_format(t: torch.Tensor) -> torch.memory_format:
    """F.conv2d's choice: channels_last only when the input is channels_last and not also NCHW."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _tile(t: torch.Tensor, channels: int, rows: int, cols: int):
    """(BLOCK_C, BLOCK_H, BLOCK_W, num_warps) for a tile of a [channels, rows, cols] plane set,
    `t` being the tensor whose layout decides which dimension is contiguous."""
    pc, ph, pw = _pow2(channels), _pow2(rows), _pow2(cols)
    if not _gpu_tiles(t):
        return (min(pc, INTERPRETER_MAX_C), min(ph, INTERPRETER_MAX_HW),
                min(pw, INTERPRETER_MAX_HW), 4)
    if _channels_contiguous(t):  # channels_last: channels first, then columns, then rows
        bc = min(pc, GPU_MAX_CONTIGUOUS)
        bw = min(pw, max(1, GPU_TILE // bc))
        bh = min(ph, max(1, GPU_TILE // (bc * bw)))
    else:  # NCHW: columns first, then rows, then channels (small late-layer planes)
        bw = min(pw, GPU_MAX_CONTIGUOUS)
        bh = min(ph, max(1, GPU_TILE // bw))
        bc = min(pc, max(1, GPU_TILE // (bw * bh)))
    num_warps = max(1, min(4, (bc * bh * bw) // 128))
    return bc, bh, bw, num_warps


def _pair(v, name: str):
    v = [int(e) for e in v]
    assert len(v) == 2, f"depthwise_conv2d_triton: {name} must have 2 elements, got {v}"
    return v


def _geometry(input_size, weight_size, stride, padding, dilation):
    """Checks what the kernels rely on.

    Returns (N, C, H, W, C_out, KH, KW, OH, OW, MULT, stride, padding, dilation)."""
    assert len(input_size) == 4, f"depthwise_conv2d_triton: expected a 4-D input, got {input_size}"
    assert len(weight_size) == 4 and weight_size[1] == 1, (
        f"depthwise_conv2d_triton: expected a weight of shape [C*m, 1, kh, kw], got {weight_size}")
    n, c, h, w = (int(e) for e in input_size)
    c_out, _, kh, kw = (int(e) for e in weight_size)
    assert c >= 1 and c_out % c == 0 and c_out >= c, (
        f"depthwise_conv2d_triton: weight has {c_out} output channels, not a multiple of {c}")
    s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    assert min(s) >= 1 and min(d) >= 1 and min(p) >= 0 and kh >= 1 and kw >= 1
    oh = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    ow = (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    assert oh >= 1 and ow >= 1, (
        "depthwise_conv2d_triton: the output would be empty (input too small)")
    return n, c, h, w, c_out, kh, kw, oh, ow, c_out // c, s, p, d


def _grid_1d(programs: int):
    assert programs <= _INT32_MAX, "depthwise_conv2d_triton: too many programs for one launch"
    return (programs,)


def _strides(t: torch.Tensor):
    return tuple(int(e) for e in t.stride())


def _per_channel(t: Optional[torch.Tensor], c_out: int, name: str, like: torch.Tensor):
    if t is None:
        return like, False  # a dummy pointer the kernel never reads (HAS_* is False)
    assert t.numel() == c_out, f"depthwise_conv2d_triton: {name} must have {c_out} elements"
    return t.reshape(-1).contiguous(), True


# --- ops -------------------------------------------------------------------------------------


# Explicit schemas, the same as the C++ ops' (csrc/depthwise_conv2d.cpp), defaults included:
# inferred ones would say SymInt for the ints; plain ints mean torch.compile always sees concrete
# strides and activation codes (they become constexprs).
@torch.library.triton_op(
    "cnnkernels::depthwise_conv2d_triton", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
           "Tensor? scale=None, Tensor? shift=None, int activation=0, "
           "float negative_slope=0.01) -> Tensor")
def depthwise_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            stride: list[int], padding: list[int], dilation: list[int],
                            scale: Optional[torch.Tensor] = None,
                            shift: Optional[torch.Tensor] = None, activation: int = 0,
                            negative_slope: float = 0.01) -> torch.Tensor:
    """act(scale * (depthwise_conv2d(x, weight) + bias) + shift); scale/shift/bias optional."""
    n, c, h, w, c_out, kh, kw, oh, ow, mult, s, p, d = _geometry(
        x.shape, weight.shape, stride, padding, dilation)
    y = torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=x.device,
                    memory_format=_output_memory_format(x))
    if y.numel() == 0:
        return y
    bias_t, has_bias = _per_channel(bias, c_out, "bias", x)
    scale_t, has_scale = _per_channel(scale, c_out, "scale", x)
    shift_t, has_shift = _per_channel(shift, c_out, "shift", x)
    bc, bh, bw, num_warps = _tile(x, c_out, oh, ow)
    tiles_w = triton.cdiv(ow, bw)
    tiles_per_plane = triton.cdiv(oh, bh) * tiles_w
    c_blocks = triton.cdiv(c_out, bc)
    torch.library.wrap_triton(_forward_kernel)[_grid_1d(n * c_blocks * tiles_per_plane)](
        x, weight, bias_t, scale_t, shift_t, y,
        c_out, h, w, oh, ow,
        *_strides(x), *_strides(weight)[:1], *_strides(weight)[2:], *_strides(y),
        p[0], p[1], d[0], d[1], float(negative_slope),
        tiles_w, tiles_per_plane, c_blocks,
        KH=kh, KW=kw, STRIDE_H=s[0], STRIDE_W=s[1], MULT=mult,
        HAS_BIAS=has_bias, HAS_SCALE=has_scale, HAS_SHIFT=has_shift,
        ACT=int(activation), CPU_MATH=not x.is_cuda, COMPUTE=_compute_dtype(x),
        BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw, num_warps=num_warps)
    return y


@torch.library.triton_op(
    "cnnkernels::depthwise_conv2d_backward_input_triton", mutates_args=(),
    schema="(Tensor grad_output, Tensor weight, int[] input_size, int[] stride, int[] padding, "
           "int[] dilation) -> Tensor")
def depthwise_conv2d_backward_input_triton(grad_output: torch.Tensor, weight: torch.Tensor,
                                           input_size: list[int], stride: list[int],
                                           padding: list[int], dilation: list[int]
                                           ) -> torch.Tensor:
    """grad w.r.t. x, in grad_output's memory format; sums the m output channels of each input
    channel inside the kernel."""
    n, c, h, w, c_out, kh, kw, oh, ow, mult, s, p, d = _geometry(
        input_size, weight.shape, stride, padding, dilation)
    assert tuple(grad_output.shape) == (n, c_out, oh, ow), (
        f"depthwise_conv2d_backward_input_triton: grad_output has shape "
        f"{tuple(grad_output.shape)}, expected {(n, c_out, oh, ow)}")
    dx = torch.empty((n, c, h, w), dtype=grad_output.dtype, device=grad_output.device,
                     memory_format=_output_memory_format(grad_output))
    if dx.numel() == 0:
        return dx
    bc, bh, bw, num_warps = _tile(grad_output, c, h, w)
    tiles_w = triton.cdiv(w, bw)
    tiles_per_plane = triton.cdiv(h, bh) * tiles_w
    c_blocks = triton.cdiv(c, bc)
    torch.library.wrap_triton(_backward_input_kernel)[_grid_1d(n * c_blocks * tiles_per_plane)](
        grad_output, weight, dx,
        c, h, w, oh, ow,
        *_strides(grad_output), *_strides(weight)[:1], *_strides(weight)[2:], *_strides(dx),
        p[0], p[1], d[0], d[1],
        tiles_w, tiles_per_plane, c_blocks,
        KH=kh, KW=kw, STRIDE_H=s[0], STRIDE_W=s[1], MULT=mult,
        COMPUTE=_compute_dtype(grad_output), BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw,
        num_warps=num_warps)
    return dx


@torch.library.triton_op(
    "cnnkernels::depthwise_conv2d_backward_weight_triton", mutates_args=(),
    schema="(Tensor grad_output, Tensor x, int[] weight_size, int[] stride, int[] padding, "
           "int[] dilation) -> Tensor")
def depthwise_conv2d_backward_weight_triton(grad_output: torch.Tensor, x: torch.Tensor,
                                            weight_size: list[int], stride: list[int],
                                            padding: list[int], dilation: list[int]
                                            ) -> torch.Tensor:
    """grad w.r.t. weight ([C*m, 1, kh, kw], contiguous, x's dtype): partial sums per
    (channel block, run of output tiles), then an ordered sum of the partials."""
    n, c, h, w, c_out, kh, kw, oh, ow, mult, s, p, d = _geometry(
        x.shape, weight_size, stride, padding, dilation)
    assert tuple(grad_output.shape) == (n, c_out, oh, ow), (
        f"depthwise_conv2d_backward_weight_triton: grad_output has shape "
        f"{tuple(grad_output.shape)}, expected {(n, c_out, oh, ow)}")
    grad_w = torch.empty((c_out, 1, kh, kw), dtype=x.dtype, device=x.device)
    if n == 0:
        return grad_w.zero_()
    gpu = _gpu_tiles(x)
    bc, bh, bw, num_warps = _tile(x, c_out, oh, ow)
    tiles_w = triton.cdiv(ow, bw)
    tiles_per_plane = triton.cdiv(oh, bh) * tiles_w
    c_blocks = triton.cdiv(c_out, bc)
    n_items = n * tiles_per_plane
    assert n_items <= _INT32_MAX, "depthwise_conv2d_backward_weight_triton: input too large"
    if gpu:
        items_per_program = max(1, min(GPU_ITEMS_PER_PROGRAM,
                                       c_blocks * n_items // GPU_MIN_PROGRAMS))
    else:
        items_per_program = n_items
    n_parts = triton.cdiv(n_items, items_per_program)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    partials = torch.empty((n_parts, c_out * kh * kw), dtype=acc_dtype, device=x.device)
    torch.library.wrap_triton(_backward_weight_kernel)[_grid_1d(c_blocks * n_parts)](
        grad_output, x, partials,
        c_out, h, w, oh, ow,
        *_strides(grad_output), *_strides(x),
        p[0], p[1], d[0], d[1],
        tiles_w, tiles_per_plane, n_items, items_per_program, n_parts,
        KH=kh, KW=kw, STRIDE_H=s[0], STRIDE_W=s[1], MULT=mult,
        COMPUTE=_compute_dtype(x), BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw, num_warps=num_warps)
    n_cols = c_out * kh * kw
    block = REDUCE_BLOCK_GPU if gpu else REDUCE_BLOCK_INTERPRETER
    torch.library.wrap_triton(_sum_partials_kernel)[(triton.cdiv(n_cols, block),)](
        partials, grad_w, n_parts, n_cols, COMPUTE=_compute_dtype(x), BLOCK=block)
    return grad_w
