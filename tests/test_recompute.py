"""BatchNorm+act outputs kept as recipes inside converted blocks (cnnkernels/nn/recompute.py):
the same gradients to the bit as keeping the tensors, fewer saved bytes, and the cases where the
recipe must not be used."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cnnkernels
from cnnkernels import profile
from cnnkernels.nn.recompute import Recipe

tv = pytest.importorskip("torchvision")
from torchvision.models import mobilenetv2, mobilenetv3, resnet  # noqa: E402


def _no_recipes():
    """A user's own saved-tensor hooks (pass-through): the blocks then keep every tensor."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def _bottleneck(stride=1):
    downsample = nn.Sequential(nn.Conv2d(16, 32, 1, stride, bias=False), nn.BatchNorm2d(32))
    return resnet.Bottleneck(16, 8, stride, downsample)


def _basic_block():
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    return resnet.BasicBlock(8, 16, 2, downsample)


def _mobilenet_v2_block():
    return mobilenetv2.InvertedResidual(16, 16, 1, 6)


def _mobilenet_v3_block(activation="HS", se=True):
    config = mobilenetv3.InvertedResidualConfig(16, 3, 48, 16, se, activation, 1, 1, 1.0)
    return mobilenetv3.InvertedResidual(config, nn.BatchNorm2d)


BLOCKS = {"bottleneck": (_bottleneck, 16), "bottleneck_stride2": (lambda: _bottleneck(2), 16),
          "basic_block": (_basic_block, 8), "mobilenet_v2": (_mobilenet_v2_block, 16),
          "mobilenet_v3_se": (_mobilenet_v3_block, 16),
          "mobilenet_v3_relu": (lambda: _mobilenet_v3_block("RE", False), 16)}


def _randomised(block: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return block


def _gradients(block: nn.Module, x: torch.Tensor, grad: torch.Tensor, recipes: bool):
    x = x.detach().requires_grad_()
    block.zero_grad(set_to_none=True)
    if recipes:
        out = block(x)
    else:
        with _no_recipes():
            out = block(x)
    out.backward(grad)
    return [out.detach(), x.grad, *(p.grad for p in block.parameters())]


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_recipes_give_the_same_gradients_to_the_bit(name, layout):
    build, channels = BLOCKS[name]
    block = cnnkernels.convert(_randomised(build()).train())
    x = torch.randn(2, channels, 9, 11).to(memory_format=layout)
    grad = torch.randn_like(block(x))
    states = []
    for recipes in (True, False):
        model = copy.deepcopy(block)
        results = _gradients(model, x, grad, recipes)
        states.append(model.state_dict())
        if recipes:
            with_recipes = results
        else:
            without = results
    for a, b in zip(with_recipes, without):
        assert torch.equal(a, b)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def _saved_bytes(block: nn.Module, x: torch.Tensor, recipes: bool) -> int:
    if recipes:
        return profile.saved_activation_bytes(block, x)
    with _no_recipes():
        return profile.saved_activation_bytes(block, x)


def test_bottleneck_keeps_neither_relu_output_nor_the_downsample_output():
    block = cnnkernels.convert(_bottleneck(stride=2).train())
    x = torch.randn(2, 16, 10, 10, requires_grad=True)
    relu1 = 2 * 8 * 10 * 10 * 4  # torchvision's Bottleneck strides in conv2
    relu2 = 2 * 8 * 5 * 5 * 4
    identity = 2 * 32 * 5 * 5 * 4
    variances = (8 + 8 + 32) * 4  # a recipe keeps its BN's batch variance, as the op does not
    kept, without = _saved_bytes(block, x, True), _saved_bytes(block, x, False)
    assert without - kept == relu1 + relu2 + identity - variances


def test_mobilenet_v2_block_keeps_neither_expansion_nor_depthwise_output():
    block = cnnkernels.convert(_mobilenet_v2_block().train())
    x = torch.randn(2, 16, 10, 10, requires_grad=True)
    expanded = 2 * 96 * 10 * 10 * 4
    variances = 2 * 96 * 4
    kept, without = _saved_bytes(block, x, True), _saved_bytes(block, x, False)
    assert without - kept == 2 * expanded - variances


def test_double_backward_through_a_recipe_matches_keeping_the_tensor():
    block = cnnkernels.convert(_randomised(_bottleneck()).train().double())
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    results = []
    for recipes in (True, False):
        model = copy.deepcopy(block)
        xr = x.clone().requires_grad_()
        if recipes:
            out = model(xr)
        else:
            with _no_recipes():
                out = model(xr)
        (gx,) = torch.autograd.grad(out.square().sum(), xr, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), xr)
        results.append((gx.detach(), ggx))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


def test_gradcheck_through_recipes():
    block = cnnkernels.convert(_randomised(_mobilenet_v2_block()).train().double())
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64, requires_grad=True)
    # a copy per call: each forward moves the running statistics, which gradcheck does not mind
    assert torch.autograd.gradcheck(lambda t: block(t), (x,), fast_mode=True)


def test_a_batchnorm_weight_changed_before_backward_is_refused():
    block = cnnkernels.convert(_bottleneck().train())
    out = block(torch.randn(2, 16, 6, 6, requires_grad=True))
    with torch.no_grad():
        block.bn1.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_no_recipes_in_eval_without_grad_or_under_user_hooks():
    block = cnnkernels.convert(_bottleneck().train())
    packed = []

    def pack(t):
        packed.append(type(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(torch.randn(2, 16, 6, 6, requires_grad=True)).sum().backward()
    assert packed and Recipe not in packed


def test_max_pool_makes_its_channels_last_copy_again_in_backward():
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    pool = cnnkernels.convert(nn.MaxPool2d(3, 2, 1))
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    model = nn.Sequential(stem, pool).train()
    kept, without = _saved_bytes(model, x, True), _saved_bytes(model, x, False)
    assert without - kept == 2 * 8 * 12 * 12 * 4  # the copy of the ReLU's output
    grad = torch.randn(2, 8, 6, 6)
    with_recipes = _gradients(copy.deepcopy(model), x, grad, True)
    assert all(torch.equal(a, b)
               for a, b in zip(with_recipes, _gradients(copy.deepcopy(model), x, grad, False)))
