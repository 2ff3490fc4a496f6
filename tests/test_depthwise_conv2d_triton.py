"""Depthwise conv2d Triton kernels, op level: forward (+ fused epilogue), grad input, grad weight.

The three `cnnkernels::depthwise_conv2d*_triton` ops are called directly and compared with
F.conv2d(groups=C) and torch.autograd.grad of it. Without a GPU they run on CPU tensors through the
Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported).

References are computed in float64 on the CPU (also for float32 inputs): that is the exact answer
up to 1e-16, so the tolerances only measure our float32 rounding, and on a GPU cuDNN's TF32 cannot
blur the comparison. Tolerances: rtol 1e-5 and atol 1e-5 times sqrt(number of summed products)
for float32; 1e-12 for float64.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from cnnkernels import activations, backend

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not backend.triton_available(),
                       reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1 "
                              "(set by tests/conftest.py when there is no GPU)"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def dw():
    """The module; importing it registers the ops."""
    from cnnkernels.triton import depthwise_conv2d
    return depthwise_conv2d


def use_gpu_tiles(dw, monkeypatch):
    """The GPU tiling with shrunken budgets, under the interpreter: the small test planes are split
    into many partial tiles (and channel blocks), and the weight gradient into many partial sums
    that the second kernel adds up. Costly in the interpreter, so only for a subset of cases."""
    monkeypatch.setattr(dw, "_GPU_TILES_ON_CPU", True)
    monkeypatch.setattr(dw, "GPU_TILE", 16)
    monkeypatch.setattr(dw, "GPU_MAX_CONTIGUOUS", 4)
    monkeypatch.setattr(dw, "GPU_ITEMS_PER_PROGRAM", 2)
    monkeypatch.setattr(dw, "GPU_MIN_PROGRAMS", 1)
    monkeypatch.setattr(dw, "REDUCE_BLOCK_GPU", 16)


# (N, C, H, W, multiplier, kernel, stride, padding, dilation, bias)
CASES = [
    (2, 3, 7, 9, 1, (3, 3), (1, 1), (1, 1), (1, 1), True),
    (3, 5, 13, 11, 1, (3, 3), (2, 2), (1, 1), (1, 1), False),
    (1, 3, 13, 11, 2, (3, 3), (3, 3), (0, 0), (1, 1), True),
    (2, 5, 13, 11, 1, (3, 3), (1, 1), (2, 2), (2, 2), False),
    (2, 3, 7, 9, 2, (5, 5), (1, 1), (2, 2), (1, 1), True),
    (1, 5, 13, 11, 1, (5, 5), (2, 2), (0, 0), (2, 2), False),
    (1, 3, 13, 11, 1, (7, 7), (1, 1), (3, 3), (1, 1), True),
    (2, 1, 13, 11, 2, (7, 7), (2, 2), (3, 3), (1, 1), False),
    (3, 5, 7, 9, 1, (1, 1), (1, 1), (0, 0), (1, 1), True),
    (2, 3, 7, 9, 2, (1, 1), (2, 2), (1, 1), (1, 1), False),
    (2, 3, 7, 9, 1, (3, 5), (1, 2), (1, 2), (1, 1), True),
    (1, 5, 13, 11, 2, (3, 5), (2, 1), (0, 1), (2, 1), False),
    (1, 3, 13, 11, 1, (5, 3), (3, 1), (2, 1), (1, 2), True),
    (1, 1, 13, 11, 1, (9, 9), (1, 1), (4, 4), (1, 1), True),
    (2, 3, 13, 11, 1, (2, 4), (2, 3), (1, 0), (1, 1), False),
]


def case_id(case):
    n, c, h, w, m, k, s, p, d, bias = case
    return (f"n{n}c{c}x{m}-{h}x{w}-k{k[0]}x{k[1]}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}"
            f"{'-bias' if bias else ''}")


# Also run with the GPU tiling (see use_gpu_tiles), one layout each, kept small (the interpreter
# pays per program): strides 2 and 3, dilation, multiplier 2, non-square and 1x1 kernels, planes
# split into partial tiles along H and W, several (partial) channel blocks and partial sums.
GPU_TILE_CASES = [
    ((2, 5, 9, 11, 1, (3, 3), (2, 2), (1, 1), (1, 1), False), "nchw"),
    ((1, 3, 5, 7, 2, (5, 5), (1, 1), (2, 2), (1, 1), True), "channels_last"),
    ((1, 3, 11, 9, 2, (3, 5), (2, 1), (0, 1), (2, 1), True), "nchw"),
    (CASES[12], "channels_last"),
    (CASES[9], "channels_last"),
]


def tiled_params():
    """(case, layout, gpu_tiles): every case in both layouts with this device's tiling, plus
    GPU_TILE_CASES with the GPU tiling."""
    params = [pytest.param(case, layout, False, id=f"{case_id(case)}-{layout}")
              for case in CASES for layout in ("nchw", "channels_last")]
    params += [pytest.param(case, layout, True, id=f"{case_id(case)}-{layout}-gpu_tiles")
               for case, layout in GPU_TILE_CASES]
    return params


def make_case(case, layout="nchw", dtype=torch.float32, seed=0):
    """x, weight, bias (or None) and the conv arguments, on DEVICE in `dtype` and `layout`."""
    n, c, h, w, m, k, s, p, d, has_bias = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c * m, 1, *k, generator=g, dtype=torch.float64)
    bias = torch.randn(c * m, generator=g, dtype=torch.float64) if has_bias else None
    x = x.to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # not dense: every other column of a wider tensor
        x = torch.cat([x, x], dim=-1)[..., ::2]
    weight = weight.to(DEVICE, dtype)
    bias = None if bias is None else bias.to(DEVICE, dtype)
    return x, weight, bias, list(s), list(p), list(d)


def reference_forward(x, weight, bias, s, p, d):
    """F.conv2d in float64 on the CPU, in x's memory format (the CPU conv keeps channels_last)."""
    y = F.conv2d(x.double().cpu(), weight.double().cpu(),
                 None if bias is None else bias.double().cpu(), s, p, d, x.shape[1])
    return y


def reference_grads(x, weight, s, p, d, grad_output):
    """torch.autograd.grad of F.conv2d (float64, CPU): grad_input and grad_weight."""
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = weight.detach().double().cpu().requires_grad_()
    y = F.conv2d(x64, w64, None, s, p, d, x.shape[1])
    return torch.autograd.grad(y, (x64, w64), grad_output.double().cpu())


def assert_close(actual, expected, dtype, terms):
    """`terms`: how many products each output sums (its rounding error grows like sqrt(terms))."""
    expected = expected.to(actual.device, actual.dtype)
    if dtype == torch.float64:
        rtol, atol = 1e-12, 1e-12 * math.sqrt(terms)
    else:
        rtol, atol = 1e-5, 1e-5 * math.sqrt(terms)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def forward(x, weight, bias, s, p, d, scale=None, shift=None, act=activations.IDENTITY,
            negative_slope=0.01):
    return torch.ops.cnnkernels.depthwise_conv2d_triton(x, weight, bias, s, p, d, scale, shift,
                                                         act, negative_slope)


def same_memory_format(actual, expected):
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert actual.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt)


# --- forward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case, layout, gpu_tiles", tiled_params())
def test_forward_matches_conv2d(dw, monkeypatch, case, layout, gpu_tiles):
    if gpu_tiles:
        use_gpu_tiles(dw, monkeypatch)
    x, weight, bias, s, p, d = make_case(case, layout)
    y = forward(x, weight, bias, s, p, d)
    expected = reference_forward(x, weight, bias, s, p, d)
    assert y.shape == expected.shape and y.dtype == x.dtype and y.device == x.device
    same_memory_format(y, expected)
    if layout == "channels_last" and x.shape[1] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, expected, x.dtype, weight[0].numel())


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[11]], ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_forward_float64(case, layout):
    x, weight, bias, s, p, d = make_case(case, layout, torch.float64)
    y = forward(x, weight, bias, s, p, d)
    assert y.dtype == torch.float64
    assert_close(y, reference_forward(x, weight, bias, s, p, d), torch.float64, weight[0].numel())


def test_forward_reads_non_dense_input_in_place():
    x, weight, bias, s, p, d = make_case(CASES[4], "strided")
    assert not x.is_contiguous()
    y = forward(x, weight, bias, s, p, d)
    assert y.is_contiguous()
    assert_close(y, reference_forward(x, weight, bias, s, p, d), x.dtype, weight[0].numel())


def test_forward_non_contiguous_weight():
    x, weight, bias, s, p, d = make_case(CASES[10])
    weight_t = weight.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not weight_t.is_contiguous()
    y = forward(x, weight_t, bias, s, p, d)
    assert_close(y, reference_forward(x, weight, bias, s, p, d), x.dtype, weight[0].numel())


# --- fused epilogue ----------------------------------------------------------------------------

TORCH_ACT = {
    activations.IDENTITY: lambda t, slope: t,
    activations.RELU: lambda t, slope: F.relu(t),
    activations.RELU6: lambda t, slope: F.relu6(t),
    activations.LEAKY_RELU: lambda t, slope: F.leaky_relu(t, slope),
    activations.HARDSWISH: lambda t, slope: F.hardswish(t),
    activations.HARDSIGMOID: lambda t, slope: F.hardsigmoid(t),
}
ACT_NAMES = {code: name for name, code in activations.CODES.items()}


@pytest.mark.parametrize("act", list(TORCH_ACT), ids=lambda a: ACT_NAMES[a])
@pytest.mark.parametrize("case, layout, gpu_tiles", [
    pytest.param(CASES[0], "nchw", False, id="k3-nchw"),
    pytest.param(CASES[11], "channels_last", False, id="k3x5-m2-channels_last"),
    pytest.param(CASES[0], "channels_last", True, id="k3-channels_last-gpu_tiles"),
])
def test_epilogue_scale_shift_activation(dw, monkeypatch, case, layout, gpu_tiles, act):
    """act(conv * scale + shift), per output channel (conv includes the bias): a folded BN."""
    if gpu_tiles:
        use_gpu_tiles(dw, monkeypatch)
    x, weight, bias, s, p, d = make_case(case, layout)
    c_out = weight.shape[0]
    g = torch.Generator().manual_seed(5)
    scale = (torch.rand(c_out, generator=g) + 0.5).to(DEVICE)
    shift = (torch.randn(c_out, generator=g) * 2).to(DEVICE)  # both sides of relu6/hswish kinks
    slope = 0.2
    y = forward(x, weight, bias, s, p, d, scale, shift, act, slope)
    conv = reference_forward(x, weight, bias, s, p, d)
    expected = TORCH_ACT[act](conv * scale.double().cpu()[None, :, None, None]
                              + shift.double().cpu()[None, :, None, None], slope)
    same_memory_format(y, expected)
    assert_close(y, expected, x.dtype, weight[0].numel())


@pytest.mark.parametrize("which", ["scale", "shift"])
def test_epilogue_scale_or_shift_alone(which):
    x, weight, bias, s, p, d = make_case(CASES[4])
    c_out = weight.shape[0]
    v = torch.linspace(-1.5, 2.0, c_out, device=DEVICE)
    scale, shift = (v, None) if which == "scale" else (None, v)
    y = forward(x, weight, bias, s, p, d, scale, shift, activations.RELU6)
    conv = reference_forward(x, weight, bias, s, p, d)
    v64 = v.double().cpu()[None, :, None, None]
    expected = F.relu6(conv * v64 if which == "scale" else conv + v64)
    assert_close(y, expected, x.dtype, weight[0].numel())


def test_epilogue_float64_hardswish(dw):
    x, weight, bias, s, p, d = make_case(CASES[2], "channels_last", torch.float64)
    c_out = weight.shape[0]
    scale = torch.linspace(0.5, 1.5, c_out, dtype=torch.float64, device=DEVICE)
    shift = torch.linspace(-2, 2, c_out, dtype=torch.float64, device=DEVICE)
    y = forward(x, weight, bias, s, p, d, scale, shift, activations.HARDSWISH)
    conv = reference_forward(x, weight, bias, s, p, d)
    # hardswish itself runs on y's device: ATen divides by 6 on the CPU and multiplies by the
    # float32 1/6 on CUDA (also in float64), and our kernel follows the device it runs on.
    pre = conv * scale.cpu()[None, :, None, None] + shift.cpu()[None, :, None, None]
    expected = F.hardswish(pre.to(y.device))
    assert_close(y, expected, torch.float64, weight[0].numel())


# --- backward ----------------------------------------------------------------------------------


def grad_output_for(x, weight, bias, s, p, d, seed=1):
    """A random grad_output in the forward output's shape and memory format."""
    out = reference_forward(x, weight, bias, s, p, d)
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    if out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous():
        grad = grad.contiguous(memory_format=torch.channels_last)
    return grad.to(DEVICE, x.dtype)


@pytest.mark.parametrize("case, layout, gpu_tiles", tiled_params())
def test_backward_input_matches_autograd(dw, monkeypatch, case, layout, gpu_tiles):
    if gpu_tiles:
        use_gpu_tiles(dw, monkeypatch)
    x, weight, bias, s, p, d = make_case(case, layout)
    grad = grad_output_for(x, weight, bias, s, p, d)
    dx = torch.ops.cnnkernels.depthwise_conv2d_backward_input_triton(
        grad, weight, list(x.shape), s, p, d)
    dx_ref, _ = reference_grads(x, weight, s, p, d, grad)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    same_memory_format(dx, dx_ref)
    mult = weight.shape[0] // x.shape[1]
    assert_close(dx, dx_ref, x.dtype, mult * weight[0].numel())


@pytest.mark.parametrize("case, layout, gpu_tiles", tiled_params())
def test_backward_weight_matches_autograd(dw, monkeypatch, case, layout, gpu_tiles):
    if gpu_tiles:
        use_gpu_tiles(dw, monkeypatch)
    x, weight, bias, s, p, d = make_case(case, layout)
    grad = grad_output_for(x, weight, bias, s, p, d)
    dw = torch.ops.cnnkernels.depthwise_conv2d_backward_weight_triton(
        grad, x, list(weight.shape), s, p, d)
    _, dw_ref = reference_grads(x, weight, s, p, d, grad)
    assert dw.shape == weight.shape and dw.dtype == x.dtype and dw.is_contiguous()
    assert_close(dw, dw_ref, x.dtype, grad[:, 0].numel())


@pytest.mark.parametrize("case, layout", [
    pytest.param(CASES[3], "nchw", id=case_id(CASES[3]) + "-nchw"),
    pytest.param(CASES[7], "channels_last", id=case_id(CASES[7]) + "-channels_last"),
    pytest.param(CASES[11], "channels_last", id=case_id(CASES[11]) + "-channels_last"),
])
def test_backward_float64(case, layout):
    x, weight, bias, s, p, d = make_case(case, layout, torch.float64)
    grad = grad_output_for(x, weight, bias, s, p, d)
    dx = torch.ops.cnnkernels.depthwise_conv2d_backward_input_triton(
        grad, weight, list(x.shape), s, p, d)
    dw = torch.ops.cnnkernels.depthwise_conv2d_backward_weight_triton(
        grad, x, list(weight.shape), s, p, d)
    dx_ref, dw_ref = reference_grads(x, weight, s, p, d, grad)
    assert_close(dx, dx_ref, torch.float64, weight.numel())
    assert_close(dw, dw_ref, torch.float64, grad[:, 0].numel())


def test_backward_reads_non_dense_tensors_in_place():
    x, weight, bias, s, p, d = make_case(CASES[11], "strided")
    grad = grad_output_for(x, weight, bias, s, p, d)
    grad = torch.cat([grad, grad], dim=-1)[..., ::2]  # non-dense grad_output too
    dx = torch.ops.cnnkernels.depthwise_conv2d_backward_input_triton(
        grad, weight, list(x.shape), s, p, d)
    dw = torch.ops.cnnkernels.depthwise_conv2d_backward_weight_triton(
        grad, x, list(weight.shape), s, p, d)
    dx_ref, dw_ref = reference_grads(x, weight, s, p, d, grad)
    assert_close(dx, dx_ref, x.dtype, weight.numel())
    assert_close(dw, dw_ref, x.dtype, grad[:, 0].numel())


# --- edge cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_batch(layout):
    x, weight, bias, s, p, d = make_case(CASES[4], layout)
    x = x[:0]
    y = forward(x, weight, bias, s, p, d)
    expected = reference_forward(x, weight, bias, s, p, d)
    assert y.shape == expected.shape == (0, 6, 7, 9)
    grad = torch.empty(y.shape, device=DEVICE)
    dx = torch.ops.cnnkernels.depthwise_conv2d_backward_input_triton(
        grad, weight, list(x.shape), s, p, d)
    assert dx.shape == x.shape
    dw = torch.ops.cnnkernels.depthwise_conv2d_backward_weight_triton(
        grad, x, list(weight.shape), s, p, d)
    assert dw.shape == weight.shape
    assert torch.count_nonzero(dw) == 0


def test_plane_larger_than_one_tile():
    """Several tiles in both directions with this device's own tiling (32x32 in the interpreter,
    at most 64 columns on the GPU)."""
    x, weight, bias, s, p, d = make_case((1, 2, 37, 70, 1, (3, 3), (1, 1), (1, 1), (1, 1), True))
    y = forward(x, weight, bias, s, p, d)
    assert_close(y, reference_forward(x, weight, bias, s, p, d), x.dtype, 9)


def test_ops_schemas(dw):
    """Those of the C++ ops (csrc/depthwise_conv2d.cpp), defaults included, so callers can swap
    one for the other."""
    schemas = {
        "depthwise_conv2d_triton": "(Tensor x, Tensor weight, Tensor? bias, int[] stride, "
                                   "int[] padding, int[] dilation, Tensor? scale=None, "
                                   "Tensor? shift=None, int activation=0, "
                                   "float negative_slope=0.01) -> Tensor",
        "depthwise_conv2d_backward_input_triton": "(Tensor grad_output, Tensor weight, "
                                                  "int[] input_size, int[] stride, int[] padding, "
                                                  "int[] dilation) -> Tensor",
        "depthwise_conv2d_backward_weight_triton": "(Tensor grad_output, Tensor x, "
                                                   "int[] weight_size, int[] stride, "
                                                   "int[] padding, int[] dilation) -> Tensor",
    }
    for name, schema in schemas.items():
        op = getattr(torch.ops.cnnkernels, name).default
        # torch < 2.12 infers `SymInt` where later versions write `int` for the same annotation;
        # both bind the same Python arguments.
        assert str(op._schema).replace("SymInt", "int") == f"cnnkernels::{name}{schema}"


def test_forward_defaults_are_a_plain_conv():
    x, weight, bias, s, p, d = make_case(CASES[0])
    y = torch.ops.cnnkernels.depthwise_conv2d_triton(x, weight, bias, s, p, d)
    assert_close(y, reference_forward(x, weight, bias, s, p, d), x.dtype, weight[0].numel())
