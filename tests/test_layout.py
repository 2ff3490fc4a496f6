"""contiguous_from_channels_last: the same tensor as x.contiguous(), for channels_last tensors and
channel slices of them (the CPU kernel's tiles and their tails), and for everything it hands to
ATen (other dtypes, layouts); opcheck; errors."""
import platform

import pytest
import torch

import cnnkernels
from cnnkernels import ops


def needs_ext():
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")


SHAPES = [(2, 37, 5, 7), (3, 16, 4, 4), (1, 64, 56, 56), (2, 5, 1, 1), (1, 1, 3, 17), (4, 33, 7, 9)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "channel-slice"])
def test_equals_contiguous(shape, sliced):
    n, c, h, w = shape
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, c + (11 if sliced else 0), h, w, generator=g).contiguous(
        memory_format=torch.channels_last)
    x = base[:, 3:3 + c] if sliced else base
    y = ops.contiguous_from_channels_last(x)
    assert y.is_contiguous()
    assert torch.equal(y, x.contiguous())
    if not x.is_contiguous():  # a copy, never a view of the input
        assert y.data_ptr() != base.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16, torch.int32],
                         ids=str)
def test_other_dtypes_and_layouts_are_copied_too(dtype):
    x = (torch.randn(2, 20, 3, 5) * 10).to(dtype).contiguous(memory_format=torch.channels_last)
    assert torch.equal(ops.contiguous_from_channels_last(x), x.contiguous())
    odd = torch.randn(2, 3, 5, 20).permute(0, 3, 1, 2)  # W is the innermost dim: not pixel rows
    assert torch.equal(ops.contiguous_from_channels_last(odd), odd.contiguous())
    nchw = torch.randn(2, 3, 4, 5)
    assert ops.contiguous_from_channels_last(nchw) is nchw  # already contiguous: itself


def test_empty_and_the_op_directly():
    needs_ext()
    op = torch.ops.cnnkernels.contiguous_from_channels_last
    empty = torch.randn(0, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    assert op(empty).shape == (0, 8, 3, 3)
    x = torch.randn(3, 40, 6, 6).contiguous(memory_format=torch.channels_last)
    assert torch.equal(op(x), x.contiguous())
    with pytest.raises(RuntimeError, match="expected argument 'x' to be a 4-D"):
        op(torch.randn(3, 4, 5))


def test_opcheck():
    needs_ext()
    x = torch.randn(2, 19, 5, 6).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.cnnkernels.contiguous_from_channels_last.default, (x,))
    torch.library.opcheck(torch.ops.cnnkernels.contiguous_from_channels_last.default,
                          (x.requires_grad_(),))


# --- copy_to_channels_last_ / to_channels_last: NCHW into pixel rows ------------------------------

@pytest.mark.parametrize("shape", SHAPES + [(2, 48, 210, 210)], ids=str)
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "channel-slice"])
def test_copy_to_channels_last_writes_only_its_channels(shape, sliced):
    """Values equal x's; in a channel slice of a wider channels_last tensor the other channels are
    left untouched. 2x48x210x210 (34 MB moved) is past the size where whole rows of 16 channels
    are written with streaming stores."""
    from cnnkernels.ops.layout import copy_to_channels_last_

    n, c, h, w = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, h, w, generator=g)
    extra = 16 if sliced else 0  # a 16-channel offset keeps whole aligned rows: the streamed path
    base = torch.full((n, c + 2 * extra, h, w), 7.0).contiguous(memory_format=torch.channels_last)
    out = base[:, extra:extra + c]
    assert copy_to_channels_last_(out, x) is out
    assert torch.equal(out, x)
    assert bool((base[:, :extra] == 7).all()) and bool((base[:, extra + c:] == 7).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_to_channels_last_and_its_gradient(dtype):
    """to_channels_last(x) equals x in channels_last; its gradient comes back NCHW-contiguous."""
    from cnnkernels.ops.layout import to_channels_last

    x = torch.randn(2, 21, 6, 5).to(dtype).requires_grad_()
    y = to_channels_last(x)
    assert torch.equal(y, x) and y.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(y.shape).to(dtype).contiguous(memory_format=torch.channels_last)
    y.backward(grad)
    assert torch.equal(x.grad, grad) and x.grad.is_contiguous()


def test_copy_to_channels_last_refuses_mismatches():
    needs_ext()
    op = torch.ops.cnnkernels.copy_to_channels_last_
    out = torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="must have the same shape"):
        op(out, torch.randn(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="same dtype and device"):
        op(out, torch.randn(2, 3, 4, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="expected 4-D"):
        op(out, torch.randn(2, 3, 20))
    overlapping = torch.empty(60).as_strided((2, 3, 4, 5), (0, 1, 15, 3))  # both images at once
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        op(overlapping, torch.randn(2, 3, 4, 5))
    torch.library.opcheck(op.default, (out, torch.randn(2, 3, 4, 5)))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
def test_every_cpu_instruction_set_copies_exactly(tmp_path):
    """The transposes are compiled for AVX-512 and AVX2 (ATen's copy below): in processes capped
    by ATEN_CPU_CAPABILITY every copy must move the same bits."""
    needs_ext()
    from cpu_isa_worker import run_capped
    best, avx2, portable = (run_capped("layout", cap, tmp_path) for cap in (None, "avx2", "default"))
    assert portable["cpu_isa"] == "default"
    assert avx2["cpu_isa"] == ("avx2" if best["cpu_isa"] != "default" else "default")
    for shape, want in best["results"].items():
        for other in (avx2, portable):
            got = other["results"][shape]
            assert len(got) == len(want)
            for a, b in zip(want, got):
                assert torch.equal(a, b), f"{shape}: {other['cpu_isa']} differs from {best['cpu_isa']}"
