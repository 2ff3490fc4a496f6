"""cnnkernels.convert / revert on torchvision models: same numbers, same keys, report."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnkernels
from cnnkernels.nn import DenseBlock, DepthwiseConv2d, HardSigmoid, HardSwish
from cnnkernels.nn.conv import is_plain_1x1

torchvision = pytest.importorskip("torchvision")


def _assert_train_output_as_close_as_the_originals(original, x, y, y_ref):
    """Train mode: batch statistics of small maps (2x2 at batch 2) amplify any different rounding
    (another BN kernel, a matmul for a conv) beyond a fixed float32 tolerance, for PyTorch's own
    layers too; so the converted output's error against a float64 run of the original must be at
    most 3x the original float32 output's (the criterion of test_convert_fidelity)."""
    reference = copy.deepcopy(original).double()
    torch.manual_seed(0)
    y64 = reference(x.double())

    def error(value):
        return ((value.double() - y64).norm() / y64.norm().clamp_min(1e-300)).item()

    assert error(y) <= 3 * max(error(y_ref), 1e-7), (error(y), error(y_ref))


def check_same_model(original, converted, x, tol=1e-4, gradients=True):
    """Eval outputs, train outputs and (`gradients`) every parameter gradient agree; keys load both
    ways."""
    assert list(converted.state_dict()) == list(original.state_dict())
    converted.load_state_dict(original.state_dict())
    original.load_state_dict(converted.state_dict())
    for mode in (False, True):
        original.train(mode), converted.train(mode)
        torch.manual_seed(0)
        y_ref = original(x)
        torch.manual_seed(0)
        y = converted(x)
        if mode:
            _assert_train_output_as_close_as_the_originals(original, x, y, y_ref)
        else:
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        if mode and gradients:
            y.square().sum().backward()
            y_ref.square().sum().backward()
            # normwise per parameter; gradients that are zero up to rounding (a BN bias before
            # another BN) are compared against the model's largest gradient instead
            scale = max(p.grad.norm() for p in original.parameters())
            for (name, p), p_ref in zip(converted.named_parameters(), original.parameters()):
                error = (p.grad - p_ref.grad).norm()
                assert error <= tol * max(p_ref.grad.norm(), 1e-3 * scale), name


def test_mobilenet_v3_small_activations_and_depthwise():
    torch.manual_seed(0)
    original = torchvision.models.mobilenet_v3_small()
    converted, report = cnnkernels.convert(
        original, exclude=["conv_bn_act", "batchnorm_act", "squeeze_excite", "inverted_residual"],
        report=True)
    assert report.counts() == {"hardswish": 19, "depthwise": 11, "hardsigmoid": 9}
    assert {s.kind for s in report.left_alone} == {"batchnorm", "squeeze_excite", "conv_bn_act",
                                                   "inverted_residual"}
    assert isinstance(converted.features[0][2], HardSwish)
    assert isinstance(converted.features[1].block[0][0], DepthwiseConv2d)
    assert type(original.features[0][2]) is nn.Hardswish  # the original is untouched
    check_same_model(original, converted, torch.randn(2, 3, 64, 64))
    assert "left alone: no activation follows it in a Sequential" in str(report)


def test_mobilenet_v3_small_every_kind_but_conv_bn_act():
    """BN → Hardswish pairs run fused in a BNActSequential that keeps both modules (the Hardswish
    not swapped too)."""
    torch.manual_seed(0)
    original = torchvision.models.mobilenet_v3_small()
    converted, report = cnnkernels.convert(original, exclude=["conv_bn_act"], report=True)
    assert report.counts() == {"batchnorm_act": 23, "hardswish": 1, "depthwise": 11,
                               "squeeze_excite": 9, "inverted_residual": 11}
    # without conv_bn_act the projection stays a Conv2dNormActivation: the add runs after it
    assert type(converted.features[1]) is cnnkernels.nn.InvertedResidual
    assert isinstance(converted.features[1].block[1], cnnkernels.nn.SqueezeExcite)
    assert isinstance(converted.features[0], cnnkernels.nn.BNActSequential)
    assert type(converted.features[0][1]) is nn.BatchNorm2d
    assert type(converted.features[0][2]) is nn.Hardswish
    check_same_model(original.double(), converted.double(), torch.randn(2, 3, 64, 64).double())


def test_densenet121_blocks_become_shared_and_revert():
    torch.manual_seed(0)
    original = torchvision.models.densenet121()
    converted, report = cnnkernels.convert(original, report=True)
    # + norm0 → relu0 and the 3 transitions (BN+ReLU fused, the pool before the conv)
    assert report.counts() == {"densenet": 4, "batchnorm_act": 1, "dense_transition": 3,
                               "max_pool": 1}
    blocks = [m for m in converted.modules() if isinstance(m, DenseBlock)]
    assert [b.num_layers for b in blocks] == [6, 12, 24, 16]
    assert all(b.memory == "shared" for b in blocks)
    # gradients in float64: in float32, 121 batch-statistics BNs over 2x2 maps amplify rounding
    # into errors of up to 1e-2 against float64 (torchvision's own float32 too, see the zoo test)
    x = torch.randn(2, 3, 64, 64)
    check_same_model(original, converted, x, gradients=False)
    check_same_model(copy.deepcopy(original).double(), copy.deepcopy(converted).double(), x.double())
    reverted = cnnkernels.revert(converted)
    assert type(reverted.features.denseblock1).__name__ == "_DenseBlock"
    assert type(reverted.features.transition1).__name__ == "_Transition"
    reverted.eval(), converted.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # the same weights and running statistics; ATen's BN vs our fold
        torch.testing.assert_close(reverted(x), converted(x), rtol=1e-5, atol=1e-6)


def test_include_exclude_and_inplace():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Hardswish(), nn.Hardsigmoid())
    only_hs = cnnkernels.convert(model, include=["hardswish"])
    assert [type(m) for m in only_hs] == [nn.Conv2d, HardSwish, nn.Hardsigmoid]
    no_dw = cnnkernels.convert(model, exclude="depthwise")
    assert [type(m) for m in no_dw] == [nn.Conv2d, HardSwish, HardSigmoid]
    same = cnnkernels.convert(model, inplace=True)
    assert same is model and isinstance(model[0], DepthwiseConv2d)
    back = cnnkernels.revert(model, inplace=True)
    assert back is model and [type(m) for m in model] == [nn.Conv2d, nn.Hardswish, nn.Hardsigmoid]


def test_keeps_device_dtype_mode_and_pickles():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3, padding=1), nn.Hardswish()).double().eval()
    converted = cnnkernels.convert(model)
    assert converted[0].weight.dtype == torch.float64 and not converted[0].training
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(copy.deepcopy(converted)(x), model(x))


def test_unsupported_depthwise_is_left_alone_with_the_reason():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect"))
    converted, report = cnnkernels.convert(model, report=True)
    assert type(converted[0]) is nn.Conv2d
    assert report.left_alone[0].reason == "padding_mode='reflect' (only 'zeros')"


def test_bad_arguments():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        cnnkernels.convert("resnet")
    with pytest.raises(ValueError, match="unknown kind"):
        cnnkernels.convert(nn.Sequential(), include=["gelu"])


def test_batchnorm_act_is_swapped_and_reverts_to_the_same_keys():
    torch.manual_seed(0)
    original = torchvision.models.mobilenet_v2()
    without = cnnkernels.convert(original,
                                 exclude=["conv_bn_act", "batchnorm_act", "inverted_residual"])
    assert not any(isinstance(m, cnnkernels.nn.BatchNormAct2d) for m in without.modules())
    converted, report = cnnkernels.convert(original, exclude=["conv_bn_act"], report=True)
    assert report.counts() == {"batchnorm_act": 35, "depthwise": 17, "inverted_residual": 17}
    assert isinstance(converted.features[0], cnnkernels.nn.BNActSequential)
    assert type(converted.features[0][1]) is nn.BatchNorm2d
    assert type(converted.features[0][2]) is nn.ReLU6
    # float64: 52 train-mode BatchNorms over a batch of 2 amplify float32 rounding differences of
    # the depthwise kernels to ~1e-4 in the first gradients; in float64 they stay at 1e-10
    check_same_model(original.double(), converted.double(), torch.randn(2, 3, 64, 64).double())
    reverted = cnnkernels.revert(converted)
    assert type(reverted.features[0][1]) is nn.BatchNorm2d and type(reverted.features[0][2]) is nn.ReLU6
    assert list(reverted.state_dict()) == list(original.state_dict())


def test_inverted_residual_fuses_the_projection_with_its_residual(dispatched_ops):
    """MobileNetV2's InvertedResidual becomes ours with the same keys: its projection conv, BN and
    residual add run as one pointwise op in eval (no separate add), BN + add as one pass in
    training; the same outputs, gradients and running statistics; revert gives torchvision's
    block back; exclude leaves it alone."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    original = nn.Sequential(InvertedResidual(24, 24, 1, 6), InvertedResidual(24, 32, 2, 6),
                             InvertedResidual(32, 32, 1, 1))  # the last without an expansion
    for module in original.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-1, 1)
                module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 1.5)
    converted, report = cnnkernels.convert(original, report=True)
    assert report.counts() == {"inverted_residual": 3, "conv_bn_act": 5}
    assert all(type(m) is cnnkernels.nn.InvertedResidual for m in converted)
    assert [m.use_res_connect for m in converted] == [True, False, True]
    x = torch.randn(2, 24, 14, 15)
    check_same_model(copy.deepcopy(original).double(), copy.deepcopy(converted).double(),
                     x.double())
    # running statistics after a training step, and the eval path without autograd
    original.train(), converted.train()
    original(x), converted(x)
    for a, b in zip(converted.state_dict().values(), original.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    original.eval(), converted.eval()
    with torch.no_grad():
        converted(x)  # folds each BN's running statistics once (cached until they change)
    with torch.no_grad(), dispatched_ops() as record:
        y = converted(x)
    assert record.ours().count("cnnkernels.pointwise_conv2d.default") == 5, record.names
    assert not any(name.startswith(("aten.add.", "aten.add_.")) for name in record.names), \
        record.names
    with torch.no_grad():
        torch.testing.assert_close(y, original(x), rtol=1e-5, atol=1e-5)
    reverted = cnnkernels.revert(converted)
    assert [type(m) for m in reverted] == [InvertedResidual] * 3
    assert type(reverted[0].conv[3]) is nn.BatchNorm2d and reverted[0]._is_cn is False
    assert {type(m) for m in reverted.modules()} == {type(m) for m in original.modules()}
    assert list(reverted.state_dict()) == list(original.state_dict())
    assert not any(type(m) is cnnkernels.nn.InvertedResidual for m in
                   cnnkernels.convert(original, exclude=["inverted_residual"]).modules())


def test_mobilenet_v3_inverted_residual_adds_the_residual_in_the_projection(dispatched_ops):
    """MobileNetV3's blocks (expand, depthwise, SE, projection; torchvision adds the input after
    its block Sequential): ours pass the residual to the projection's ConvBNAct2d, so eval runs
    no separate add; same keys, outputs and gradients; revert gives torchvision's blocks back."""
    from torchvision.models.mobilenetv3 import InvertedResidual

    torch.manual_seed(0)
    original = nn.Sequential(*torchvision.models.mobilenet_v3_large().features[4:7])
    for module in original.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 1.5)
    converted = cnnkernels.convert(original)
    assert [type(m) for m in converted] == [cnnkernels.nn.InvertedResidual] * 3
    assert [m.use_res_connect for m in converted] == [False, True, True]
    x = torch.randn(2, 24, 16, 17)
    check_same_model(copy.deepcopy(original).double(), copy.deepcopy(converted).double(),
                     x.double())
    original.eval(), converted.eval()
    with torch.no_grad():
        converted(x)  # folds the running statistics once
        with dispatched_ops() as record:
            y = converted(x)
        torch.testing.assert_close(y, original(x), rtol=1e-5, atol=1e-5)
    assert not any(name.startswith(("aten.add.", "aten.add_.")) for name in record.names), \
        record.names
    reverted = cnnkernels.revert(converted)
    assert [type(m) for m in reverted] == [InvertedResidual] * 3
    assert {type(m) for m in reverted.modules()} == {type(m) for m in original.modules()}
    assert list(reverted.state_dict()) == list(original.state_dict())


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "resnet18", "densenet121",
                                  "timm:resnet50", "timm:densenet121"])
def test_frozen_batchnorms_stay_frozen_through_convert_and_revert(name):
    """Fine-tuning with frozen BatchNorms (model.train(), every BN .eval()): the blocks convert
    replaces (InvertedResidual, ResidualBlock, DenseTransition) keep each layer's own mode, so the
    BNs keep using and not updating their running statistics; DenseNet blocks, which run in one
    mode, are left alone (with the reason); revert (timm's classes too) keeps them frozen."""
    original = build(name).train()
    for module in original.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    converted = cnnkernels.convert(original)

    def norms(model):
        return [m for m in model.modules()
                if isinstance(m, (nn.BatchNorm2d, cnnkernels.nn.BatchNormAct2d))]

    assert converted.training and len(norms(converted)) == len(norms(original))
    assert not any(m.training for m in norms(converted))
    x = torch.randn(2, 3, 64, 64)
    before = copy.deepcopy(converted.state_dict())
    torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-4)
    for key, value in converted.state_dict().items():  # no running statistic moved
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    reverted = cnnkernels.revert(converted)
    assert reverted.training and not any(m.training for m in norms(reverted))
    if "densenet" in name:
        _, report = cnnkernels.convert(original, report=True)
        assert {s.reason for s in report.left_alone if s.kind == "densenet"} == {
            "its layers are not all in the block's train/eval mode (frozen BatchNorms?)"}


@pytest.mark.parametrize("block", ["mobilenet_v2", "mobilenet_v3", "basic", "bottleneck"])
def test_residual_blocks_under_autocast_with_a_float32_input(block):
    """A float32 block input under bfloat16 autocast, in training and in eval, with and without
    autograd: the residual is added as torchvision adds it, so the output has torchvision's dtype
    (MobileNetV2's x + out: float32; MobileNetV3's and ResNet's in-place += : bfloat16) and its
    values within bfloat16 rounding."""
    from torchvision.models import mobilenetv2, mobilenetv3, resnet

    torch.manual_seed(0)
    module, channels = {
        "mobilenet_v2": lambda: (mobilenetv2.InvertedResidual(16, 16, 1, 4), 16),
        "mobilenet_v3": lambda: (torchvision.models.mobilenet_v3_small().features[5], 40),
        "basic": lambda: (resnet.BasicBlock(16, 16), 16),
        "bottleneck": lambda: (resnet.Bottleneck(64, 16), 64)}[block]()
    original = nn.Sequential(module)
    converted = cnnkernels.convert(original)
    assert type(converted[0]) is not type(original[0])
    x = torch.randn(2, channels, 9, 9)
    for train, grad in ((True, True), (False, True), (False, False)):
        original.train(train), converted.train(train)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = original(x), converted(x)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)


def test_inverted_residual_calls_hooks_on_its_projection():
    """A hook on the V2 projection conv (pruning's pre-hook, a feature tap) still runs in eval
    without autograd, where the projection would otherwise be one fused op."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    converted = cnnkernels.convert(nn.Sequential(InvertedResidual(16, 16, 1, 4))).eval()
    seen = []
    converted[0].conv[2].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        converted(torch.randn(2, 16, 9, 9))
    assert seen == [torch.Size([2, 16, 9, 9])]


def test_inverted_residual_keeps_hooks_on_its_sequential():
    """A forward hook on the block's conv Sequential sees its output, as in torchvision."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    original = nn.Sequential(InvertedResidual(16, 16, 1, 4)).eval()
    converted = cnnkernels.convert(original)
    seen = []
    for model in (original, converted):
        model[0].conv.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-5, atol=1e-5)
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], seen[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_blocks_fuse_bn_relu_and_residual(name):
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(num_classes=10)
    converted, report = cnnkernels.convert(original, include=["resnet", "batchnorm_act"],
                                           report=True)
    blocks = 8 if name == "resnet18" else 16
    assert report.counts() == {"resnet": blocks}
    block = converted.layer1[0]
    assert isinstance(block, cnnkernels.nn.ResidualBlock)
    # the very BatchNorms, run fused with the ReLU (and the residual add) by the block
    assert all(type(getattr(block, f"bn{i}")) is nn.BatchNorm2d for i in range(1, block.depth + 1))
    check_same_model(original.double(), converted.double(), torch.randn(2, 3, 64, 64).double())
    reverted = cnnkernels.revert(converted)
    assert type(reverted.layer1[0]) is type(original.layer1[0])
    assert type(reverted.layer1[0].bn1) is nn.BatchNorm2d
    assert list(reverted.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 64, 64).double()
    reverted.eval(), original.eval()
    torch.testing.assert_close(reverted(x), original(x))


def test_bottleneck_runs_its_1x1_convs_through_the_pointwise_op(dispatched_ops):
    """A converted Bottleneck on NCHW CPU input with 28x28 planes or more: conv1 and conv3 (1x1)
    are our pointwise op (BLAS matmuls, forward and backward), conv2 (3x3) stays torch's; outputs
    and every gradient equal the original's in training and eval."""
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("needs the compiled CPU kernels")
    from torchvision.models.resnet import Bottleneck

    torch.manual_seed(0)
    original = nn.Sequential(Bottleneck(64, 16)).double()
    converted = cnnkernels.convert(original, include=["resnet"])
    assert isinstance(converted[0], cnnkernels.nn.ResidualBlock)
    x = torch.randn(2, 64, 28, 30).double()
    with dispatched_ops() as record:
        converted(x)
    assert record.ours().count("cnnkernels.pointwise_conv2d.default") == 2, record.ours()
    check_same_model(original, converted, x)


def test_sync_batchnorm_runs_fused_with_the_default_group():
    from cnnkernels.nn.batchnorm import process_group_of
    from cnnkernels.ops.batch_norm_act import WORLD

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU())
    converted = cnnkernels.convert(model, include=["batchnorm_act"])
    assert isinstance(converted, cnnkernels.nn.BNActSequential)
    assert type(converted[1]) is nn.SyncBatchNorm
    assert process_group_of(converted[1]) == WORLD
    assert list(converted.state_dict()) == list(model.state_dict())


# Issue 7's list: what a default convert() swaps in each model (random weights). Models with
# little of ours to run (SqueezeNet: no BatchNorm; GoogLeNet: BN → F.relu inside forward; only
# their max pools) must still convert to an identical model.
ZOO = {
    "mobilenet_v2": {"conv_bn_act": 35, "inverted_residual": 17},
    "mobilenet_v3_large": {"conv_bn_act": 46, "inverted_residual": 15, "squeeze_excite": 8,
                           "hardswish": 1},
    "mobilenet_v3_small": {"conv_bn_act": 34, "inverted_residual": 11, "squeeze_excite": 9,
                           "hardswish": 1},
    "resnet18": {"resnet": 8, "max_pool": 1},
    "resnet50": {"resnet": 16, "max_pool": 1},
    "resnext50_32x4d": {"resnet": 16, "max_pool": 1},
    "densenet121": {"batchnorm_act": 1, "densenet": 4, "dense_transition": 3, "max_pool": 1},
    "squeezenet1_1": {"max_pool": 3},
    "shufflenet_v2_x1_0": {"conv_bn_act": 2, "batchnorm_act": 35, "depthwise": 19, "max_pool": 1},
    "mnasnet1_0": {"batchnorm_act": 35, "depthwise": 17},  # plain Sequentials, not Conv2dNormActivation
    "efficientnet_b0": {"conv_bn_act": 16, "depthwise": 16},  # SiLU: only the conv → BN pairs
    "convnext_tiny": {"depthwise": 18},
    "regnet_y_400mf": {"conv_bn_act": 53, "squeeze_excite": 16},
    "vgg11_bn": {"batchnorm_act": 8, "max_pool": 5},
    "googlenet": {"max_pool": 13},
    "timm:mobilenetv3_large_100": {"batchnorm_act": 46, "depthwise": 15, "squeeze_excite": 8,
                                   "hardswish": 1},
    "timm:efficientnet_b0": {"batchnorm_act": 16, "depthwise": 16},
    "timm:densenet121": {"batchnorm_act": 2, "densenet": 4, "dense_transition": 3, "max_pool": 1},
    "timm:resnet50": {"resnet": 16, "max_pool": 1},
}


def build(name):
    torch.manual_seed(0)
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        return timm.create_model(name[len("timm:"):], pretrained=False)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(**kwargs)


@pytest.mark.parametrize("name", list(ZOO))
def test_model_zoo_converts_to_the_same_model(name):
    """Outputs in eval and train mode within float32 tolerance; every gradient in float64 (at
    batch 2, PyTorch's own float32 gradients of these nets differ from its float64 ones by up to 2%:
    batch statistics of 2x2 maps and ReLU masks flipping by one rounding; no float32 tolerance
    separates that from a bug); the same keys both ways; revert gives the original classes back."""
    original = build(name)
    converted, report = cnnkernels.convert(original, report=True)
    assert report.counts() == ZOO[name], str(report)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    check_same_model(original, converted, x, gradients=False)
    check_same_model(copy.deepcopy(original).double(), copy.deepcopy(converted).double(), x.double())
    reverted = cnnkernels.revert(converted)
    assert list(reverted.state_dict()) == list(original.state_dict())
    assert {type(m) for m in reverted.modules()} == {type(m) for m in original.modules()}
    converted.eval(), reverted.eval()
    with torch.no_grad():  # the same weights and running statistics: the same eval outputs
        torch.testing.assert_close(reverted(x), converted(x), rtol=1e-4, atol=1e-5)


def test_timm_layers_become_ours_and_revert_to_timm_classes():
    """timm's BatchNormAct2d, SqueezeExcite, DenseBlock and Bottleneck become ours (timm's keys
    kept), and revert rebuilds timm's classes on the converted model's device and dtype."""
    pytest.importorskip("timm")
    converted = cnnkernels.convert(build("timm:mobilenetv3_large_100"))
    se = [m for m in converted.modules() if isinstance(m, cnnkernels.nn.SqueezeExcite)]
    assert se and all(hasattr(m, "conv_reduce") and hasattr(m, "conv_expand") for m in se)
    dense = cnnkernels.convert(build("timm:densenet121"))
    assert sum(isinstance(m, DenseBlock) and m.memory == "shared" for m in dense.modules()) == 4
    pickled = io.BytesIO()
    torch.save(copy.deepcopy(dense.double()), pickled)  # the revert templates copy and pickle too
    reverted = cnnkernels.revert(dense)
    params = list(reverted.parameters())
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in params)
    names = {type(m).__name__ for m in reverted.modules() if type(m).__module__.startswith("timm.")}
    assert {"DenseBlock", "DenseLayer", "BatchNormAct2d", "DenseTransition"} <= names
    assert list(reverted.state_dict()) == list(build("timm:densenet121").state_dict())


def test_timm_dense_transition_with_anti_aliasing_is_left_alone():
    pytest.importorskip("timm")
    from timm.models.densenet import DenseTransition as TimmTransition
    from timm.layers import BlurPool2d

    transition = nn.Sequential(TimmTransition(16, 8, aa_layer=BlurPool2d))
    _, report = cnnkernels.convert(transition, report=True)
    assert [s.reason for s in report.left_alone if s.kind == "dense_transition"] == [
        "its pool is not a 2x2 average pool of stride 2"], str(report)


def test_timm_layers_that_compute_something_else_are_left_alone_with_the_reason():
    timm = pytest.importorskip("timm")
    _, report = cnnkernels.convert(timm.create_model("seresnet50", pretrained=False), report=True)
    assert {s.reason for s in report.left_alone if s.kind == "resnet"} == {"it has se (SEModule)"}
    _, report = cnnkernels.convert(timm.create_model("efficientnet_b0", pretrained=False),
                                   report=True)
    assert {s.reason for s in report.left_alone if s.kind == "squeeze_excite"} == {
        "activation SiLU is not one of ours"}


def test_timm_batchnorm_act_with_an_unknown_activation_is_left_alone():
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_b0", pretrained=False)
    _, report = cnnkernels.convert(model, report=True)
    reasons = {s.reason for s in report.left_alone if s.kind == "batchnorm_act"}
    assert reasons == {"activation SiLU is not one of ours"}


def test_conv_bn_act_swaps_conv2d_norm_activation_and_fuses_in_eval():
    """torchvision's Conv2dNormActivation (conv → BN → act) becomes one ConvBNAct2d with the same
    keys; in eval its 1x1 and depthwise convs run with the BatchNorm folded into their epilogue."""
    torch.manual_seed(0)
    original = torchvision.models.mobilenet_v2()
    assert not any(isinstance(m, cnnkernels.nn.ConvBNAct2d)
                   for m in cnnkernels.convert(original, exclude=["conv_bn_act"]).modules())
    converted, report = cnnkernels.convert(original, report=True)  # on by default
    # stem, 16 expansions, 17 depthwise, last 1x1; the 17 projections (conv, BN inside the block's
    # Sequential with the other layers) are InvertedResidual's (test_inverted_residual_...)
    assert report.counts() == {"conv_bn_act": 35, "inverted_residual": 17}
    fused = [m for m in converted.modules() if isinstance(m, cnnkernels.nn.ConvBNAct2d)]
    assert sum(is_plain_1x1(m.conv) for m in fused) == 17
    assert sum(m.conv.groups == m.conv.in_channels > 1 for m in fused) == 17
    assert list(converted.state_dict()) == list(original.state_dict())
    check_same_model(original.double(), converted.double(), torch.randn(2, 3, 64, 64).double())
    # eval without autograd: the folded epilogue path (its own kernels), same outputs
    original.eval(), converted.eval()
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-10, atol=1e-10)
    original.float(), converted.float()
    with torch.no_grad():
        torch.testing.assert_close(converted(x.float()), original(x.float()), rtol=1e-4, atol=1e-4)
    reverted = cnnkernels.revert(converted)
    assert not any(isinstance(m, cnnkernels.nn.ConvBNAct2d) for m in reverted.modules())
    assert type(reverted.features[0]) is type(original.features[0])  # Conv2dNormActivation
    assert list(reverted.state_dict()) == list(original.state_dict())


def test_conv_bn_act_module_matches_conv_bn_act_in_every_mode():
    from cnnkernels.nn import ConvBNAct2d

    torch.manual_seed(0)
    for k, groups, stride, act, bias in ((1, 1, 1, nn.ReLU6(), False), (1, 2, 2, nn.Hardswish(), True),
                                        (3, 8, 2, nn.ReLU(), False), (3, 1, 1, None, True)):
        conv = nn.Conv2d(8, 16 if groups != 8 else 8, k, stride, k // 2, groups=groups, bias=bias)
        bn = nn.BatchNorm2d(conv.out_channels)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        reference = nn.Sequential(conv, bn, act) if act is not None else nn.Sequential(conv, bn)
        ours = ConvBNAct2d.from_modules(conv, bn, act)
        assert list(ours.state_dict()) == list(reference.state_dict())
        x = torch.randn(2, 8, 11, 10)
        reference.eval(), ours.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
        reference.train(), ours.train()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = reference(xa), ours(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        ya.sum().backward(), yb.sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.bn.running_var, reference[1].running_var)
        back = ours.to_modules()
        assert list(back.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize("k, groups", [(1, 1), (1, 8), (3, 8), (3, 1)],
                         ids=["pointwise", "depthwise1x1", "depthwise3x3", "dense3x3"])
def test_conv_bn_act_adds_a_residual_before_the_activation(k, groups):
    """ConvBNAct2d(x, residual) = act(BN(conv(x)) + residual) in eval (fused or not: a 1x1
    depthwise conv takes the pointwise op, whose epilogue has the residual; the depthwise op's has
    none) and in training, gradients to the residual included."""
    from cnnkernels.nn import ConvBNAct2d

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, k, 1, k // 2, groups=groups, bias=False)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    ours = ConvBNAct2d.from_modules(conv, bn, nn.ReLU())
    x, r = torch.randn(2, 8, 9, 10), torch.randn(2, 8, 9, 10)
    conv.eval(), bn.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, r), F.relu(bn(conv(x)) + r), rtol=1e-5, atol=1e-5)
    conv.train(), bn.train(), ours.train()
    ra, rb = r.clone().requires_grad_(), r.clone().requires_grad_()
    want, got = F.relu(bn(conv(x)) + ra), ours(x, rb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.square().sum().backward(), got.square().sum().backward()
    torch.testing.assert_close(rb.grad, ra.grad, rtol=1e-4, atol=1e-5)


def test_conv_bn_act_training_on_the_cpu_runs_its_1x1_conv_as_matmuls(dispatched_ops):
    """Training a 1x1 ConvBNAct2d on NCHW CPU input: the conv is our pointwise op (batched BLAS
    GEMMs forward and backward, no ATen convolution); output, every gradient and the running
    statistics equal torch's conv → BN → act."""
    from cnnkernels.nn import ConvBNAct2d

    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("needs the compiled CPU kernels")
    torch.manual_seed(0)
    conv, bn, act = nn.Conv2d(24, 40, 1, bias=False), nn.BatchNorm2d(40), nn.ReLU()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    reference = nn.Sequential(conv, bn, act).train()
    ours = ConvBNAct2d.from_modules(conv, bn, act).train()
    x = torch.randn(3, 24, 28, 30)  # planes of 28x28 and more (ops.pointwise_conv2d.matmul_applies)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = reference(xa)
    with dispatched_ops() as record:
        yb = ours(xb)
        grad = torch.randn(ya.shape)
        yb.backward(grad)
    ya.backward(grad)
    assert "cnnkernels.pointwise_conv2d.default" in record.ours(), record.names
    assert not any("convolution" in op for op in record.names), record.names
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    for a, b in ((xb.grad, xa.grad), (ours.conv.weight.grad, conv.weight.grad),
                 (ours.bn.weight.grad, bn.weight.grad), (ours.bn.bias.grad, bn.bias.grad),
                 (ours.bn.running_mean, bn.running_mean), (ours.bn.running_var, bn.running_var)):
        # sums over 2,520 pixels of values up to ~360: rounding scales with the largest
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item() + 1e-5)


def test_run_conv_calls_the_module_when_it_has_hooks():
    """A pruned conv recomputes its weight in a forward pre-hook and a user hook taps features:
    then the module itself runs (with its hooks), not the pointwise op on a stale weight."""
    import torch.nn.utils.prune as prune
    from cnnkernels.nn.conv import run_conv

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 1, bias=False)
    prune.l1_unstructured(conv, "weight", amount=0.5)
    seen = []
    conv.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(2, 8, 28, 29)
    torch.testing.assert_close(run_conv(conv, x), F.conv2d(x, conv.weight))
    assert seen == [(2, 6, 28, 29)]


@pytest.mark.triton
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_conv_bn_act_training_on_triton_takes_bn_statistics_from_the_gemm(layout, dispatched_ops):
    """A 1x1 ConvBNAct2d in training on the Triton backend: the GEMM's epilogue computes the
    batch statistics, BatchNorm does not read the output for them; outputs, gradients and running
    statistics still equal torch's conv → BN → act."""
    from cnnkernels.nn import ConvBNAct2d

    if not cnnkernels.backend.triton_interpreted():
        pytest.skip("runs the Triton kernels under the interpreter (no GPU here)")
    torch.manual_seed(0)
    conv, bn, act = nn.Conv2d(24, 40, 1, 2, bias=True), nn.BatchNorm2d(40), nn.Hardswish()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    reference = nn.Sequential(conv, bn, act).train()
    ours = ConvBNAct2d.from_modules(conv, bn, act).train()
    x = (torch.randn(3, 24, 13, 15) * 2 + 5).contiguous(memory_format=layout)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = reference(xa)
    with cnnkernels.use_backend("triton"):
        with dispatched_ops() as record:
            yb = ours(xb)
        grad = torch.randn(ya.shape)
        ya.backward(grad), yb.backward(grad)
    assert "cnnkernels.pointwise_conv2d_triton.default" in record.ours(), record.names
    assert not any("stats" in op for op in record.ours()), record.names
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    assert yb.is_contiguous(memory_format=layout)
    for a, b in ((xb.grad, xa.grad), (ours.conv.weight.grad, conv.weight.grad),
                 (ours.conv.bias.grad, conv.bias.grad), (ours.bn.weight.grad, bn.weight.grad),
                 (ours.bn.bias.grad, bn.bias.grad), (ours.bn.running_mean, bn.running_mean),
                 (ours.bn.running_var, bn.running_var)):
        # inputs of mean 5: BN's backward amplifies float32 rounding (either side's) ~100x
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_converted_model_under_autocast_channels_last_deepcopy_and_pickle(tmp_path):
    """bf16 autocast on the CPU (our layers see bf16 activations with float32 parameters),
    channels_last inputs, copy.deepcopy and torch.save / torch.load of the whole module."""
    import copy

    torch.manual_seed(0)
    original = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    converted = cnnkernels.convert(original)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = original(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed_ours, mixed_theirs = converted(x), original(x)
    assert mixed_ours.dtype == mixed_theirs.dtype == torch.bfloat16
    scale = expected.abs().max()
    # both bf16 runs land within bf16 rounding of the float32 output, ours no farther than torch's
    ours_error = (mixed_ours.float() - expected).abs().max() / scale
    torch_error = (mixed_theirs.float() - expected).abs().max() / scale
    assert ours_error < max(3 * torch_error, 0.05), (ours_error, torch_error)
    copied = copy.deepcopy(converted)
    torch.save(converted, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        reference = converted(x)
        torch.testing.assert_close(copied(x), reference)
        torch.testing.assert_close(loaded(x), reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "resnet18", "densenet121"])
def test_converted_model_trains_under_autocast(name, dtype):
    """A training step under CPU autocast (our SE, DenseNet block, inverted residual and ResNet
    blocks see activations in autocast's dtype with float32 parameters): it runs, every parameter
    gets a float32 gradient, and the output and gradients are as close to a float64 step as
    PyTorch's own autocast step is (batch statistics of small maps make both far from it)."""
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(num_classes=10).train()
    converted = cnnkernels.convert(original)
    x = torch.randn(4, 3, 64, 64)
    reference = copy.deepcopy(original).double()
    want = reference(x.double())
    want.square().sum().backward()
    want_grads = [p.grad for p in reference.parameters()]

    def errors(model):
        with torch.autocast("cpu", dtype=dtype):
            y = model(x)
        assert y.dtype == dtype
        y.float().square().sum().backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        out = ((y.double() - want).norm() / want.norm()).item()
        grads = (sum((p.grad.double() - g).norm() ** 2 for p, g in
                     zip(model.parameters(), want_grads)) ** 0.5 /
                 sum(g.norm() ** 2 for g in want_grads) ** 0.5).item()
        return out, grads

    (ours_out, ours_grads), (torch_out, torch_grads) = errors(converted), errors(original)
    assert ours_out <= 1.5 * torch_out + 1e-3, (ours_out, torch_out)
    assert ours_grads <= 1.5 * torch_grads + 1e-3, (ours_grads, torch_grads)


def _train_step(model, x):
    torch.manual_seed(0)  # the same dropout masks
    y = model(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_converted_model_under_torch_compile(backend):
    """torch.compile of a converted model (fake kernels, autograd registrations and, with
    inductor, generated code around our ops) gives the eager converted model's outputs and
    gradients. aot_eager on a whole MobileNetV3-Small; inductor, which takes minutes to compile
    a whole net on 2 cores, on one inverted-residual block with SE."""
    torch.manual_seed(0)
    if backend == "aot_eager":
        model = torchvision.models.mobilenet_v3_small(num_classes=10)
        x = torch.randn(2, 3, 64, 64)
    else:
        # expand, dw 5x5, SE, project + residual (convert replaces children, not the root)
        model = nn.Sequential(torchvision.models.mobilenet_v3_small().features[4])
        x = torch.randn(2, 24, 16, 16)
    converted = cnnkernels.convert(model)
    compiled = torch.compile(converted, backend=backend)
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), converted(x), rtol=1e-4, atol=1e-5)
    converted.train()
    y_compiled, grads_compiled = _train_step(compiled, x)
    y_eager, grads_eager = _train_step(converted, x)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-4, atol=1e-5)
    # (gradients that are zero up to rounding, a BN bias before another BN, against the largest)
    scale = max(g.abs().max().item() for g in grads_eager)
    for got, want in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_max_pool_equals_torch_to_the_bit_with_ties(ceil_mode, dtype):
    """cnnkernels.nn.MaxPool2d pools NCHW CPU inputs in channels_last: the same values, and the
    same gradients even where windows tie (zeros after a ReLU), because both ATen kernels keep the
    first maximum of each window; NCHW in, NCHW out and NCHW gradient."""
    from cnnkernels.nn import MaxPool2d

    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 5, 17, 19)).to(dtype)
    x[0, 1] = 0.0  # a whole plane of ties
    reference = nn.MaxPool2d(3, 2, 1, ceil_mode=ceil_mode)
    ours = MaxPool2d.from_torch(reference)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = reference(xa), ours(xb)
    grad = torch.randn(ya.shape).to(dtype)
    ya.backward(grad), yb.backward(grad)
    assert torch.equal(ya, yb) and yb.is_contiguous()
    assert torch.equal(xa.grad, xb.grad) and xb.grad.is_contiguous()
    assert type(ours.to_torch()) is nn.MaxPool2d
    # channels_last inputs, return_indices: torch's own path
    xc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours(xc), reference(xc))
    with_indices = MaxPool2d(2, return_indices=True)
    torch.testing.assert_close(with_indices(x), torch.nn.functional.max_pool2d(x, 2, return_indices=True))
