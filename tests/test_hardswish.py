"""h-swish / h-sigmoid: every implementation against PyTorch's own kernels, bit for bit."""
import pytest
import torch
import torch.nn.functional as F

import cnnkernels
from cnnkernels import ops

OPS = {
    "hardswish": (ops.hardswish, F.hardswish),
    "hardsigmoid": (ops.hardsigmoid, F.hardsigmoid),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SPECIAL = [float("-inf"), -1e30, -4.0, -3.0, -2.9999, -1.0, -0.0, 0.0, 1e-30, 1.0, 2.9999, 3.0,
           4.0, 6.0, 1e30, float("inf"), float("nan")]


def make_input(layout: str, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """Odd sizes in every layout an activation meets in a CNN; values cover both kinks."""
    g = torch.Generator().manual_seed(seed)
    if layout == "large":  # several threads' chunks and a vector tail
        base = torch.randn(3, 5, 67, 131, generator=g) * 4
    elif layout == "scalar":
        return torch.tensor(-2.5, dtype=dtype, device=device)
    elif layout == "empty":
        return torch.empty(0, 3, 4, 4, dtype=dtype, device=device)
    else:
        base = torch.randn(2, 3, 5, 7, generator=g) * 4
        base.view(-1)[: len(SPECIAL) - 1] = torch.tensor(SPECIAL[:-1])  # all but NaN: gradcheck
    x = base.to(device=device, dtype=dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # not dense: every other column
        return torch.cat([x, x], dim=-1)[..., ::2]
    if layout == "permuted":  # dense, but neither NCHW nor NHWC
        return x.permute(3, 1, 0, 2).contiguous().permute(2, 1, 3, 0)
    return x


LAYOUTS = ["contiguous", "channels_last", "strided", "permuted", "large", "scalar", "empty"]


def skip_unsupported(backend_name: str, device: str, dtype: torch.dtype) -> None:
    if backend_name == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 arithmetic")


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_matches_torch(impl, op, dtype, layout):
    ours, theirs = OPS[op]
    skip_unsupported(impl[0], impl[1], dtype)
    x = make_input(layout, dtype, impl[1])
    y = ours(x)
    expected = theirs(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.stride() == expected.stride(), "output must keep the input's memory format"
    assert_same(y, expected)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_matches_torch(impl, op, dtype, layout):
    ours, theirs = OPS[op]
    skip_unsupported(impl[0], impl[1], dtype)
    x = make_input(layout, dtype, impl[1]).requires_grad_()
    grad = make_input(layout, dtype, impl[1], seed=1)
    (dx,) = torch.autograd.grad(ours(x), x, grad)
    (dx_ref,) = torch.autograd.grad(theirs(x), x, grad)
    assert dx.stride() == dx_ref.stride()
    assert_same(dx, dx_ref)


@pytest.mark.parametrize("op", OPS)
def test_special_values_and_kinks(impl, op):
    """-3 and +3 are where PyTorch picks one side of the derivative; NaN must propagate."""
    ours, theirs = OPS[op]
    x = torch.tensor(SPECIAL, device=impl[1], requires_grad=True)
    y = ours(x)
    y_ref = theirs(x)
    assert_same(y, y_ref)
    g = torch.linspace(-2, 2, len(SPECIAL), device=impl[1])
    assert_same(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "large"])
def test_inplace_overwrites_and_returns_input(impl, op, layout):
    ours, theirs = OPS[op]
    x = make_input(layout, torch.float32, impl[1])
    expected = theirs(x.clone())
    version = x._version
    out = ours(x, inplace=True)
    assert out is x
    assert x._version > version, "autograd must see the mutation"
    assert_same(x, expected)


@pytest.mark.parametrize("op", OPS)
def test_inplace_on_non_leaf_has_torch_gradients(impl, op):
    ours, theirs = OPS[op]
    leaf = make_input("contiguous", torch.float64, impl[1]).requires_grad_()
    g = make_input("contiguous", torch.float64, impl[1], seed=2)
    (ours_grad,) = torch.autograd.grad(ours(leaf * 1.5, inplace=True), leaf, g)
    (ref_grad,) = torch.autograd.grad(theirs(leaf * 1.5, inplace=True), leaf, g)
    assert_same(ours_grad, ref_grad)


@pytest.mark.parametrize("op", OPS)
def test_inplace_on_leaf_requiring_grad_is_refused(impl, op):
    x = torch.randn(4, device=impl[1], requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad.*inplace=False"):
        OPS[op][0](x, inplace=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64],
                         ids=str)
def test_non_float_input_is_refused(impl, op, dtype):
    x = torch.zeros(3, dtype=dtype, device=impl[1])
    with pytest.raises(TypeError, match=rf"{op}: expected argument 'x' to be a float32.*{dtype}"):
        OPS[op][0](x)


@pytest.mark.parametrize("op", OPS)
def test_non_tensor_input_is_refused(op):
    with pytest.raises(TypeError, match="expected argument 'x' to be a torch.Tensor, got list"):
        OPS[op][0]([1.0, 2.0])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float64], ids=str)
def test_gradcheck_and_gradgradcheck(impl, op, dtype):
    x = torch.randn(2, 3, 4, 5, dtype=dtype, device=impl[1]) * 4
    x = (x + 0.01 * (x.abs() - 3).abs().lt(1e-3)).requires_grad_()  # keep clear of the kinks
    fn = OPS[op][0]
    assert torch.autograd.gradcheck(fn, (x,))
    if impl[0] == "torch" and op == "hardsigmoid":
        return  # PyTorch's hardsigmoid_backward has no derivative; ours has (it is zero)
    assert torch.autograd.gradgradcheck(fn, (x,))


def compiled_op_variants(device):
    x = torch.randn(2, 3, 5, 7, device=device) * 4
    g = torch.randn_like(x)
    cl = x.contiguous(memory_format=torch.channels_last)
    cases = []
    for name in OPS:
        cases += [
            (f"{name}", (x,)),
            (f"{name}", (cl,)),
            (f"{name}", (x[..., ::2],)),
            (f"{name}_", (x.clone(),)),
            (f"{name}_backward", (g, x)),
            (f"{name}_backward", (g, cl)),
        ]
    return cases


@pytest.mark.parametrize("case", range(12))
def test_opcheck(kernel_impl, case):
    """Schema, fake kernel, autograd registration and torch.compile (AOT) agree with the kernel."""
    backend_name, device = kernel_impl
    suffix = "_triton" if backend_name == "triton" else ""
    if suffix:
        cnnkernels.ops.hardswish._impl("triton")  # imports and registers the Triton ops
    name, args = compiled_op_variants(device)[case]
    if suffix:
        name = name.replace("_backward", "_backward_triton") if "backward" in name else (
            f"{name[:-1]}_triton_" if name.endswith("_") else f"{name}_triton")
    op = getattr(torch.ops.cnnkernels, name)
    args = tuple(a.clone().requires_grad_(a.is_floating_point() and not name.endswith("_"))
                 for a in args)
    if backend_name == "triton" and device == "cpu":
        # The interpreter runs the kernel even on FakeTensors (it reads their data pointers), so
        # the fake-tensor and AOT checks of the Triton ops can only run on a GPU.
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))
    else:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("op", OPS)
def test_empty_batch(impl, op):
    x = torch.empty(0, 3, 4, 4, device=impl[1], requires_grad=True)
    y = OPS[op][0](x)
    assert y.shape == x.shape
    (dx,) = torch.autograd.grad(y, x, torch.empty_like(y))
    assert dx.shape == x.shape


def test_backward_op_rejects_mismatched_arguments():
    g, x = torch.randn(2, 3), torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="'grad_output' and 'x' must have the same shape"):
        torch.ops.cnnkernels.hardswish_backward(g, x)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.cnnkernels.hardsigmoid_backward(torch.randn(2, 3).double(), torch.randn(2, 3))


def test_compiled_op_rejects_integer_input_with_clear_error():
    with pytest.raises(RuntimeError, match="expected argument 'x' to be a float32, float16, "
                                           "bfloat16 or float64 tensor, got Long"):
        torch.ops.cnnkernels.hardswish(torch.arange(4))


def test_inplace_on_expanded_view_is_refused():
    x = torch.randn(1, 4).expand(3, 4)
    with pytest.raises(RuntimeError, match="share memory"):
        torch.ops.cnnkernels.hardswish_(x)


# --- the nn.Module drop-ins --------------------------------------------------------------------

MODULES = {"hardswish": (cnnkernels.nn.HardSwish, torch.nn.Hardswish),
           "hardsigmoid": (cnnkernels.nn.HardSigmoid, torch.nn.Hardsigmoid)}


@pytest.mark.parametrize("op", MODULES)
@pytest.mark.parametrize("inplace", [False, True])
def test_module_is_a_drop_in(impl, op, inplace):
    ours_cls, torch_cls = MODULES[op]
    theirs = torch_cls(inplace=inplace)
    ours = ours_cls.from_torch(theirs)
    assert ours.inplace == inplace
    assert repr(ours) == f"{ours_cls.__name__}({'inplace=True' if inplace else ''})"
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert isinstance(ours.to_torch(), torch_cls)
    x = make_input("channels_last", torch.float32, impl[1])
    assert_same(ours(x.clone()), theirs(x.clone()))
    assert ours(x.clone()).is_contiguous(memory_format=torch.channels_last)


def test_module_from_torch_rejects_other_modules():
    with pytest.raises(TypeError, match="HardSwish.from_torch expects Hardswish, got ReLU"):
        cnnkernels.nn.HardSwish.from_torch(torch.nn.ReLU())


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    """A small MobileNetV3-style block compiles without graph breaks and matches eager."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), cnnkernels.nn.HardSwish(),
        torch.nn.Conv2d(8, 8, 1), cnnkernels.nn.HardSigmoid())
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    out, out_ref = compiled(x), model(x)
    torch.testing.assert_close(out, out_ref)
    grads = torch.autograd.grad(out.sum(), [x, *model.parameters()])
    grads_ref = torch.autograd.grad(out_ref.sum(), [x, *model.parameters()])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


def test_torch_compile_inplace_without_grad():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(x):
        return ops.hardswish(x * 2, inplace=True)

    x = torch.randn(4, 5)
    assert_same(f(x), F.hardswish(x * 2))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_streaming_stores_past_the_cache_threshold(op, dtype):
    """Outputs beyond 32 MiB of traffic are written with streaming stores (csrc/include/cnnkernels/
    cpu/map.h). An odd length split between threads starts the second thread's run off a 32-byte
    boundary and ends it mid-chunk: the scalar head and tail around the streamed chunks."""
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ CPU extension is not built")
    ours, theirs = OPS[op]
    n = 9_000_011  # 36 MB in float32: past the threshold for forward and backward alike
    x = (torch.randn(n + 1, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
    x = x[1:].requires_grad_()  # storage offset of one element: the output is allocated aligned
    grad = torch.randn(n, generator=torch.Generator().manual_seed(4)).to(dtype)
    with cnnkernels.use_backend("cpu"):
        y = ours(x)
        (dx,) = torch.autograd.grad(y, x, grad)
    x_ref = x.detach().requires_grad_()
    y_ref = theirs(x_ref)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, grad)
    assert_same(y, y_ref)
    assert_same(dx, dx_ref)


@pytest.mark.parametrize("name", ["hardswish", "hardsigmoid"])
def test_eager_calls_record_the_cpp_autograd_node(name):
    """The compiled ops' autograd is C++ (csrc/autograd/hardswish.cpp): no Python frame per call,
    forward or backward, and the backward's node is C++ too (double backward)."""
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = getattr(cnnkernels.ops, name)(x)
    assert "ActivationFunction" in y.grad_fn.name()
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert "ActivationBackward" in g.grad_fn.name()
