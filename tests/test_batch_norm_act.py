"""BatchNormAct2d / batch_norm_act against nn.BatchNorm2d followed by the activation."""
import pytest
import torch
from torch import nn

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
