"""squeeze_excite / SqueezeExcite against torchvision's SqueezeExcitation (outputs, every gradient),
on every backend, both layouts, reduced precision, float64 gradcheck, opcheck, errors."""
import importlib

import pytest
import torch
from torch import nn

import cnnkernels
from cnnkernels.nn import SqueezeExcite
from cnnkernels.ops import squeeze_excite
from cnnkernels.reference import squeeze_excite as reference

torchvision = pytest.importorskip("torchvision")

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
GATES = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}
ACTS = {"relu": nn.ReLU, "hardswish": nn.Hardswish}


def pair(act="relu", gate="hardsigmoid", channels=24, squeeze=8, dtype=torch.float32):
    torch.manual_seed(0)
    theirs = torchvision.ops.SqueezeExcitation(channels, squeeze, ACTS[act], GATES[gate]).to(dtype)
    return theirs, SqueezeExcite.from_torchvision(theirs)


def inputs(layout, shape=(3, 24, 7, 9), dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 2).to(device=device, dtype=dtype)
    grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    fmt = LAYOUTS[layout]
    return x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt)


def run(module, x, grad):
    module.zero_grad()
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(grad)
    return [y, x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("act", ACTS)
def test_matches_torchvision(impl, layout, gate, act):
    _, device = impl
    theirs, ours = (m.to(device) for m in pair(act, gate))
    x, grad = inputs(layout, device=device)
    expected, actual = run(theirs, x, grad), run(ours, x, grad)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert actual[0].is_contiguous(memory_format=LAYOUTS[layout])
    assert actual[1].is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (2, 300, 2, 2), (1, 3, 40, 40)], ids=str)
def test_backward_kernel(impl, layout, shape):
    name, device = impl
    x, grad = inputs(layout, shape, device=device)
    gate = torch.rand(shape[:2], generator=torch.Generator().manual_seed(2)).to(device)
    kernel = importlib.import_module("cnnkernels.ops.squeeze_excite")._backward_kernel(x)
    dx, dgate = kernel(grad, x, gate)
    edx, edgate = reference.squeeze_excite_backward(grad, x, gate)
    torch.testing.assert_close(dx, edx)
    torch.testing.assert_close(dgate, edgate, rtol=1e-5, atol=1e-5)
    assert dx.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_against_float32(dtype):
    theirs, _ = pair()
    _, ours = pair(dtype=dtype)
    x, grad = inputs("nchw", dtype=dtype)
    expected = run(theirs, x.float(), grad.float())
    actual = run(ours, x, grad)
    assert actual[0].dtype == dtype and actual[2].dtype == dtype
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.float(), e, rtol=2e-2, atol=2e-2)


def test_gradcheck_float64(impl):
    name, device = impl
    if name == "triton":
        pytest.skip("the Triton interpreter is tested in float32 (no float64 gradcheck)")
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=g, dtype=torch.float64).to(device).requires_grad_()
            for s in ((2, 6, 3, 4), (3, 6), (3,), (6, 3), (6,))]
    for gate in ("sigmoid", "hardsigmoid"):
        assert torch.autograd.gradcheck(
            lambda *a: squeeze_excite(*a, activation="hardswish", gate=gate), args)


def test_opcheck():
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    for layout in LAYOUTS:
        x, grad = inputs(layout)
        gate = torch.rand(x.shape[:2])
        torch.library.opcheck(torch.ops.cnnkernels.squeeze_excite_backward.default, (grad, x, gate))


def test_torch_compile_matches_eager():
    _, ours = pair()
    compiled = torch.compile(pair()[1], backend="aot_eager")
    x, grad = inputs("nchw")
    for a, e in zip(run(compiled, x, grad), run(ours, x, grad)):
        torch.testing.assert_close(a, e)


def test_state_dict_and_round_trip():
    theirs, ours = pair(gate="sigmoid")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    back = ours.to_torchvision()
    assert type(back.scale_activation) is nn.Sigmoid
    x, _ = inputs("nchw")
    torch.testing.assert_close(back(x), theirs(x))


def test_errors():
    x = torch.randn(2, 6, 3, 3)
    w1, w2 = torch.randn(3, 6), torch.randn(6, 3)
    with pytest.raises(ValueError, match="'fc1_weight' to have shape \\[S, 6\\]"):
        squeeze_excite(x, torch.randn(3, 5), None, w2, None)
    with pytest.raises(ValueError, match="'fc2_weight' to have shape \\[6, 3\\]"):
        squeeze_excite(x, w1, None, torch.randn(6, 4), None)
    with pytest.raises(ValueError, match="'fc1_bias' to have shape \\[3\\]"):
        squeeze_excite(x, w1, torch.randn(4), w2, None)
    with pytest.raises(ValueError, match="unknown gate 'tanh'"):
        squeeze_excite(x, w1, None, w2, None, gate="tanh")
    with pytest.raises(ValueError, match="4-D tensor"):
        squeeze_excite(x[0], w1, None, w2, None)
    with pytest.raises(TypeError, match="scale_activation Tanh"):
        SqueezeExcite.from_torchvision(torchvision.ops.SqueezeExcitation(6, 3, nn.ReLU, nn.Tanh))
    if cnnkernels.info()["cpu_ext"]:
        with pytest.raises(RuntimeError, match="'gate' to have shape \\[2, 6\\]"):
            torch.ops.cnnkernels.squeeze_excite_backward(x, x, torch.rand(2, 5))
