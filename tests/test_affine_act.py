"""affine_act: act(x * scale[c] + shift[c]) against the torch composition, and against ATen's own
BatchNorm when scale/shift are BatchNorm's folded statistics."""
import pytest
import torch
import torch.nn.functional as F

import cnnkernels
from cnnkernels import activations
from cnnkernels.ops import affine_act
from cnnkernels.reference import affine_act as reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYOUTS = ["nchw", "channels_last", "strided", "3d", "channel-slice"]


def make(layout, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "3d":
        x = torch.randn(3, 7, 11, generator=g) * 4
    elif layout == "channel-slice":  # channels 2..8 of a channels_last tensor: rows 12 apart
        x = torch.randn(3, 12, 9, 11, generator=g) * 4
    else:
        x = torch.randn(3, 7, 9, 11, generator=g) * 4
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channel-slice":
        x = x.contiguous(memory_format=torch.channels_last)[:, 2:9]
    elif layout == "strided":
        x = x[..., ::2]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(7, generator=g) + 0.5).to(device=device, dtype=compute)
    shift = torch.randn(7, generator=g).to(device=device, dtype=compute)
    return x, scale, shift


def skip_without_extension():
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", list(activations.CODES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_matches_torch_composition(device, activation, layout, dtype):
    skip_without_extension()
    x, scale, shift = make(layout, dtype, device)
    y = affine_act(x, scale, shift, activation, 0.2)
    expected = reference.affine_act(x, scale, shift, activations.CODES[activation], 0.2)
    # ours is one fused multiply-add, the composition rounds the product first: 1 ulp of the
    # compute type, then the output's rounding
    tol = {torch.float32: 1e-6, torch.float64: 1e-14, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
    assert y.dtype == x.dtype and y.stride() == torch.empty_like(x).stride()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_equals_aten_batch_norm_relu_bit_for_bit_on_cpu(layout):
    """With BatchNorm's statistics folded as ATen folds them, the output is ATen's."""
    skip_without_extension()
    x, _, _ = make(layout, torch.float32, "cpu")
    weight, bias = torch.rand(7) + 0.5, torch.randn(7)
    y_bn, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, 1e-5)
    scale = invstd * weight
    shift = (bias.double() - mean.double() * scale.double()).float()
    torch.testing.assert_close(affine_act(x, scale, shift, "relu"), y_bn.relu(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_out_and_in_place(device):
    skip_without_extension()
    x, scale, shift = make("nchw", torch.float32, device)
    expected = affine_act(x, scale, shift, "hardswish")
    out = torch.empty_like(x)
    assert affine_act(x, scale, shift, "hardswish", out=out) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    strided_out = torch.empty(3, 7, 9, 22, device=device)[..., ::2]
    affine_act(x, scale, shift, "hardswish", out=strided_out)
    torch.testing.assert_close(strided_out, expected, rtol=0, atol=0)
    affine_act(x, scale, shift, "hardswish", out=x)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape,format", [
    ((4, 3, 1001, 1003), torch.contiguous_format), ((2, 2049, 31, 33), torch.contiguous_format),
    ((2, 2049, 31, 33), torch.channels_last)], ids=["large-planes", "small-planes", "channels-last"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_large_tensor_streaming_path(shape, format, with_residual):
    """Past 32 MiB of traffic the CPU kernel streams its stores (cnnkernels/cpu/map.h), in the
    per-plane loop and in the row loops of small planes and of channels_last pixels (rows of 31x33
    or 2049 values: the streamed chunks of 256 values straddle rows, and tasks start unaligned)."""
    skip_without_extension()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).contiguous(memory_format=format)
    c = shape[1]
    scale, shift = torch.rand(c, generator=g), torch.randn(c, generator=g)
    residual = torch.randn(*shape, generator=g).contiguous(memory_format=format) \
        if with_residual else None
    y = affine_act(x, scale, shift, "relu6", residual=residual)
    pre = torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))
    expected = F.relu6(pre if residual is None else pre + residual)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    assert y.is_contiguous(memory_format=format)


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    skip_without_extension()
    layout = ["nchw", "channels_last", "strided", "3d"][case]
    x, scale, shift = make(layout, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.cnnkernels.affine_act.default, (x, scale, shift, 1, 0.01))
    out = torch.empty_like(x)
    torch.library.opcheck(torch.ops.cnnkernels.affine_act_out.default, (out, x, scale, shift, 4, 0.01))


def test_torch_compile_fullgraph():
    skip_without_extension()
    x, scale, shift = make("nchw", torch.float32, "cpu")

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return torch.ops.cnnkernels.affine_act(x, scale, shift, 1, 0.01) * 2

    torch.testing.assert_close(f(x), 2 * affine_act(x, scale, shift, "relu"))


def test_bad_inputs():
    skip_without_extension()
    x, scale, shift = make("nchw", torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"'scale' to have shape \[7\]"):
        affine_act(x, scale[:3], shift)
    with pytest.raises(TypeError, match="'shift' to be torch.float32"):
        affine_act(x, scale, shift.double())
    with pytest.raises(TypeError, match="'x' to be a float32"):
        affine_act(x.int(), scale, shift)
    with pytest.raises(ValueError, match="channel dimension"):
        affine_act(x.flatten()[:7], scale, shift)
    with pytest.raises(ValueError, match="unknown activation"):
        affine_act(x, scale, shift, "gelu")
    with pytest.raises(ValueError, match="'out' must have x's shape"):
        affine_act(x, scale, shift, out=torch.empty(2, 7, 9, 11))
    with pytest.raises(RuntimeError, match="has no autograd"):
        affine_act(x.requires_grad_(), scale, shift)
    # the compiled op checks too
    with pytest.raises(RuntimeError, match="partially overlaps 'x'"):
        torch.ops.cnnkernels.affine_act_out(x.detach().view(-1)[1:694].view(1, 7, 9, 11),
                                            x.detach().view(-1)[:693].view(1, 7, 9, 11), scale, shift)
    with pytest.raises(RuntimeError, match="activation code must be in"):
        torch.ops.cnnkernels.affine_act(x.detach(), scale, shift, 9, 0.01)


@pytest.mark.triton
@pytest.mark.parametrize("activation", list(activations.CODES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_kernel_matches_cpu_kernel(activation, layout):
    """The Triton kernel (under TRITON_INTERPRET=1 without a GPU; float32: the interpreter has no
    bf16 arithmetic) against the C++ kernel: both round one fma, then the activation."""
    if not cnnkernels.backend.triton_available():
        pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1 (set by conftest.py)")
    skip_without_extension()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, scale, shift = make(layout, torch.float32, device)
    with cnnkernels.use_backend("triton"):
        y = affine_act(x, scale, shift, activation, 0.2)
    expected = affine_act(x.cpu(), scale.cpu(), shift.cpu(), activation, 0.2)
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-6, atol=1e-6)
    assert y.stride() == torch.empty_like(x).stride()


def test_channel_slices_with_a_residual_added_in_place():
    """x, the residual and out all channel slices of channels_last tensors, out the residual itself
    (the DenseNet block adds its deferred BatchNorm corrections this way); the channels around
    out's slice are untouched."""
    skip_without_extension()
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 40, 6, 5, generator=g).contiguous(memory_format=torch.channels_last)
    target = torch.randn(2, 50, 6, 5, generator=g).contiguous(memory_format=torch.channels_last)
    before = target.clone()
    x, residual = wide[:, 3:35], target[:, 10:42]
    scale, shift = torch.randn(32, generator=g), torch.randn(32, generator=g)
    expected = torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1)) + residual
    affine_act(x, scale, shift, "identity", residual=residual, out=residual)
    torch.testing.assert_close(residual, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(target[:, :10], before[:, :10]) and torch.equal(target[:, 42:], before[:, 42:])
