"""cnnkernels.models: each model's parameters and multiply-accumulates against its documented
source numbers, and fused=True against fused=False (same keys, same outputs and gradients)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cnnkernels import models
from cnnkernels.models.mobilenet_v1 import SOURCE_NUMBERS as MOBILENET_V1_NUMBERS
from cnnkernels.models.torchvision_models import SOURCE_NUMBERS


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_macs(model, input_shape):
    """Multiply-accumulates of one image (torch's flop counter counts 2 per MAC)."""
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, *input_shape, device=device))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", sorted(SOURCE_NUMBERS))
def test_torchvision_models_match_their_documented_numbers(name):
    params, gmacs, _ = SOURCE_NUMBERS[name]
    with torch.device("meta"):  # shapes only: VGG-19's 144M parameters cost nothing here
        model = getattr(models, name)()
        assert count_params(model) == params
        # the docs give 2 decimals (0.145 is printed 0.14)
        assert abs(count_macs(model, (3, 224, 224)) / 1e9 - gmacs) <= 0.0055


def test_lenet5():
    model = models.lenet5()
    assert count_params(model) == 61_706
    assert count_macs(model, model.input_size) == 416_520
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    relu = models.lenet5(activation="relu", num_classes=7)
    assert isinstance(relu.features[1], torch.nn.ReLU) and relu(torch.randn(1, 1, 32, 32)).shape == (1, 7)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        models.lenet5(activation="gelu")


@pytest.mark.parametrize("config", sorted(MOBILENET_V1_NUMBERS))
def test_mobilenet_v1_matches_the_paper(config):
    width_mult, resolution = config
    paper_params_m, paper_mmacs = MOBILENET_V1_NUMBERS[config]
    with torch.device("meta"):
        model = models.mobilenet_v1(width_mult, resolution)
        assert round(count_params(model) / 1e6, 1) == paper_params_m
        assert count_macs(model, model.input_size) / 1e6 == pytest.approx(paper_mmacs, rel=5e-3)
    if config == (1.0, 224):
        assert count_params(model) == 4_231_976


def test_mobilenet_v1_rejects_bad_arguments():
    with pytest.raises(ValueError, match="width_mult must be in"):
        models.mobilenet_v1(0.0)
    with pytest.raises(ValueError, match="resolution must be >= 32"):
        models.mobilenet_v1(1.0, 16)


def test_se_resnet50_is_resnet50_plus_se():
    with torch.device("meta"):
        model = models.se_resnet50()
        plain = models.resnet50()
        assert count_params(model) == 28_088_024
        assert count_params(plain) == 25_557_032
        assert abs(count_macs(model, (3, 224, 224)) / 1e9 - 4.09) <= 0.005
    keys, plain_keys = set(model.state_dict()), set(plain.state_dict())
    assert plain_keys <= keys
    assert all(".se.fc" in k for k in keys - plain_keys)


@pytest.mark.parametrize("depth, params, gmacs", [
    (18, 11_687_848, 1.81), (34, 21_796_008, 3.66), (50, 25_549_480, 4.09),
    (101, 44_541_608, 7.80), (152, 60_185_256, 11.51)])
def test_preact_resnets_have_resnets_convolutions(depth, params, gmacs):
    """The MACs are torchvision's ResNet-{depth} numbers (same convolutions); the parameter count
    is this definition's (BatchNorms moved before the convs, one more at the end)."""
    with torch.device("meta"):
        model = getattr(models, f"preact_resnet{depth}")()
        assert count_params(model) == params
        assert abs(count_macs(model, (3, 224, 224)) / 1e9 - gmacs) <= 0.0055
        plain = getattr(models, f"resnet{depth}")()
        convs = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        plain_convs = [tuple(m.weight.shape) for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
        assert sorted(convs) == sorted(plain_convs)


def same_weights(plain, fused):
    fused.load_state_dict(plain.state_dict())
    assert list(plain.state_dict()) == list(fused.state_dict())


def run_step(model, x, train):
    model.train(train)
    model.zero_grad()
    x = x.clone().requires_grad_()
    torch.manual_seed(2)  # the same dropout masks for both models
    y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype))
    return {"output": y, "grad of x": x.grad} | {
        f"grad of {name}": p.grad for name, p in model.named_parameters()}


def compare_steps(plain, fused, x, train):
    """In float64: in float32 a single ReLU mask that flips between two correct implementations
    (an element within rounding of 0) changes a whole channel's gradient through training-mode
    BatchNorm, so float32 networks can only be compared loosely; float64 makes flips vanish and
    leaves rounding at ~1e-15. The absolute floor is for gradients that are 0 in exact arithmetic
    (a BatchNorm bias followed by a conv and a training-mode BatchNorm, e.g. in ShuffleNet)."""
    expected, actual = run_step(plain, x, train), run_step(fused, x, train)
    for what, e in expected.items():
        error = (actual[what] - e).abs().max().item()
        assert error <= 1e-9 * e.abs().max().item() + 1e-12, \
            f"{what} (train={train}): max difference {error:.1e}, largest value {e.abs().max():.1e}"


@pytest.mark.parametrize("build, image", [
    (lambda fused: models.mobilenet_v1(0.25, 64, fused=fused), 64),
    (lambda fused: models.se_resnet50(fused=fused), 64),
    (lambda fused: models.mobilenet_v3_small(fused=fused), 64),
    (lambda fused: models.shufflenet_v2_x1_0(fused=fused), 64),
    (lambda fused: models.preact_resnet18(fused=fused), 64),
], ids=["mobilenet_v1", "se_resnet50", "mobilenet_v3_small", "shufflenet_v2", "preact_resnet18"])
def test_fused_equals_plain(build, image):
    torch.manual_seed(0)
    plain, fused = build(False).double(), build(True).double()
    assert any(type(m).__module__.startswith("cnnkernels.nn") for m in fused.modules())
    same_weights(plain, fused)
    x = torch.randn(2, 3, image, image, dtype=torch.float64)
    for train in (True, False):
        compare_steps(plain, fused, x, train)
    for a, b in zip(plain.buffers(), fused.buffers()):  # running statistics after training steps
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_lenet5_fused_is_the_plain_network():
    torch.manual_seed(0)
    plain, fused = models.lenet5(), models.lenet5(fused=True)
    same_weights(plain, fused)
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(fused(x), plain(x))
