"""Memory-efficient DenseNet: the three memory modes agree, shared mode saves what it promises,
the models match torchvision's, and the memory profiler / command line work."""
import copy

import pytest
import torch
import torch.nn.functional as F

from cnnkernels import models, profile
from cnnkernels.nn import DenseBlock, DenseLayer

MODES = ["naive", "checkpoint", "shared"]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def make_blocks(drop_rate=0.0, dtype=torch.float32, momentum=0.1, num_layers=4, in_channels=10,
                growth_rate=6, bn_size=2):
    """One block per mode with the same weights (random affine BN parameters and statistics)."""
    torch.manual_seed(0)
    reference = DenseBlock(num_layers, in_channels, growth_rate, bn_size, drop_rate, memory="naive")
    for name, tensor in reference.state_dict().items():
        if name.endswith(("weight", "bias", "running_mean")):
            tensor.copy_(torch.randn_like(tensor) * 0.5 + (1.0 if name.endswith("norm1.weight") else 0))
        elif name.endswith("running_var"):
            tensor.copy_(torch.rand_like(tensor) + 0.5)
    blocks = {}
    for mode in MODES:
        block = DenseBlock(num_layers, in_channels, growth_rate, bn_size, drop_rate, memory=mode)
        block.load_state_dict(reference.state_dict())
        for module in block.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = momentum
        blocks[mode] = block.to(dtype)
    return blocks


def train_steps(block, inputs, seed=1):
    """Several training steps; returns outputs, input gradients, parameter gradients, buffers."""
    torch.manual_seed(seed)  # the same dropout masks in every mode
    outputs, input_grads = [], []
    for step, x0 in enumerate(inputs):
        x = x0.clone().requires_grad_()
        y = block(x)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(step)).to(y.dtype)
        y.backward(g)
        outputs.append(y.detach())
        input_grads.append(x.grad)
    params = {n: p.grad.clone() for n, p in block.named_parameters()}
    buffers = {n: b.clone() for n, b in block.named_buffers()}
    return outputs, input_grads, params, buffers


def tolerances(dtype, gradients=False):
    """"shared" mode computes BatchNorm with cnnkernels' kernels (statistics per chunk of channels,
    fused BN+ReLU passes), the other modes with ATen's: the same values up to float rounding.
    Gradients sum many products, so their tolerance is relative to the tensor's largest value
    (see close)."""
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4) if gradients else dict(rtol=1e-5, atol=1e-5)
    return {torch.float64: dict(rtol=1e-10, atol=1e-10),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]


def close(actual, expected, rtol, atol, msg=None):
    """assert_close with atol scaled by the expected tensor's largest magnitude (when above 1):
    a float sum of products of size M is off by about eps·M whatever the size of one element."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=msg)


def assert_same_training(a, b, dtype):
    tol, grad_tol = tolerances(dtype), tolerances(dtype, gradients=True)
    for ya, yb in zip(a[0], b[0]):
        torch.testing.assert_close(yb, ya, **tol)
    for ga, gb in zip(a[1], b[1]):
        close(gb, ga, **grad_tol)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        close(b[2][name], a[2][name], **grad_tol, msg=lambda m: f"{name}: {m}")
    for name in a[3]:
        torch.testing.assert_close(b[3][name], a[3][name], **tol, msg=lambda m: f"{name}: {m}")


def _relative_errors(result, exact):
    """Normwise relative error of every output, input gradient, parameter gradient and buffer."""
    pairs = list(zip(result[0] + result[1], exact[0] + exact[1]))
    pairs += [(result[2][n], exact[2][n]) for n in exact[2]]
    pairs += [(result[3][n], exact[3][n]) for n in exact[3] if exact[3][n].is_floating_point()]
    return [((a.double() - e).norm() / e.norm().clamp_min(1e-30)).item() for a, e in pairs]


def assert_as_accurate(actual, expected, exact, factor=3.0, total_factor=1.5, floor=1e-3):
    """`actual` is as close to the float64 `exact` result as `expected` is: summed over every
    tensor within `total_factor`, and tensor by tensor within `factor` (plus an absolute floor for
    values both get essentially right). In bfloat16 both are 5-20% off in the input gradients,
    and which side lands closer on a single small tensor depends on the CPU: on a Zen 3 (AVX2)
    VM one BN bias gradient of ours was 2.1x ATen's error (0.035 vs 0.017) while the sum over all
    tensors was 0.99x; on Zen 4 (AVX-512 bf16) every tensor was within 2x."""
    ours, theirs = _relative_errors(actual, exact), _relative_errors(expected, exact)
    for a, e in zip(ours, theirs):
        assert a <= factor * e + floor, (a, e)
    assert sum(ours) <= total_factor * sum(theirs) + floor, (sum(ours), sum(theirs))


def inputs_for(layout, dtype, steps=3, shape=(3, 10, 7, 9)):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).contiguous(
        memory_format=LAYOUTS[layout]) for _ in range(steps)]


@pytest.mark.parametrize("mode", ["checkpoint", "shared"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("drop_rate", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_modes_agree_over_training_steps(mode, layout, drop_rate, dtype):
    blocks = make_blocks(drop_rate, dtype)
    inputs = inputs_for(layout, dtype)
    expected = train_steps(blocks["naive"], inputs)
    actual = train_steps(blocks[mode], inputs)
    if dtype == torch.bfloat16 and mode == "shared":
        # bfloat16 BN+ReLU rounds once (cnnkernels) or twice (ATen): a last-bit difference in an
        # early layer moves later ones by bf16 steps, so both are held to the float64 result
        exact = train_steps(make_blocks(drop_rate, torch.float64)["naive"],
                            [x.double() for x in inputs])
        assert_as_accurate(actual, expected, exact)
    else:
        assert_same_training(expected, actual, dtype)
    assert actual[0][0].is_contiguous(memory_format=LAYOUTS[layout])
    # running statistics moved exactly once per forward
    for name, value in actual[3].items():
        if name.endswith("num_batches_tracked"):
            assert value.item() == len(inputs)


@pytest.mark.parametrize("mode", ["checkpoint", "shared"])
def test_cumulative_average_momentum_none(mode):
    blocks = make_blocks(momentum=None)
    inputs = inputs_for("nchw", torch.float32, steps=4)
    assert_same_training(train_steps(blocks["naive"], inputs), train_steps(blocks[mode], inputs),
                         torch.float32)


@pytest.mark.parametrize("mode", ["checkpoint", "shared"])
def test_shared_mode_updates_running_stats_once_like_batchnorm(mode):
    """Against nn.BatchNorm2d itself: the first layer's norm1 sees the block input unchanged.
    (Checkpoint mode runs ATen's BatchNorm: to the bit. Shared mode computes the statistics with
    cnnkernels' kernel: to float rounding; a second update would be off by percents.)"""
    blocks = make_blocks()
    block = blocks[mode]
    norm = copy.deepcopy(block.denselayer1.norm1)
    x = inputs_for("nchw", torch.float32, steps=1)[0].requires_grad_()
    block(x).sum().backward()
    norm(x.detach())
    tol = dict(rtol=0, atol=0) if mode == "checkpoint" else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(block.denselayer1.norm1.running_mean, norm.running_mean, **tol)
    torch.testing.assert_close(block.denselayer1.norm1.running_var, norm.running_var, **tol)
    assert block.denselayer1.norm1.num_batches_tracked.item() == 1


@pytest.mark.parametrize("mode", ["checkpoint", "shared"])
def test_two_forwards_before_one_backward(mode):
    blocks = make_blocks(drop_rate=0.2)
    x1, x2 = inputs_for("nchw", torch.float32, steps=2)
    results = {}
    for name in ("naive", mode):
        block = blocks[name]
        torch.manual_seed(3)
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        y1, y2 = block(a), block(b)
        (y1.square().sum() + (3 * y2).sum()).backward()
        results[name] = (y1.detach(), y2.detach(), a.grad, b.grad,
                         {n: p.grad.clone() for n, p in block.named_parameters()})
    expected, actual = results["naive"], results[mode]
    for e, a in zip(expected[:4], actual[:4]):
        close(a, e, rtol=1e-4, atol=1e-4)
    for name in expected[4]:
        close(actual[4][name], expected[4][name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["checkpoint", "shared"])
def test_eval_mode_with_and_without_grad(mode):
    blocks = make_blocks(drop_rate=0.3)
    x = inputs_for("nchw", torch.float32, steps=1)[0]
    for block in blocks.values():
        block.eval()
    with torch.no_grad():
        expected = blocks["naive"](x)
        # the shared block convolves in channels_last on the CPU, naive in NCHW: oneDNN's kernels
        # for the two layouts sum in different orders (1e-5 apart on a Zen 3 AVX2 CPU)
        torch.testing.assert_close(blocks[mode](x), expected, rtol=1e-5, atol=1e-5)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    blocks["naive"](a).sum().backward()
    blocks[mode](b).sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)


def test_no_grad_training_forward_updates_stats_and_saves_nothing():
    blocks = make_blocks()
    x = inputs_for("nchw", torch.float32, steps=1)[0]
    with torch.no_grad():
        expected = blocks["naive"](x)
        actual = blocks["shared"](x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(blocks["naive"].named_buffers(), blocks["shared"].buffers()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        assert profile.saved_activation_bytes(blocks["shared"], x) == 0


def test_gradcheck_shared_block_float64():
    """Input and every parameter gradient of the shared block's autograd Function."""
    from torch.func import functional_call

    torch.manual_seed(0)
    block = DenseBlock(2, 3, 2, bn_size=2, drop_rate=0.0, memory="shared").double()
    names = [name for name, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return functional_call(block, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_saved_activation_bytes_orders_the_modes():
    x = torch.randn(8, 3, 32, 32)
    saved = {}
    for mode in MODES:
        torch.manual_seed(0)
        saved[mode] = profile.saved_activation_bytes(models.densenet_bc(40, 12, memory=mode), x)
    assert saved["shared"] < saved["checkpoint"] < saved["naive"]
    assert saved["shared"] <= 0.35 * saved["naive"]


def test_saved_activation_bytes_counts_what_autograd_keeps():
    lin = torch.nn.Linear(100, 100)  # saves its input (the caller's, not counted) only
    x = torch.randn(10, 100)
    assert profile.saved_activation_bytes(lin, x) == 0
    seq = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.Tanh())
    # Linear's output feeds tanh (saves its output, which is the model output: excluded), and
    # Linear saves x (not created inside): nothing of the model's own is kept but tanh's output.
    assert profile.saved_activation_bytes(seq, x) == 0
    seq = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.Tanh(), torch.nn.Linear(50, 5))
    assert profile.saved_activation_bytes(seq, x) == 10 * 50 * 4  # tanh output, saved by both


def test_peak_memory_cpu_sees_a_large_temporary():
    if not profile.return_freed_cpu_memory():
        pytest.skip("needs glibc")

    def step():
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, freed at once
        return float(big[0])

    peak = profile.peak_memory(step, "cpu")
    assert 48 * 2**20 <= peak <= 96 * 2**20


def test_densenet121_matches_torchvision_both_ways():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    theirs = torchvision.models.densenet121()
    for mode in MODES:
        ours = models.densenet121(memory=mode)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())
        assert sum(p.numel() for p in ours.parameters()) == 7_978_856
        x = torch.randn(2, 3, 64, 64)
        theirs.eval(), ours.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # Training mode: outputs and every gradient, in float64 (the same function: ~1e-10), and in
    # float32 as accurate as torchvision's (measured against float64: 121 layers of BatchNorm
    # over a batch of 2 amplify rounding into percents in some gradients, for both).
    ours = models.densenet121(memory="shared")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = {}
    for name, model in (("ours", ours), ("theirs", theirs),
                        ("ours64", copy.deepcopy(ours).double()),
                        ("theirs64", copy.deepcopy(theirs).double())):
        model.train()
        y = model(x.to(next(model.parameters()).dtype))
        y.square().sum().backward()
        grads[name] = [y.detach().double()] + [p.grad.double() for p in model.parameters()]

    def errors(name, reference="theirs64"):
        return [((a - e).norm() / e.norm().clamp_min(1e-300)).item()
                for a, e in zip(grads[name], grads[reference])]

    assert max(errors("ours64")) < 1e-8
    ours_errors, theirs_errors = errors("ours"), errors("theirs")
    assert ours_errors[0] < 1e-5  # the output
    assert max(ours_errors) <= 2 * max(theirs_errors)
    assert sorted(ours_errors)[len(ours_errors) // 2] <= 3 * sorted(theirs_errors)[len(theirs_errors) // 2]


@pytest.mark.parametrize("name, params", [("densenet161", 28_681_000), ("densenet169", 14_149_480),
                                          ("densenet201", 20_013_928)])
def test_imagenet_densenets_have_torchvision_keys_and_sizes(name, params):
    torchvision = pytest.importorskip("torchvision")
    ours = getattr(models, name)(memory="shared")
    theirs = getattr(torchvision.models, name)()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == params


def test_densenet264_is_torchvision_densenet_with_6_12_64_48():
    torchvision = pytest.importorskip("torchvision")
    ours = models.densenet264()
    theirs = torchvision.models.DenseNet(32, (6, 12, 64, 48), 64)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_densenet121_macs():
    from torch.utils.flop_counter import FlopCounterMode

    model = models.densenet121().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224))
    macs = counter.get_total_flops() / 2
    assert abs(macs / 2.83e9 - 1) < 0.02, macs  # torchvision's 2.83 "GFLOPS" are MACs


def test_densenet_bc_100_12_size_and_output():
    model = models.densenet_bc(100, 12)
    assert sum(p.numel() for p in model.parameters()) == 769_162  # the paper's "0.8M"
    assert [m.num_layers for m in model.modules() if isinstance(m, DenseBlock)] == [16, 16, 16]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("make, message", [
    (lambda: DenseBlock(2, 4, 2, memory="fast"), "memory must be one of"),
    (lambda: models.densenet_bc(99), "depth must be 6n \\+ 4"),
    (lambda: DenseLayer(4, 0), "growth_rate must be a positive int"),
    (lambda: DenseLayer(4, 2, drop_rate=1.0), "drop_rate must be in"),
    (lambda: models.densenet121(fused=True), None),
])
def test_bad_construction_arguments(make, message):
    if message is None:
        with pytest.raises(NotImplementedError, match="fused=True"):
            make()
        return
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("mode", MODES)
def test_bad_inputs(mode):
    block = DenseBlock(2, 4, 2, memory=mode)
    with pytest.raises(ValueError, match="expects 4 input channels, got 5"):
        block(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        block(torch.randn(1, 4, 1, 1, requires_grad=True))


def test_memory_cli_writes_table_json_and_plot(tmp_path):
    import json
    import subprocess
    import sys

    out_json, out_png = tmp_path / "m.json", tmp_path / "m.png"
    result = subprocess.run(
        [sys.executable, "-m", "cnnkernels", "memory", "densenet", "--depths", "10,16",
         "--growth-rate", "4", "--batch-size", "4", "--image-size", "8", "--steps", "1",
         "--device", "cpu", "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line[:5].strip().isdigit()]
    assert len(lines) == 6 and {line.split()[2] for line in lines} == set(MODES)
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == 6 and all(row["peak_mib"] >= 0 and row["step_s"] > 0 for row in rows)
    assert out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (("--impls", "naive,fast"), "argument --impls: unknown implementation fast"),
    (("--depths", "41"), "argument --depths: expected comma-separated DenseNet-BC depths 6n + 4"),
    (("--depths", "a,b"), "argument --depths: expected comma-separated DenseNet-BC depths"),
])
def test_memory_cli_errors_are_one_line(args, message):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "cnnkernels", "memory", "densenet", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and \
        lines[0].startswith(f"cnnkernels memory densenet: error: {message}"), lines


@pytest.mark.parametrize("drop_rate", [0.0, 0.3])
def test_shared_mode_keeping_the_bottleneck_agrees_and_saves_more(drop_rate):
    blocks = make_blocks(drop_rate)
    keep = DenseBlock(4, 10, 6, 2, drop_rate, memory="shared", recompute_bottleneck=False)
    keep.load_state_dict(blocks["naive"].state_dict())
    for module in keep.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    inputs = inputs_for("nchw", torch.float32)
    x = inputs[0].clone().requires_grad_()
    saved_keep = profile.saved_activation_bytes(keep, x)
    saved_recompute = profile.saved_activation_bytes(blocks["shared"], x)
    assert saved_recompute < saved_keep
    blocks = make_blocks(drop_rate)
    keep.load_state_dict(blocks["naive"].state_dict())
    assert_same_training(train_steps(blocks["naive"], inputs), train_steps(keep, inputs), torch.float32)


# --- transitions --------------------------------------------------------------------------------

def _torchvision_transition(in_channels=24, out_channels=12, dtype=torch.float32):
    from torchvision.models.densenet import _Transition

    torch.manual_seed(3)
    t = _Transition(in_channels, out_channels)
    with torch.no_grad():
        t.norm.weight.uniform_(0.5, 1.5), t.norm.bias.normal_()
        t.norm.running_mean.normal_(), t.norm.running_var.uniform_(0.5, 1.5)
    return t.to(dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dense_transition_matches_torchvision(layout, dtype):
    """BN → ReLU → pool → conv1x1 (ours) against torchvision's BN → ReLU → conv1x1 → pool: outputs,
    every gradient and the running statistics over training steps, then eval; the same keys."""
    from cnnkernels.nn import DenseTransition

    theirs = _torchvision_transition(dtype=dtype)
    ours = DenseTransition.from_transition(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for step in range(3):
        x = torch.randn(3, 24, 10, 9, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert ya.shape == yb.shape == (3, 12, 5, 4)
        torch.testing.assert_close(ya, yb, **tol)
        grad = torch.randn_like(yb)
        ya.backward(grad), yb.backward(grad)
        torch.testing.assert_close(xa.grad, xb.grad, **tol)
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad, b.grad, **tol, msg=name)
    for a, b in zip(ours.buffers(), theirs.buffers()):
        torch.testing.assert_close(a, b, **tol)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 24, 8, 8, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **tol)


def test_transitions_that_do_not_commute_are_refused():
    from cnnkernels import convert
    from cnnkernels.nn import DenseTransition
    from cnnkernels.nn.densenet import transition_problem

    assert transition_problem(_torchvision_transition()) is None
    strided = _torchvision_transition()
    strided.conv = torch.nn.Conv2d(24, 12, 1, stride=2, bias=False)
    assert transition_problem(strided) == "its conv is not a plain 1x1 convolution"
    pooled = _torchvision_transition()
    pooled.pool = torch.nn.AvgPool2d(3, 2)
    assert transition_problem(pooled) == "its pool is not a 2x2 average pool of stride 2"
    with pytest.raises(ValueError, match="not a 2x2 average pool"):
        DenseTransition.from_transition(pooled)
    _, report = convert(torch.nn.Sequential(pooled), report=True)
    assert [(s.kind, s.reason) for s in report.left_alone] == [
        ("dense_transition", "its pool is not a 2x2 average pool of stride 2")]


def test_our_densenet_transitions_convert_and_revert():
    from cnnkernels import convert, revert
    from cnnkernels.models.densenet import Transition
    from cnnkernels.nn import DenseTransition

    model = models.densenet_bc(depth=40, growth_rate=12)
    converted, report = convert(model, report=True)
    assert report.counts().get("dense_transition") == 2
    assert sum(isinstance(m, DenseTransition) for m in converted.modules()) == 2
    reverted = revert(converted)
    assert sum(type(m) is Transition for m in reverted.modules()) == 2
    assert list(reverted.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_blocks_and_transitions_hand_off_in_channels_last(training):
    """convert() links a run of DenseBlocks and DenseTransitions that follow each other in a
    Sequential: inside the run outputs are passed on in channels_last (the CPU computes both in
    it); the run's last module gives back the layout the run was given (NCHW here), so the module
    after it sees what it saw before. Against the same modules unlinked: the same values,
    gradients and running statistics, and the input's gradient in its layout."""
    from torchvision.models.densenet import _DenseBlock

    from cnnkernels import convert
    from cnnkernels.nn import DenseTransition

    torch.manual_seed(0)
    plain = torch.nn.Sequential(_DenseBlock(2, 8, 4, 6, 0.0), _torchvision_transition(20, 10),
                                _DenseBlock(2, 10, 4, 6, 0.0), torch.nn.BatchNorm2d(22))
    converted = convert(plain).train(training)
    assert isinstance(converted[1], DenseTransition)
    assert [getattr(m, "hand_off_role", None) for m in converted] == ["first", "middle", "last", None]
    unlinked = copy.deepcopy(converted)
    for module in unlinked[:3]:
        module.hand_off_role = module.hand_off_chain = None
    layouts = []
    hooks = [m.register_forward_hook(lambda m, i, out: layouts.append(is_cl(out)))
             for m in converted[:3]]
    x = torch.randn(3, 8, 10, 9)
    xa, xb = x.clone().requires_grad_(training), x.clone().requires_grad_(training)
    with torch.set_grad_enabled(training):
        ya, yb = converted(xa), unlinked(xb)
    for hook in hooks:
        hook.remove()
    assert layouts == [True, True, False]
    assert ya.is_contiguous()
    # eval: bit for bit; training: block 2's batch statistics of its input are summed in another
    # order over channels_last than over NCHW, and the gradients carry that rounding back
    exact = dict(rtol=1e-4, atol=1e-4) if training else dict(rtol=0, atol=0)
    torch.testing.assert_close(ya, yb, **exact)
    if training:
        grad = torch.randn_like(ya)
        ya.backward(grad), yb.backward(grad)
        assert xa.grad.is_contiguous()
        torch.testing.assert_close(xa.grad, xb.grad, **exact)
        for (name, a), b in zip(converted.named_parameters(), unlinked.parameters()):
            torch.testing.assert_close(a.grad, b.grad, **exact, msg=name)
    for a, b in zip(converted.buffers(), unlinked.buffers()):
        torch.testing.assert_close(a, b, **exact)


def test_hand_off_links_are_redone_by_each_convert():
    """A second convert() after the modules were rearranged drops the links that no longer hold;
    a Sequential subclass (its forward may not run its children in order) is not linked."""
    from torchvision.models.densenet import _DenseBlock

    from cnnkernels import convert

    class Reordered(torch.nn.Sequential):
        pass

    model = convert(torch.nn.Sequential(_DenseBlock(2, 8, 4, 6, 0.0), _torchvision_transition(20, 10),
                                        _DenseBlock(2, 10, 4, 6, 0.0)))
    assert [m.hand_off_role for m in model] == ["first", "middle", "last"]
    block, transition = model[0], model[1]
    model = convert(torch.nn.Sequential(block, torch.nn.Identity(), transition), inplace=True)
    assert block.hand_off_role is None and transition.hand_off_role is None
    model = convert(Reordered(block, transition), inplace=True)
    assert block.hand_off_role is None and transition.hand_off_role is None


def is_cl(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _shared_and_naive(drop_rate: float = 0.0):
    torch.manual_seed(0)
    shared = DenseBlock(3, 8, 4, bn_size=2, drop_rate=drop_rate, memory="shared")
    naive = copy.deepcopy(shared)
    naive.memory = "naive"
    return shared, naive


def _conv_with_bias():
    torch.manual_seed(5)
    return torch.nn.Conv2d(8, 4, 3, padding=1, bias=True)


@pytest.mark.parametrize("change", [
    lambda block: block.denselayer2.norm1.eval(),            # frozen after convert
    lambda block: setattr(block.denselayer1, "relu1", torch.nn.Hardswish()),
    lambda block: setattr(block.denselayer3, "conv2", _conv_with_bias()),
    lambda block: block.denselayer2.norm2.register_forward_hook(lambda *_: None),
])
def test_shared_block_follows_its_layers_as_they_are(change):
    """A layer changed after the block was built (a frozen BatchNorm, a swapped activation, a conv
    with a bias, a hook) is computed as it is now: the shared block runs its layers one by one."""
    shared, naive = _shared_and_naive()
    change(shared), change(naive)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    torch.testing.assert_close(shared(x), naive(x))
    torch.testing.assert_close(shared.state_dict(), naive.state_dict())


def test_shared_block_double_backward_names_the_block():
    shared, _ = _shared_and_naive()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="DenseBlock.*double backward"):
        (grad,) = torch.autograd.grad(shared(x).square().sum(), x, create_graph=True)
        grad.sum().backward()


def test_shared_block_with_norms_without_affine_runs_them_as_they_are():
    shared, naive = _shared_and_naive()
    for block in (shared, naive):
        block.denselayer1.norm1 = torch.nn.BatchNorm2d(8, affine=False)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    torch.testing.assert_close(shared(x), naive(x))


def test_shared_block_with_eps_zero_raises_as_batchnorm_does():
    shared, _ = _shared_and_naive()
    shared.denselayer2.norm2.eps = 0.0
    with pytest.raises(ValueError, match="eps must be positive"):
        shared(torch.randn(2, 8, 5, 5))


def test_training_block_compiles_in_full_graph():
    """torch.compile(fullgraph=True) traces a training shared block (as its layers' plain ops):
    the same output, gradients and running statistics as eager."""
    shared, naive = _shared_and_naive(drop_rate=0.0)
    compiled = torch.compile(shared, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    x_naive = x.detach().clone().requires_grad_(True)
    y, y_naive = compiled(x), naive(x_naive)
    y.square().sum().backward()
    y_naive.square().sum().backward()
    torch.testing.assert_close(y, y_naive)
    torch.testing.assert_close(x.grad, x_naive.grad)
    torch.testing.assert_close(shared.state_dict(), naive.state_dict())
