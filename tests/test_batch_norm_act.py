"""BatchNormAct2d / batch_norm_act against nn.BatchNorm2d followed by the activation."""
import importlib

import pytest
import torch
from torch import nn

import cnnkernels
from cnnkernels import activations
from cnnkernels.nn import BatchNormAct2d
from cnnkernels.nn.batchnorm import _TORCH_ACTIVATIONS

ACTS = {name: cls for cls, name in _TORCH_ACTIVATIONS.items()}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def torch_pair(name, **bn_kwargs):
    act = ACTS[name](0.2) if name == "leaky_relu" else ACTS[name]()
    return nn.Sequential(nn.BatchNorm2d(6, **bn_kwargs), act)


def make_pair(name, dtype=torch.float32, **bn_kwargs):
    torch.manual_seed(0)
    reference = torch_pair(name, **bn_kwargs).to(dtype)
    if reference[0].affine:
        with torch.no_grad():
            reference[0].weight.uniform_(0.5, 1.5)
            reference[0].bias.uniform_(-1, 1)
    ours = BatchNormAct2d.from_modules(reference[0], reference[1])
    return reference, ours


def run_steps(module, xs, train=True):
    module.train(train)
    outs, grads = [], []
    for step, x0 in enumerate(xs):
        x = x0.clone().requires_grad_()
        y = module(x)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(step)).to(y.dtype)
        y.backward(g)
        outs.append(y.detach())
        grads.append(x.grad)
    params = [p.grad.clone() for p in module.parameters()]
    buffers = [b.clone() for b in module.buffers()]
    return outs, grads, params, buffers


def inputs(layout, dtype, steps=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, 5, 7, generator=g) * 3 + 1).to(dtype).contiguous(
        memory_format=LAYOUTS[layout]) for _ in range(steps)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_training_and_eval_match_torch(name, layout, dtype):
    reference, ours = make_pair(name, dtype)
    xs = inputs(layout, dtype)
    expected, actual = run_steps(reference, xs), run_steps(ours, xs)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for e, a in zip(expected[0] + expected[1] + expected[2] + expected[3],
                    actual[0] + actual[1] + actual[2] + actual[3]):
        torch.testing.assert_close(a, e, **tol)
    assert actual[0][0].is_contiguous(memory_format=LAYOUTS[layout])
    # then evaluation with the running statistics, with and without autograd
    expected_eval, actual_eval = run_steps(reference, xs[:1], train=False), run_steps(ours, xs[:1], train=False)
    for e, a in zip(expected_eval[0] + expected_eval[1] + expected_eval[2],
                    actual_eval[0] + actual_eval[1] + actual_eval[2]):
        torch.testing.assert_close(a, e, **tol)
    with torch.no_grad():
        torch.testing.assert_close(ours(xs[1]), reference(xs[1]), **tol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_eval_op_equals_aten_bit_for_bit_on_cpu(layout, dtype, affine):
    """ops.batch_norm_act in evaluation folds the running statistics as ATen's CPU kernel does
    (beta rounded once), so its output is nn.BatchNorm2d's + ReLU's to the last bit."""
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(3)
    c = 37
    x = (torch.randn(3, c, 5, 7, generator=g) * 3).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    stats = [torch.randn(c, generator=g).to(dtype), (torch.rand(c, generator=g) * 3 + 1e-3).to(dtype)]
    params = [torch.randn(c, generator=g).to(dtype) for _ in range(2)] if affine else [None, None]
    expected = torch.relu(torch.nn.functional.batch_norm(x, *stats, *params, False, 0.1, 1e-5))
    actual = cnnkernels.ops.batch_norm_act(x, *params, *stats, False, 0.1, 1e-5, "relu")
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(affine=False),
                                    dict(track_running_stats=False)])
def test_batchnorm_options(kwargs):
    reference, ours = make_pair("hardswish", **kwargs)
    xs = inputs("nchw", torch.float32)
    expected, actual = run_steps(reference, xs), run_steps(ours, xs)
    for e, a in zip(sum(expected, []), sum(actual, [])):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    reference.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(xs[0]), reference(xs[0]), rtol=1e-5, atol=1e-5)


def test_state_dict_is_batchnorm2d_s():
    bn = nn.BatchNorm2d(6)
    ours = BatchNormAct2d(6)
    assert list(ours.state_dict()) == list(bn.state_dict())
    ours.load_state_dict(bn.state_dict())
    bn.load_state_dict(ours.state_dict())
    assert not isinstance(ours, nn.modules.batchnorm._BatchNorm)


def test_autograd_keeps_one_input_sized_tensor():
    """Counted with saved-tensor hooks: PyTorch's pair keeps x and the activation's tensor."""
    x = torch.randn(8, 6, 20, 20, requires_grad=True)

    def saved_large_tensors(module):
        storages = set()

        def pack(t):
            if t.numel() >= x.numel():
                storages.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return len(storages)

    reference, ours = make_pair("relu")
    reference_hs, ours_hs = make_pair("hardswish")
    assert saved_large_tensors(reference) == 2 and saved_large_tensors(reference_hs) == 2
    assert saved_large_tensors(ours) == 1 and saved_large_tensors(ours_hs) == 1


def test_gradcheck_float64():
    torch.manual_seed(0)
    ours = BatchNormAct2d(3, activation="hardswish").double()
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ours(x), (x,))
    ours.eval()
    assert torch.autograd.gradcheck(lambda x: ours(x), (x,))


def test_errors():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchNormAct2d(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="unknown activation"):
        BatchNormAct2d(3, activation="gelu")
    with pytest.raises(TypeError, match="unsupported activation GELU"):
        BatchNormAct2d.from_modules(nn.BatchNorm2d(3), nn.GELU())
    with pytest.raises(ValueError, match="4-D"):
        BatchNormAct2d(3)(torch.randn(2, 3, 4))
    assert activations.CODES  # the names BatchNormAct2d accepts


# --- the kernels (statistics, backward reductions, backward elementwise) on every backend ---------

import importlib  # noqa: E402

bn_ops = importlib.import_module("cnnkernels.ops.batch_norm_act")  # the module, not the function
from cnnkernels.reference import batch_norm_act as bn_reference  # noqa: E402


def kernel_inputs(layout, device, mean=1.0, residual=True, shape=(4, 6, 5, 7)):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g) * 3 + mean
    grad, r = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    fmt = LAYOUTS[layout] if x.dim() == 4 else torch.contiguous_format
    x, grad, r = (t.to(device).contiguous(memory_format=fmt) for t in (x, grad, r))
    c = shape[1]
    per_channel = [(torch.rand(c, generator=g) + 0.5), torch.randn(c, generator=g),
                   torch.randn(c, generator=g) + mean]
    return x, grad, r if residual else None, [t.to(device) for t in per_channel]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (3, 70, 2, 3), (9, 6)], ids=str)
def test_statistics_kernel(impl, layout, shape):
    name, device = impl
    x, *_ = kernel_inputs(layout, device, mean=50.0, shape=shape)
    stats = bn_ops._kernels(x)[0]
    mean, var = stats(x)
    var64, mean64 = torch.var_mean(x.double(), [d for d in range(x.dim()) if d != 1], correction=0)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-6)


def test_statistics_stable_when_mean_dwarfs_std(impl):
    """|mean| / std = 1e6: E[x²] − E[x]² in float32 would return noise (or a negative variance)."""
    name, device = impl
    g = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(16, 3, 32, 32, generator=g, dtype=torch.float64)).float().to(device)
    mean, var = bn_ops._kernels(x)[0](x)
    var64, mean64 = torch.var_mean(x.double(), [0, 2, 3], correction=0)
    torch.testing.assert_close(var.double(), var64, rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-7, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("name", list(ACTS))
def test_backward_kernels(impl, layout, residual, name):
    backend_name, device = impl
    code = activations.CODES[name]
    x, grad, r, (scale, shift, mean) = kernel_inputs(layout, device, residual=residual)
    k = bn_ops._kernels(x)
    reduce, elemt = k.backward_reduce, k.backward_elemt
    expected = bn_reference.backward_reduce(grad, x, scale, shift, mean, r, code, 0.2)
    for a, e in zip(reduce(grad, x, scale, shift, mean, r, code, 0.2), expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)
    coefs = (scale * 0.7, shift * 0.1, mean * 0.01)
    expected = bn_reference.backward_elemt(grad, x, scale, shift, mean, *coefs, r, code, 0.2, True)
    actual = elemt(grad, x, scale, shift, mean, *coefs, r, code, 0.2, True)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert actual[0].is_contiguous(memory_format=LAYOUTS[layout])
    assert actual[1].numel() == (x.numel() if residual else 0)


def test_opcheck():
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    ops = torch.ops.cnnkernels
    for layout in LAYOUTS:
        x, grad, r, (scale, shift, mean) = kernel_inputs(layout, "cpu")
        torch.library.opcheck(ops.batch_norm_act_stats.default, (x,))
        for residual in (None, r):
            torch.library.opcheck(ops.batch_norm_act_backward_reduce.default,
                                  (grad, x, scale, shift, mean, residual, 4, 0.01))
            torch.library.opcheck(ops.batch_norm_act_backward_elemt.default,
                                  (grad, x, scale, shift, mean, scale, shift, mean, residual, 1,
                                   0.01, residual is not None))
        torch.library.opcheck(ops.affine_act.default, (x, scale, shift, 1, 0.01, r))
    running = (torch.zeros(6), torch.ones(6))
    for weight, bias, run in ((scale, shift, running), (None, None, (None, None))):
        torch.library.opcheck(ops.batch_norm_act_fold.default,
                              (mean, scale, weight, bias, *run, 0.1, 1e-5, 140))
    torch.library.opcheck(ops.batch_norm_act_backward_coefs.default, (mean, shift, scale, scale, 9))


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (1, 40, 3, 1), (2, 300, 4, 4)], ids=str)
def test_backward_kernels_read_a_channel_slice_of_channels_last(impl, residual, shape):
    """x = wide[:, :C] of a channels_last tensor (a DenseNet block's concatenation): the same
    sums and dx as from a dense copy of x (the CPU kernels read it in place: to the bit)."""
    backend_name, device = impl
    n, c, h, w = shape
    x_dense, grad, r, (scale, shift, mean) = kernel_inputs("channels_last", device,
                                                           residual=residual, shape=shape)
    wide = torch.randn(n, c + 9, h, w, device=device).contiguous(memory_format=torch.channels_last)
    wide[:, :c] = x_dense
    x = wide[:, :c]
    assert bn_ops._strided_rows(x) and not x.is_contiguous(memory_format=torch.channels_last)
    k = bn_ops._kernels(x)
    exact = dict(rtol=0, atol=0) if backend_name == "cpu" else {}
    for a, e in zip(k.backward_reduce(grad, x, scale, shift, mean, r, 1, 0.01),
                    k.backward_reduce(grad, x_dense, scale, shift, mean, r, 1, 0.01)):
        torch.testing.assert_close(a, e, **exact)
    coefs = (scale * 0.7, shift * 0.1, mean * 0.01)
    actual = k.backward_elemt(grad, x, scale, shift, mean, *coefs, r, 1, 0.01, residual)
    expected = k.backward_elemt(grad, x_dense, scale, shift, mean, *coefs, r, 1, 0.01, residual)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **exact)
    if backend_name == "cpu":  # in place, dx dense channels_last
        assert actual[0].is_contiguous(memory_format=torch.channels_last)
        ops = torch.ops.cnnkernels
        torch.library.opcheck(ops.batch_norm_act_backward_reduce.default,
                              (grad, x, scale, shift, mean, r, 1, 0.01))
        torch.library.opcheck(ops.batch_norm_act_backward_elemt.default,
                              (grad, x, scale, shift, mean, *coefs, r, 1, 0.01, residual))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["identity", "relu", "hardswish"])
@pytest.mark.parametrize("slices", ["dense", "both-slices"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (2, 2100, 4, 4), (1, 17, 1, 3)], ids=str)
def test_backward_reduce_add_sums_and_adds_in_one_pass(dtype, activation, slices, shape):
    """batch_norm_act_backward_reduce_add_: the sums of backward_reduce, and out += coef_dz·dz
    (backward_elemt's dx with the other coefficients 0), for channels_last tensors and slices of
    wider ones, the channels around out's slice untouched; 2100 channels: more than the kernel's
    local partial sums hold at once."""
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    n, c, h, w = shape
    g = torch.Generator().manual_seed(2)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    wide_x = (torch.randn(n, c + 5, h, w, generator=g) * 2).to(dtype).contiguous(
        memory_format=torch.channels_last)
    x = wide_x[:, 2:2 + c] if slices != "dense" else wide_x[:, 2:2 + c].contiguous(
        memory_format=torch.channels_last)
    grad = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    scale, shift, mean = (torch.randn(c, generator=g).to(compute) for _ in range(3))
    coef_dz = torch.rand(c, generator=g).to(compute) + 0.5
    target = torch.randn(n, c + 3, h, w, generator=g).to(dtype).contiguous(
        memory_format=torch.channels_last)
    out = target[:, 1:1 + c] if slices != "dense" else target[:, :c].contiguous(
        memory_format=torch.channels_last)
    before, whole_before = out.clone(), target.clone()
    code = activations.CODES[activation]
    ops = torch.ops.cnnkernels
    sums = ops.batch_norm_act_backward_reduce_add_(out, grad, x, scale, shift, mean, coef_dz, code,
                                                   0.01)
    expected_sums = ops.batch_norm_act_backward_reduce(grad, x, scale, shift, mean, None, code, 0.01)
    zeros = torch.zeros_like(scale)
    dx, _ = ops.batch_norm_act_backward_elemt(
        grad, x.contiguous(memory_format=torch.channels_last), scale, shift, mean, coef_dz, zeros,
        zeros, None, code, 0.01, False)
    expected = (before.to(compute) + dx.to(compute)).to(dtype)
    sum_tol = dict(rtol=1e-5, atol=1e-4) if dtype != torch.float64 else dict(rtol=1e-12, atol=1e-10)
    for actual_sum, expected_sum in zip(sums, expected_sums):
        torch.testing.assert_close(actual_sum, expected_sum, **sum_tol)
    # dx rounded to bfloat16 before the add here, not in the kernel
    out_tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else \
        dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, expected, **out_tol)
    if slices != "dense":
        torch.testing.assert_close(target[:, :1], whole_before[:, :1], rtol=0, atol=0)
        torch.testing.assert_close(target[:, 1 + c:], whole_before[:, 1 + c:], rtol=0, atol=0)
        torch.library.opcheck(ops.batch_norm_act_backward_reduce_add_.default,
                              (out, grad, x, scale, shift, mean, coef_dz, code, 0.01))


def test_backward_reduce_add_into_a_one_pixel_out():
    """An out of N x C x 1 x 1 is channels_last whatever its strides (NCHW-contiguous here, so
    stride(3) is 1): its rows are C apart, not stride(3)."""
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, 1, 1, generator=g).contiguous(memory_format=torch.channels_last)[:, :4]
    grad = torch.randn(4, 4, 1, 1, generator=g)
    ones, zeros = torch.ones(4), torch.zeros(4)
    ops = torch.ops.cnnkernels
    out = torch.zeros(4, 4, 1, 1)
    ops.batch_norm_act_backward_reduce_add_(out, grad, x, ones, zeros, zeros, ones, 0, 0.01)
    torch.testing.assert_close(out, grad, rtol=0, atol=0)


def test_ops_adding_into_out_refuse_what_they_cannot_add_into():
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    x, grad, _, (scale, shift, mean) = kernel_inputs("channels_last", "cpu", residual=False)
    coefs = (scale,)
    op = torch.ops.cnnkernels.batch_norm_act_backward_reduce_add_

    def call(out, grad=grad, x=x, coefs=coefs):
        return op(out, grad, x, scale, shift, mean, *coefs, 1, 0.01)

    with pytest.raises(RuntimeError, match="'out' to have x's sizes"):
        call(torch.zeros(4, 6, 5, 8).contiguous(memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match="'out' to be a channels_last"):
        call(torch.zeros(4, 6, 5, 7))
    with pytest.raises(RuntimeError, match="'x' to be a channels_last"):
        call(torch.zeros(4, 6, 5, 7).contiguous(memory_format=torch.channels_last),
             grad=grad.contiguous(), x=x.contiguous())
    with pytest.raises(RuntimeError, match="must not share memory"):
        call(x)
    with pytest.raises(RuntimeError, match="coef_dz"):
        call(torch.zeros_like(x), coefs=(scale[:3],) + coefs[1:])


# --- the per-channel kernels: fold (forward) and the backward's coefficients --------------------

def channel_inputs(device, channels=37, dtype=torch.float32, running_dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    mean, var = torch.randn(channels, generator=g) * 4, torch.rand(channels, generator=g) * 3
    weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    running = (torch.randn(channels, generator=g), torch.rand(channels, generator=g) + 0.5)
    return ([t.to(device, dtype) for t in (mean, var, weight, bias)],
            [t.to(device, running_dtype) for t in running])


@pytest.mark.parametrize("count", [0, 1, 2, 140])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_fold_kernel(kernel_impl, affine, count):
    _, device = kernel_impl
    (mean, var, weight, bias), running = channel_inputs(device)
    if not affine:
        weight = bias = None
    x = torch.empty(1, 37, device=device)
    expected_running = [t.clone() for t in running]
    expected = bn_reference.fold(mean, var, weight, bias, *expected_running, 0.1, 1e-5, count)
    actual = bn_ops._kernels(x).fold(mean, var, weight, bias, *running, 0.1, 1e-5, count)
    for a, e in zip(list(actual) + running, list(expected) + expected_running):
        torch.testing.assert_close(a, e, rtol=2e-6, atol=1e-6)
    if count == 0:  # an empty batch: scale 0, shift = bias, running statistics untouched
        assert torch.equal(actual[0], torch.zeros_like(mean))
        assert torch.equal(running[0], channel_inputs(device)[1][0])


@pytest.mark.parametrize("running_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_fold_kernel_running_buffers_of_another_dtype(kernel_impl, running_dtype):
    """Buffers of a module cast with .half() (or .double()) while the statistics are float32."""
    name, device = kernel_impl
    if name == "triton" and device == "cpu" and running_dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 arithmetic")
    (mean, var, weight, bias), running = channel_inputs(device, running_dtype=running_dtype)
    expected_running = [t.clone() for t in running]
    bn_reference.fold(mean, var, weight, bias, *expected_running, 0.25, 1e-5, 50)
    bn_ops._kernels(mean[None]).fold(mean, var, weight, bias, *running, 0.25, 1e-5, 50)
    for a, e in zip(running, expected_running):
        assert a.dtype == running_dtype
        torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("count", [0, 1, 1000])
def test_backward_coefs_kernel(kernel_impl, count):
    _, device = kernel_impl
    (sum_dz, sum_dz_xmu, scale, invstd), _ = channel_inputs(device)
    expected = bn_reference.backward_coefs(sum_dz, sum_dz_xmu, scale, invstd, count)
    actual = bn_ops._kernels(sum_dz[None]).backward_coefs(sum_dz, sum_dz_xmu, scale, invstd, count)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=2e-6, atol=1e-7)


def test_channel_kernels_float64_are_exact():
    """C++ (and CUDA) compute in the statistics' type: float64 results equal the float64
    reference (up to rsqrt vs 1/sqrt, one rounding)."""
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    (mean, var, weight, bias), running = channel_inputs("cpu", dtype=torch.float64,
                                                        running_dtype=torch.float64)
    expected_running = [t.clone() for t in running]
    expected = bn_reference.fold(mean, var, weight, bias, *expected_running, 0.1, 1e-5, 7)
    actual = torch.ops.cnnkernels.batch_norm_act_fold(mean, var, weight, bias, *running, 0.1,
                                                      1e-5, 7)
    for a, e in zip(list(actual) + running, list(expected) + expected_running):
        torch.testing.assert_close(a, e, rtol=1e-15, atol=1e-15)
    coefs = torch.ops.cnnkernels.batch_norm_act_backward_coefs(mean, var, weight, bias, 7)
    for a, e in zip(coefs, bn_reference.backward_coefs(mean, var, weight, bias, 7)):
        torch.testing.assert_close(a, e, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("bad, message", [
    (dict(mean=torch.zeros(4, dtype=torch.float16)), "'mean' to be float32 or float64"),
    (dict(var=torch.zeros(5)), "'var' to have shape \\[4\\]"),
    (dict(var=torch.zeros(4, dtype=torch.float64)), "'var' to be Float"),
    (dict(weight=torch.zeros(3)), "'weight' to have shape \\[4\\]"),
    (dict(running_var=None), "pass both 'running_mean' and 'running_var'"),
    (dict(running_mean=torch.zeros(8)[::2]), "must be contiguous"),
    (dict(running_mean=torch.zeros(1).expand(4)), "must be contiguous"),
    (dict(momentum=1.5), "'momentum' to be in \\[0, 1\\]"),
    (dict(count=-1), "'count'"),
    (dict(eps=-1.0), "'eps' to be >= 0"),
])
def test_fold_rejects_bad_arguments(bad, message):
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    args = dict(mean=torch.zeros(4), var=torch.ones(4), weight=None, bias=None,
                running_mean=torch.zeros(4), running_var=torch.ones(4), momentum=0.1, eps=1e-5,
                count=3)
    args.update(bad)
    before = args["running_mean"].clone() if args["running_mean"] is not None else None
    with pytest.raises(RuntimeError, match=message):
        torch.ops.cnnkernels.batch_norm_act_fold(*args.values())
    if before is not None:
        assert torch.equal(args["running_mean"], before)  # nothing written before the check
    with pytest.raises(RuntimeError, match="'invstd' to have shape"):
        torch.ops.cnnkernels.batch_norm_act_backward_coefs(torch.zeros(4), torch.zeros(4),
                                                           torch.zeros(4), torch.zeros(3), 2)


def test_training_step_launches_few_ops(dispatched_ops):
    """Per training step (forward + backward), the op calls that reach the dispatcher: on a GPU
    each is at least one launch. Stats, fold, affine forward; reduce, coefs, elemt backward."""
    module = BatchNormAct2d(6, activation="relu")
    x = torch.randn(4, 6, 5, 7, requires_grad=True)
    module(x).sum().backward()  # warm-up (lazy registration)
    with dispatched_ops() as counted:
        module(x).backward(torch.ones(4, 6, 5, 7))
    assert len(counted.ours()) == 6, counted.names
    assert len(counted.names) <= 12, counted.names  # the rest: views, num_batches_tracked, grad sums


def test_batch_stats_replace_the_statistics_pass(dispatched_ops):
    """Given x's (mean, biased var), training uses them (no statistics kernel runs) and the result,
    gradients and running statistics are those of computing them; bad pairs are refused."""
    from cnnkernels.ops import batch_norm_act

    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, 5, 7, generator=g) * 2 + 3
    weight, bias = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    results = []
    for stats in (None, (mean, var)):
        xa = x.clone().requires_grad_()
        running = [torch.zeros(6), torch.ones(6)]
        with dispatched_ops() as called:
            y = batch_norm_act(xa, weight, bias, *running, True, 0.1, 1e-5, "relu",
                               batch_stats=stats)
        y.backward(torch.ones_like(y))
        assert any("batch_norm_act_stats" in op for op in called.ours()) == (stats is None), \
            called.names
        results.append((y.detach(), xa.grad, *running))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for bad in ((mean,), (mean, var[:5]), (mean.double(), var)):
        with pytest.raises(ValueError, match="batch_stats"):
            batch_norm_act(x, weight, bias, None, None, True, batch_stats=bad)


# --- the module with a residual, reduced precision, options --------------------------------------

def residual_reference(name, x, r, bn, act_kwargs=None):
    act = ACTS[name](0.2) if name == "leaky_relu" else ACTS[name]()
    return act(bn(x) + r)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(ACTS))
def test_residual_matches_torch(impl, layout, name):
    backend_name, device = impl
    reference, ours = make_pair(name)
    reference, ours = reference.to(device), ours.to(device)
    for train in (True, True, False):
        reference.train(train), ours.train(train)
        x, grad, r, _ = kernel_inputs(layout, device)
        x1, r1 = x.clone().requires_grad_(), r.clone().requires_grad_()
        x2, r2 = x.clone().requires_grad_(), r.clone().requires_grad_()
        expected = residual_reference(name, x1, r1, reference[0])
        actual = ours(x2, r2)
        expected.backward(grad), actual.backward(grad)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        for a, e in ((x2.grad, x1.grad), (r2.grad, r1.grad), (ours.weight.grad, reference[0].weight.grad),
                     (ours.bias.grad, reference[0].bias.grad), (ours.running_mean, reference[0].running_mean),
                     (ours.running_var, reference[0].running_var)):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)
        assert actual.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reduced_precision_against_float32(dtype, layout):
    """Half / bfloat16 inputs with float32 parameters (autocast's mix): float statistics, results
    within the input type's rounding of the float32 computation."""
    reference, ours = make_pair("relu6")
    x, grad, r, _ = kernel_inputs(layout, "cpu")
    x, grad, r = x.to(dtype), grad.to(dtype), r.to(dtype)
    xr, rr = x.float().requires_grad_(), r.float().requires_grad_()
    xo, ro = x.clone().requires_grad_(), r.clone().requires_grad_()
    expected = residual_reference("relu6", xr, rr, reference[0])
    actual = ours(xo, ro)
    expected.backward(grad.float()), actual.backward(grad)
    assert actual.dtype == dtype and xo.grad.dtype == dtype and ours.weight.grad.dtype == torch.float32
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(actual.float(), expected, **tol)
    torch.testing.assert_close(xo.grad.float(), xr.grad, **tol)
    torch.testing.assert_close(ro.grad.float(), rr.grad, **tol)
    torch.testing.assert_close(ours.weight.grad, reference[0].weight.grad, rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(ours.running_var, reference[0].running_var, rtol=1e-3, atol=1e-3)


def test_gradcheck_with_residual_float64(impl):
    backend_name, device = impl
    if backend_name == "triton":
        pytest.skip("the Triton interpreter is tested in float32 (no float64 gradcheck)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 3, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    r = torch.randn(3, 4, 3, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    for training in (True, False):
        stats = [torch.zeros(4, dtype=torch.float64, device=device),
                 torch.ones(4, dtype=torch.float64, device=device)]
        assert torch.autograd.gradcheck(
            lambda x, r, w, b: bn_ops.batch_norm_act(x, w, b, *stats, training, 0.0, 1e-5,
                                                     "leaky_relu", 0.1, residual=r),
            (x, r, w, b))


def test_empty_batch_leaves_running_statistics_alone():
    reference, ours = make_pair("relu")
    for module in (reference, ours):
        x = torch.randn(0, 6, 4, 4, requires_grad=True)
        module(x).sum().backward()
        assert x.grad.shape == x.shape
    assert torch.equal(ours.running_mean, reference[0].running_mean)
    assert torch.equal(ours.running_var, reference[0].running_var)
    assert torch.equal(ours.weight.grad, reference[0].weight.grad)
    assert torch.equal(ours.bias.grad, reference[0].bias.grad)
    assert int(ours.num_batches_tracked) == int(reference[0].num_batches_tracked) == 1


def test_autograd_keeps_input_and_residual_only():
    x = torch.randn(8, 6, 20, 20, requires_grad=True)
    r = torch.randn(8, 6, 20, 20, requires_grad=True)
    storages = set()

    def pack(t):
        if t.numel() >= x.numel():
            storages.add(t.untyped_storage().data_ptr())
        return t

    _, ours = make_pair("hardswish")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ours(x, r)
    assert storages == {x.untyped_storage().data_ptr(), r.untyped_storage().data_ptr()}


def test_torch_compile_matches_eager():
    reference, ours = make_pair("hardswish")
    compiled = torch.compile(make_pair("hardswish")[1], backend="aot_eager", fullgraph=False)
    x, grad, r, _ = kernel_inputs("nchw", "cpu")
    outputs = []
    for module in (ours, compiled):
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = module(xi, ri)
        y.backward(grad)
        outputs.append((y, xi.grad, ri.grad, module.weight.grad, module.running_var))
    for a, e in zip(*outputs):
        torch.testing.assert_close(a, e)


def test_bad_input_errors():
    _, ours = make_pair("relu")
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match="'residual' must have x's shape"):
        ours(x, torch.randn(2, 6, 3, 4))
    with pytest.raises(ValueError, match="'weight' to have shape \\[5\\]"):
        bn_ops.batch_norm_act(torch.randn(2, 5, 3, 3), ours.weight, ours.bias, None, None, True)
    with pytest.raises(ValueError, match="needs running_mean"):
        bn_ops.batch_norm_act(x, None, None, None, None, False)
    if cnnkernels.info()["cpu_ext"]:
        scale = torch.ones(6)
        with pytest.raises(RuntimeError, match="'mean' to have shape \\[6\\]"):
            torch.ops.cnnkernels.batch_norm_act_backward_reduce(x, x, scale, scale, torch.ones(5))
        with pytest.raises(RuntimeError, match="'scale' to be Float"):
            torch.ops.cnnkernels.batch_norm_act_backward_reduce(x, x, scale.double(), scale, scale)
        with pytest.raises(RuntimeError, match="'grad' and 'x' must have the same shape"):
            torch.ops.cnnkernels.batch_norm_act_backward_reduce(x[:1], x, scale, scale, scale)


# --- SyncBN: two processes with the gloo backend --------------------------------------------------

def test_syncbn_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    import syncbn_worker
    from conftest import run_ranks

    ranks = run_ranks(syncbn_worker.__file__, 2, tmp_path)
    for layout_name, layout in LAYOUTS.items():
        whole = syncbn_worker.run(syncbn_worker.make_module(), 0, 1, layout)
        for step, expected in enumerate(whole):
            per_rank = [r[layout_name][step] for r in ranks]
            for key in ("y", "x.grad", "residual.grad"):
                torch.testing.assert_close(torch.cat([p[key] for p in per_rank]), expected[key],
                                           rtol=1e-5, atol=1e-5)
            for key in ("running_mean", "running_var"):
                for p in per_rank:
                    torch.testing.assert_close(p[key], expected[key], rtol=1e-6, atol=1e-6)
            # parameter gradients stay per rank, as nn.SyncBatchNorm's (DDP then averages them)
            for key in ("weight.grad", "bias.grad"):
                torch.testing.assert_close(sum(p[key] for p in per_rank), expected[key],
                                           rtol=1e-5, atol=1e-5)


def test_statistics_propagate_nan_and_inf(impl):
    _, device = impl
    x = torch.randn(4, 3, 5, 5)
    x[1, 1, 2, 2] = float("nan")
    x[2, 2, 0, 1] = float("inf")
    x = x.to(device)
    mean, var = bn_ops._kernels(x)[0](x)
    assert torch.isfinite(mean[0]) and torch.isfinite(var[0])
    assert torch.isnan(mean[1]) and torch.isnan(var[1])
    assert not torch.isfinite(mean[2]) and torch.isnan(var[2])  # inf − inf in the variance


def test_zero_channels():
    empty = BatchNormAct2d(0)
    x = torch.randn(2, 0, 3, 3, requires_grad=True)
    y = empty(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


# --- the layer under hostile arguments ---------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"eps": 0.0}, "eps must be a positive number"), ({"eps": -1e-5}, "eps must be a positive"),
    ({"momentum": 1.5}, r"momentum must be in \[0, 1\] or None"),
    ({"momentum": -0.1}, r"momentum must be in \[0, 1\] or None")])
def test_layer_refuses_bad_eps_and_momentum(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchNormAct2d(4, **kwargs)


def test_layer_with_momentum_none_keeps_a_cumulative_average():
    torch.manual_seed(0)
    ours = BatchNormAct2d(4, momentum=None, activation="relu")
    reference = nn.BatchNorm2d(4, momentum=None)
    for _ in range(3):
        x = torch.randn(2, 4, 5, 5)
        torch.testing.assert_close(ours(x), torch.relu(reference(x)))
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)


def test_layer_resets_like_batchnorm_after_deferred_initialisation():
    """Built on meta, then to_empty + reset_parameters: nn.BatchNorm2d's fresh state, and finite
    outputs in eval."""
    with torch.device("meta"):
        ours = BatchNormAct2d(6, activation="relu6")
    ours = ours.to_empty(device="cpu")
    ours.reset_parameters()
    fresh = nn.BatchNorm2d(6)
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value)
    y = ours.eval()(torch.randn(2, 6, 3, 3))
    assert torch.isfinite(y).all()


def test_layer_runs_on_meta_tensors():
    with torch.device("meta"):
        ours = BatchNormAct2d(6, activation="hardswish")
    for training in (True, False):
        y = ours.train(training)(torch.empty(2, 6, 3, 3, device="meta"))
        assert y.device.type == "meta" and y.shape == (2, 6, 3, 3)


def _composite_args(layout, training, residual, affine):
    x, _, r, (scale, shift, _) = kernel_inputs(layout, "cpu")
    x = x.clone().requires_grad_()
    weight, bias = (scale.clone().requires_grad_(), shift.clone().requires_grad_()) if affine \
        else (None, None)
    running = (torch.randn(6), torch.rand(6) + 0.5)
    return (x, weight, bias, r.clone().requires_grad_() if residual else None, *running, training,
            0.1, 1e-5, activations.activation_code("relu6"), 0.01)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_opcheck_of_the_whole_op(layout, training, residual, affine):
    """cnnkernels::batch_norm_act: schema (the running statistics mutated as declared), fake kernel,
    the C++ autograd registration and torch.compile (AOT) against the kernels."""
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    torch.library.opcheck(torch.ops.cnnkernels.batch_norm_act.default,
                          _composite_args(layout, training, residual, affine))


def test_eager_calls_record_the_cpp_autograd_node():
    """The eager front hands the whole op to C++: its graph node is the C++ Function, not Python's
    (no Python frame per call, forward or backward)."""
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    y = cnnkernels.ops.batch_norm_act(x, None, None, torch.zeros(6), torch.ones(6), True)
    assert "BatchNormActFunction" in y.grad_fn.name()
    layer = BatchNormAct2d(6)
    assert "BatchNormActFunction" in layer(x).grad_fn.name()


def test_whole_op_matches_the_python_autograd_bit_for_bit():
    """The C++ autograd and the Python one (still used under torch.compile and for SyncBN) run the
    same kernels: identical outputs, gradients and running statistics."""
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    module = importlib.import_module("cnnkernels.ops.batch_norm_act")

    for training in (True, False):
        args = _composite_args("channels_last", training, True, True)
        clone = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                 else a for a in args]
        x, w, b, r, rm, rv, _, m, eps, code, slope = args
        grad = torch.randn_like(x)
        y = torch.ops.cnnkernels.batch_norm_act.default(*args)
        y.backward(grad)
        x2, w2, b2, r2, rm2, rv2 = clone[:6]
        y2 = module._BatchNormAct.apply(x2, w2, b2, r2, rm2, rv2, training, m, eps, code, slope,
                                        None, None)
        y2.backward(grad)
        for a, e in ((y, y2), (x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad),
                     (r.grad, r2.grad), (rm, rm2), (rv, rv2)):
            assert torch.equal(a, e)
