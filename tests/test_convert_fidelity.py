"""convert() never changes what a model computes or how it trains.

Training: each model takes one train-mode step (batch 2, 64x64, dropout and stochastic depth on,
the same seed on both sides) as the original and as the converted model, both in float64. Every
parameter gradient, the input gradient, the output and the running statistics must agree to
float64 rounding (1e-7 of the largest value). A float32 comparison of gradients cannot be the
test: at batch 2 the last BatchNorms see 8 values per channel, and a ReLU whose input lies within
float32 rounding of 0 flips in one model and not in the other, which moves that BN's bias gradient
by a whole element and every earlier gradient by ~1%, for the unconverted model too when its input
moves by one ulp. In float64 such a flip needs an input within ~1e-13 of the kink, so any
difference above rounding is a real defect (a formula, a saved tensor overwritten, a layout
hand-off). The forward in float32 is compared the issue's way: the converted model's error against
the float64 original at most 3x the float32 original's, in training and in eval.
Then the silent changes: frozen parameters, hooks, modified blocks, shared modules, modes set after
convert, converting twice, Sequential indexing, roots.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cnnkernels

torchvision = pytest.importorskip("torchvision")

# One model of every torchvision family that convert() changes (each block kind it knows), and
# timm models holding the layers it knows: BatchNormAct2d, SqueezeExcite, DenseNet blocks,
# EfficientNet / MobileNet blocks, ResNets. Larger members of the same families are marked slow.
TORCHVISION_MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "densenet121", "mobilenet_v2",
    "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1",
    "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x0_5", "mnasnet0_5",
    "squeezenet1_1", "googlenet", "convnext_tiny", "alexnet",
]
TORCHVISION_SLOW = ["resnet34", "densenet169", "wide_resnet50_2", "vgg11_bn", "regnet_y_800mf",
                    "mnasnet1_0", "shufflenet_v2_x1_0", "efficientnet_b2"]
TIMM_MODELS = [
    "densenet121", "mobilenetv2_100", "mobilenetv3_small_100", "efficientnet_b0",
    "efficientnet_lite0", "resnet18", "resnet26", "tinynet_e", "lcnet_050", "semnasnet_050",
]
TIMM_SLOW = ["mobilenetv3_large_100", "mnasnet_100", "spnasnet_100", "fbnetc_100"]
RATIO_LIMIT = 3.0
FLOOR = 1e-6  # outputs that are exactly equal on every side


def _torchvision_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None)


def _timm_model(name: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    try:
        return timm.create_model(name, pretrained=False, drop_rate=0.2, drop_path_rate=0.2)
    except TypeError:  # no stochastic depth in this family
        return timm.create_model(name, pretrained=False, drop_rate=0.2)


def _model(source: str, name: str) -> nn.Module:
    return _torchvision_model(name) if source == "torchvision" else _timm_model(name)


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm parameters and running statistics (fresh ones are 1, 0, 0, 1)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.affine:
                    module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
                if module.track_running_stats:
                    module.running_mean.copy_(
                        torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                    module.running_var.copy_(
                        torch.rand(module.running_var.shape, generator=generator) + 0.5)


def _output(y):
    return y.logits if hasattr(y, "logits") else y[0] if isinstance(y, tuple) else y


def _step(model: nn.Module, x: torch.Tensor, upstream: torch.Tensor,
          autocast: torch.dtype | None = None):
    """(output, input gradient, {parameter name: gradient}) of one train-mode step."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1234)  # the same dropout / stochastic-depth draws on both sides
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        y = _output(model(x))
    (y.to(upstream.dtype) * upstream).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    return y.detach(), x.grad.detach().clone(), grads


def _largest(tensors) -> float:
    return max((t.abs().max().item() for t in tensors if t.numel()), default=0.0)


def check_float64_training_step(model: nn.Module, channels_last: bool = False) -> None:
    """The converted model's train-mode step equals the original's in float64 (see the module
    docstring): output, input gradient, every parameter gradient, the running statistics."""
    _randomise_norms(model)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    original = model.double().train().to(memory_format=memory_format)
    converted = cnnkernels.convert(original)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = x.contiguous(memory_format=memory_format)
    upstream = torch.randn(2, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y_o, gx_o, g_o = _step(original, x, upstream)
    y_c, gx_c, g_c = _step(converted, x, upstream)
    assert set(g_c) == set(g_o), "the converted model's trainable parameters differ"
    torch.testing.assert_close(y_c, y_o, rtol=1e-9, atol=1e-9 * _largest([y_o]))
    torch.testing.assert_close(gx_c, gx_o, rtol=1e-8, atol=1e-8 * _largest([gx_o]))
    # a gradient that is zero in exact arithmetic (a BN bias feeding only BatchNorms) is rounding
    # residue in both: measured against the largest gradient of the model
    floor = 1e-6 * _largest(g_o.values())
    for name, grad in g_o.items():
        error = (g_c[name] - grad).abs().max().item()
        assert error <= 1e-7 * max(grad.abs().max().item(), floor), (name, error)
    converted_state = converted.state_dict()
    for name, value in original.state_dict().items():  # running statistics moved alike
        torch.testing.assert_close(converted_state[name], value, rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")


def _error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference).abs().max().item()


def _ratio(converted: float, original: float) -> float:
    return (converted + FLOOR) / (original + FLOOR)


def float32_forward_ratios(model: nn.Module, autocast: torch.dtype | None = None
                           ) -> dict[str, float]:
    """{"train": ratio, "eval": ratio} of the converted model's output error to the original's,
    in float32 (or under autocast), both against the original in float64."""
    _randomise_norms(model)
    reference = copy.deepcopy(model).double()
    converted = cnnkernels.convert(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ratios = {}
    for mode in ("train", "eval"):
        outputs = []
        for module, dtype in ((reference, torch.float64), (model, autocast), (converted, autocast)):
            module.train(mode == "train")
            torch.manual_seed(1234)
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                                 enabled=dtype in (torch.bfloat16, torch.float16)):
                outputs.append(_output(module(x.to(torch.float64 if dtype == torch.float64
                                                   else torch.float32))))
        expected, original, ours = outputs
        ratios[mode] = _ratio(_error(ours, expected), _error(original, expected))
    return ratios


def _assert_within(ratios: dict[str, float]) -> None:
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= RATIO_LIMIT, (
        f"{worst}: output error {ratios[worst]:.1f}x the original float32 model's ({ratios})")


def _input(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


def _changed_by_convert(model: nn.Module) -> bool:
    _, report = cnnkernels.convert(model, report=True)
    return bool(report.replaced)


TRAINING_CASES = [("torchvision", n) for n in TORCHVISION_MODELS] + \
    [pytest.param("torchvision", n, marks=pytest.mark.slow) for n in TORCHVISION_SLOW] + \
    [("timm", n) for n in TIMM_MODELS] + \
    [pytest.param("timm", n, marks=pytest.mark.slow) for n in TIMM_SLOW]


@pytest.mark.parametrize("source, name", TRAINING_CASES)
def test_training_step_matches_in_float64(source, name):
    model = _model(source, name)
    assert _changed_by_convert(model), f"convert() changes nothing in {source}'s {name}"
    check_float64_training_step(model)


@pytest.mark.parametrize("source, name", TRAINING_CASES)
def test_float32_outputs_as_close_as_the_originals(source, name):
    _assert_within(float32_forward_ratios(_model(source, name)))


@pytest.mark.parametrize("source, name", [
    ("torchvision", "mobilenet_v3_small"), ("torchvision", "resnet18"),
    ("torchvision", "densenet121"), ("torchvision", "shufflenet_v2_x0_5"),
    ("timm", "efficientnet_b0"), ("timm", "densenet121")])
def test_training_step_matches_in_float64_channels_last(source, name):
    check_float64_training_step(_model(source, name), channels_last=True)


@pytest.mark.parametrize("source, name", [
    ("torchvision", "mobilenet_v3_small"), ("torchvision", "resnet18"),
    ("torchvision", "densenet121"), ("timm", "mobilenetv2_100"), ("timm", "efficientnet_b0")])
def test_bf16_autocast_outputs_as_close_as_the_originals(source, name):
    """Under the same bfloat16 autocast, the converted model's output error against float64 is
    within 3x the original's, in training and in eval."""
    _assert_within(float32_forward_ratios(_model(source, name), autocast=torch.bfloat16))


@pytest.mark.parametrize("source, name", [
    ("torchvision", "mobilenet_v3_small"), ("torchvision", "densenet121"),
    ("timm", "mobilenetv2_100")])
def test_bf16_autocast_gradients_as_close_as_the_originals(source, name):
    """Under the same bfloat16 autocast, the converted model's gradients, summed over every
    parameter (one flipped ReLU moves single tensors; the sum is stable), are within 3x the
    original's error against float64."""
    model = _model(source, name)
    _randomise_norms(model)
    model.train()
    reference = copy.deepcopy(model).double()
    converted = cnnkernels.convert(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    upstream = torch.randn(2, 1000, generator=torch.Generator().manual_seed(3))
    _, gx64, g64 = _step(reference, x.double(), upstream.double())
    _, gx_o, g_o = _step(model, x, upstream, torch.bfloat16)
    _, gx_c, g_c = _step(converted, x, upstream, torch.bfloat16)

    def total(grads, input_grad):
        return sum(_error(grads[n], g) ** 2 for n, g in g64.items()) ** 0.5 + \
            _error(input_grad, gx64)

    assert total(g_c, gx_c) <= RATIO_LIMIT * total(g_o, gx_o)


# --- silent changes -----------------------------------------------------------------------------

def _sgd_step(model: nn.Module, x: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()


def _frozen_backbone(model: nn.Module, head: str) -> nn.Module:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(head))
    return model


@pytest.mark.parametrize("name, head", [("mobilenet_v3_small", "classifier"), ("resnet18", "fc"),
                                        ("densenet121", "classifier"),
                                        ("shufflenet_v2_x0_5", "fc")])
def test_frozen_parameters_stay_frozen(name, head):
    model = _frozen_backbone(_torchvision_model(name), head).train()
    converted = cnnkernels.convert(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {n: p.requires_grad for n, p in converted.named_parameters()} == flags
    before = {n: t.clone() for n, t in converted.state_dict().items()}
    _sgd_step(converted, _input())
    changed = {n for n, t in converted.state_dict().items()
               if t.is_floating_point() and not torch.equal(t, before[n])
               and "running" not in n}
    assert changed and all(n.startswith(head) for n in changed), sorted(changed)[:5]


def _counting_hooks(modules: list[nn.Module]) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for module in modules:
        module.register_forward_hook(hook)
        module.register_forward_pre_hook(lambda *_: None)
    return calls


def test_hooks_in_a_sequential_fire_and_pre_hooks_still_edit_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Hardswish()).eval()
    calls = _counting_hooks([model[1], model[3], model[4]])
    model[4].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    x = torch.randn(2, 4, 9, 9)
    expected = model(x)
    assert calls[0] == 3
    converted = cnnkernels.convert(model)
    calls[0] = 0
    torch.testing.assert_close(converted(x), expected)
    assert calls[0] == 3


@pytest.mark.parametrize("name, inner", [
    ("resnet18", "layer1.0.bn1"), ("resnet50", "layer2.0.conv2"),
    ("densenet121", "features.denseblock1.denselayer2.norm2"),
    ("mobilenet_v3_small", "features.1.block.1.fc1"),
    ("mobilenet_v2", "features.2.conv.2")])
def test_hooks_inside_blocks_fire(name, inner):
    model = _torchvision_model(name).eval()
    calls = _counting_hooks([model.get_submodule(inner)])
    x = _input()
    with torch.no_grad():
        expected = model(x)
    count = calls[0]
    converted, report = cnnkernels.convert(model, report=True)
    calls[0] = 0
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-4)
    assert calls[0] == count == 1


def _tinker(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)
    return model


@pytest.mark.parametrize("name, path, replacement", [
    ("resnet18", "layer1.0.relu", nn.LeakyReLU(0.5)),
    ("resnet50", "layer1.0.relu", nn.LeakyReLU(0.5)),
    ("densenet121", "features.denseblock1.denselayer1.relu2", nn.LeakyReLU(0.5)),
    ("densenet121", "features.denseblock2.denselayer3.conv2",
     nn.Conv2d(128, 32, 3, padding=1, bias=True)),
    ("mobilenet_v3_small", "features.1.block.1.avgpool", nn.AdaptiveMaxPool2d(1)),
    ("efficientnet_b0", "features.1.0.block.1.avgpool", nn.AdaptiveMaxPool2d(1))])
@pytest.mark.parametrize("training", [False, True])
def test_modified_blocks_compute_what_they_compute(name, path, replacement, training):
    torch.manual_seed(3)
    model = _tinker(_torchvision_model(name), path, replacement).train(training)
    converted = cnnkernels.convert(model).train(training)
    x = _input()
    torch.manual_seed(5)
    expected = model(x)
    torch.manual_seed(5)
    torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-4)


class _OwnForward(nn.Sequential):
    def forward(self, x):
        return self[2](self[1](self[0](x)) * 2 - 1)


class _CallsChildren(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU6())

    def forward(self, x):
        x = self.body[1](self.body[0](x) - 10)
        return self.head[2](self.head[1](self.head[0](x)) + 1)


@pytest.mark.parametrize("build", [
    lambda: _OwnForward(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
    _CallsChildren])
@pytest.mark.parametrize("training", [False, True])
def test_containers_that_call_children_themselves(build, training):
    torch.manual_seed(0)
    model = nn.Sequential(build()).train(training)
    converted = cnnkernels.convert(model).train(training)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(converted(x), model(x))
    torch.testing.assert_close(converted(x), model(x))  # and the running statistics moved alike


def test_a_batchnorm_used_by_two_parents_stays_one():
    torch.manual_seed(0)
    shared = nn.BatchNorm2d(8)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 1), shared, nn.ReLU()),
                          nn.Sequential(nn.Conv2d(8, 8, 1), shared, nn.ReLU6()))
    converted = cnnkernels.convert(model)
    assert converted[0][1] is converted[1][1]
    x = torch.randn(2, 3, 5, 5)
    for _ in range(3):
        _sgd_step(model, x)
        _sgd_step(converted, x)
    assert int(converted[0][1].num_batches_tracked) == 6
    torch.testing.assert_close(converted.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_tied_modules_in_models_stay_tied(name):
    model = _torchvision_model(name)
    blocks = [m for m in model.modules() if type(m).__name__ in ("InvertedResidual", "MBConv")]
    depthwise = blocks[-1].block[1][0]
    blocks[-2].block[1]._modules["0"] = depthwise  # a depthwise conv used by two blocks
    before = sum(p.numel() for p in model.parameters())
    converted = cnnkernels.convert(model)
    assert sum(p.numel() for p in converted.parameters()) == before


def test_a_tied_depthwise_conv_stays_one():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    converted = cnnkernels.convert(model)
    assert converted[0] is converted[2]
    assert len(list(converted.parameters())) == 2


@pytest.mark.parametrize("name, frozen", [
    ("densenet121", "features.denseblock1.denselayer1.norm1"),
    ("densenet121", "features.denseblock2.denselayer4.norm2"),
    ("resnet18", "layer1.0.bn2"), ("mobilenet_v2", "features.1.conv.0.1")])
def test_modes_set_after_convert_are_followed(name, frozen):
    model = _torchvision_model(name).train()
    converted = cnnkernels.convert(model).train()
    for m in (model, converted):
        m.get_submodule(frozen).eval()
    x = _input()
    before = converted.get_submodule(frozen).running_mean.clone()
    torch.manual_seed(7)  # the same dropout draws
    ours = converted(x)
    torch.manual_seed(7)
    torch.testing.assert_close(ours, model(x), rtol=1e-4, atol=1e-4)
    assert torch.equal(converted.get_submodule(frozen).running_mean, before)
    torch.testing.assert_close(converted.state_dict(), model.state_dict(), rtol=1e-4, atol=1e-4)


def test_dense_block_follows_layers_swapped_after_convert():
    model = _torchvision_model("densenet121").train()
    converted = cnnkernels.convert(model).train()
    for m in (model, converted):
        m.features.denseblock1.denselayer2.relu1 = nn.Hardswish()
    x = _input()
    torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "densenet121", "resnet18",
                                  "shufflenet_v2_x0_5"])
def test_converting_twice_is_converting_once(name):
    model = _torchvision_model(name).eval()
    once = cnnkernels.convert(model)
    twice, report = cnnkernels.convert(once, report=True)
    assert not report.replaced
    x = _input()
    with torch.no_grad():
        torch.testing.assert_close(twice(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, path", [("mobilenet_v3_small", "features.0"),
                                        ("mobilenet_v2", "features.1.conv.0"),
                                        ("efficientnet_b0", "features.0")])
def test_replaced_sequentials_keep_their_interface(name, path):
    model = _torchvision_model(name).eval()
    converted = cnnkernels.convert(model)
    original, ours = model.get_submodule(path), converted.get_submodule(path)
    assert len(ours) == len(original)
    assert [type(m) for m in ours] == [type(m) for m in original]
    x = torch.randn(2, ours[0].in_channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours[1](ours[0](x)), original[1](original[0](x)))


@pytest.mark.parametrize("build", [
    lambda: nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()),
    lambda: nn.Hardswish(), lambda: nn.Conv2d(4, 4, 3, groups=4),
    lambda: torchvision.models.resnet.BasicBlock(8, 8)])
@pytest.mark.parametrize("inplace", [False, True])
def test_the_root_itself_is_converted_and_reverted(build, inplace):
    torch.manual_seed(0)
    model = build().eval()
    channels = 8 if not isinstance(model, (nn.Conv2d, nn.Hardswish)) else 4
    x = torch.randn(2, channels, 6, 6)
    expected = model(x)
    converted = cnnkernels.convert(model, inplace=inplace)
    assert type(converted) is not type(model)
    torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)
    reverted = cnnkernels.revert(converted, inplace=inplace)
    assert type(reverted) is type(model)
    torch.testing.assert_close(reverted(x), expected)


def test_documented_submodules_are_attributes():
    import subprocess
    import sys

    code = "import cnnkernels; cnnkernels.profile.saved_activation_bytes; cnnkernels.conversion"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dense_block_without_affine_norms_is_left_alone():
    model = _torchvision_model("densenet121").eval()
    model.features.denseblock1.denselayer1.norm1 = nn.BatchNorm2d(64, affine=False).eval()
    converted, report = cnnkernels.convert(model, report=True)
    reasons = [s.reason for s in report.left_alone if s.name == "features.denseblock1"]
    assert reasons and "affine" in reasons[0]
    with torch.no_grad():
        torch.testing.assert_close(converted(_input()), model(_input()), rtol=1e-4, atol=1e-4)


# --- meta tensors and deferred initialisation --------------------------------------------------

@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18", "densenet121",
                                  "shufflenet_v2_x0_5"])
@pytest.mark.parametrize("training", [False, True])
def test_converted_models_run_on_meta_tensors(name, training):
    """Shape inference on the meta device: the converted model gives the original's output shape."""
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    converted = cnnkernels.convert(model).train(training)
    y = converted(torch.empty(2, 3, 64, 64, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 1000)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_converted_models_initialise_from_meta(name):
    """Built on meta, converted, then to_empty + reset_parameters (large-model initialisation):
    every output finite, as the original's is."""
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    converted = cnnkernels.convert(model).to_empty(device="cpu")
    for module in converted.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        elif hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
    with torch.no_grad():
        y = converted.eval()(_input())
    assert torch.isfinite(y).all()
