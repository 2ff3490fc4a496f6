"""cnnkernels.tuning: each converted layer runs, per input signature, the faster of our kernels and
PyTorch's own computation. The choice is stable, the timing leaves running statistics, RNG and
.grad untouched, the cache survives a new process and ignores a corrupt or foreign file, the modes
do what they say, PyTorch's forward of every layer kind computes what the original model computes,
torch.compile and DDP see one choice."""
import json
import time

import pytest
import torch
from torch import nn

import cnnkernels
from cnnkernels import tuning
from cnnkernels.nn import BatchNormAct2d, ConvBNAct2d, HardSwish

torchvision = pytest.importorskip("torchvision")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Tuning on, a fresh cache directory, nothing in memory."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("CNNKERNELS_CACHE_DIR", str(directory))
    tuning.clear_memory()
    with tuning.use_tuning("auto"):
        yield directory
    tuning.clear_memory()


def _timed_as(monkeypatch, ours: float, torch_: float) -> list:
    """Make timing answer these seconds; returns the list of layers timed."""
    timed = []

    def fake(layer, x, grad):
        timed.append(layer)
        return {"ours": ours, "torch": torch_}
    monkeypatch.setattr(tuning, "time_candidates", fake)
    return timed


class _Spy(HardSwish):
    """A HardSwish that counts which forward ran."""

    def __init__(self, ours_sleep: float = 0.0, torch_sleep: float = 0.0) -> None:
        super().__init__()
        self.sleeps = {"ours": ours_sleep, "torch": torch_sleep}
        self.calls = {"ours": 0, "torch": 0}

    def extra_repr(self) -> str:
        return f"sleeps={self.sleeps}"  # a configuration of its own: decisions are not shared

    def forward_ours(self, x):
        self.calls["ours"] += 1
        time.sleep(self.sleeps["ours"])
        return super().forward_ours(x)

    def forward_torch(self, x):
        self.calls["torch"] += 1
        time.sleep(self.sleeps["torch"])
        return super().forward_torch(x)


def _after_tuning(layer, x):
    """Calls the layer once (it tunes), then counts which forward a second call runs."""
    layer(x)
    before = dict(layer.calls)
    layer(x)
    return {k: layer.calls[k] - before[k] for k in before}


def test_auto_times_once_and_keeps_the_faster(cache):
    x = torch.randn(2, 3, 4, 4)
    slow_ours = _Spy(ours_sleep=0.004)
    assert _after_tuning(slow_ours, x) == {"ours": 0, "torch": 1}
    slow_torch = _Spy(torch_sleep=0.004)
    assert _after_tuning(slow_torch, x) == {"ours": 1, "torch": 0}
    timed = tuning.statistics_of_tuning()["timed"]
    for _ in range(3):  # the choice is stable: no more timing for a known signature
        slow_ours(x), slow_torch(x)
    assert tuning.statistics_of_tuning()["timed"] == timed
    slow_ours(torch.randn(2, 3, 5, 4))  # a new shape is a new signature
    assert tuning.statistics_of_tuning()["timed"] == timed + 1


@pytest.mark.parametrize("torch_seconds, expected", [(0.98, "ours"), (0.9, "torch")])
def test_pytorch_must_win_by_the_margin(cache, monkeypatch, torch_seconds, expected):
    _timed_as(monkeypatch, 1.0, torch_seconds)
    layer = HardSwish()
    layer(torch.randn(2, 3, 4, 4))
    assert [row["choice"] for row in tuning.decisions_of(layer)] == [expected]


def test_off_never_times_and_runs_ours(cache):
    layer = _Spy(ours_sleep=0.004)
    timed = tuning.statistics_of_tuning()["timed"]
    with tuning.use_tuning("off"):
        layer(torch.randn(2, 3, 4, 4))
    assert layer.calls == {"ours": 1, "torch": 0}
    assert tuning.statistics_of_tuning()["timed"] == timed
    assert not cache.exists()


def test_modes_are_checked():
    with pytest.raises(ValueError, match="auto, off, cached"):
        tuning.set_tuning("fast")
    with pytest.raises(ValueError, match="prefer must be one of speed, memory"):
        cnnkernels.convert(nn.Sequential(nn.Hardswish()), prefer="small")


def test_the_cache_outlives_the_process_and_cached_mode_never_times(cache, monkeypatch):
    timed = _timed_as(monkeypatch, 1.0, 0.5)
    x = torch.randn(2, 3, 4, 4)
    HardSwish()(x)
    assert len(timed) == 1
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("tuning-cpu-")
    content = json.loads(files[0].read_text())
    assert content["header"]["torch"] == torch.__version__
    assert [e["choice"] for e in content["decisions"].values()] == ["torch"]
    tuning.clear_memory()  # as a new process: read from disk
    with tuning.use_tuning("cached"):
        fresh = HardSwish()
        fresh(x)
        fresh(torch.randn(3, 3, 4, 4))  # not in the cache: ours, not timed
    assert len(timed) == 1
    rows = {tuple(r["shape"]): r for r in tuning.decisions_of(fresh)}
    assert rows[(2, 3, 4, 4)]["choice"] == "torch" and rows[(2, 3, 4, 4)]["source"] == "cache"
    assert rows[(3, 3, 4, 4)]["choice"] == "ours"
    assert rows[(3, 3, 4, 4)]["source"] == "not in the cache"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "header": {
    "device": "another", "torch": "0.1"}, "decisions": {}}), json.dumps([1, 2])],
    ids=["corrupt", "foreign", "not-a-cache"])
def test_a_bad_cache_file_is_ignored_with_one_warning(cache, monkeypatch, content):
    path = tuning.cache_path(torch.device("cpu"))
    path.parent.mkdir(parents=True)
    path.write_text(content)
    _timed_as(monkeypatch, 1.0, 0.5)
    with pytest.warns(tuning.TuningCacheWarning, match="ignoring the tuning cache") as caught:
        layer = HardSwish()
        layer(torch.randn(2, 3, 4, 4))
        layer(torch.randn(2, 3, 5, 4))
    assert len([w for w in caught if w.category is tuning.TuningCacheWarning]) == 1
    assert json.loads(path.read_text())["format"] == tuning.CACHE_FORMAT  # rewritten whole


def test_an_unwritable_cache_keeps_decisions_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CNNKERNELS_CACHE_DIR", str(blocker / "cache"))
    tuning.clear_memory()
    timed = _timed_as(monkeypatch, 1.0, 0.5)
    with tuning.use_tuning("auto"), pytest.warns(tuning.TuningCacheWarning, match="cannot be written"):
        layer = HardSwish()
        layer(torch.randn(2, 3, 4, 4))
        layer(torch.randn(2, 3, 4, 4))
    assert len(timed) == 1
    tuning.clear_memory()


def _bn_pair():
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(3, momentum=None)  # cumulative average: counts every update
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    return reference, BatchNormAct2d.from_modules(reference, nn.ReLU())


@pytest.mark.parametrize("winner", ["ours", "torch"])
def test_timing_leaves_statistics_rng_and_grads_untouched(cache, winner):
    """Running statistics move once per real forward, the RNG is where it was, no .grad is
    written by the timing, and the gradient is the reference's."""
    reference, ours = _bn_pair()
    x = torch.randn(4, 3, 5, 5)
    if winner == "torch":
        ours.forward_ours = lambda t, f=ours.forward_ours: (time.sleep(0.003), f(t))[1]
    else:
        ours.forward_torch = lambda t, f=ours.forward_torch: (time.sleep(0.003), f(t))[1]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    rng = torch.get_rng_state()
    y = ours(xb)
    assert torch.equal(torch.get_rng_state(), rng)
    assert ours.weight.grad is None and xb.grad is None
    assert [r["choice"] for r in tuning.decisions_of(ours)] == [winner]
    y_ref = torch.relu(reference(xa))
    grad = torch.randn_like(y)
    y.backward(grad), y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name), msg=name)
    assert int(ours.num_batches_tracked) == 1


def _force(monkeypatch, choice: str):
    if choice == "torch":
        return _timed_as(monkeypatch, 1.0, 0.5)
    return _timed_as(monkeypatch, 0.5, 1.0)


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2", "resnet18",
                                  "shufflenet_v2_x0_5"])
def test_pytorch_forward_of_every_layer_kind_is_the_original_model(cache, monkeypatch, name):
    """Every converted layer made to run PyTorch's forward: the converted model still computes the
    original's outputs, gradients and running statistics (float64, train then eval)."""
    _force(monkeypatch, "torch")
    torch.manual_seed(0)
    original = _no_dropout(getattr(torchvision.models, name)(num_classes=10)).double()
    converted = cnnkernels.convert(original)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for model in (original, converted):
        model(x).square().sum().backward()
    kinds = {r["kind"] for r in tuning.decisions_of(converted) if r["choice"] == "torch"}
    expected = {"resnet18": {"ResidualBlock", "MaxPool2d"},
                "shufflenet_v2_x0_5": {"BNActSequential", "MaxPool2d"}}
    assert kinds >= expected.get(name, {"InvertedResidual", "ConvBNAct2d"}), kinds
    for (key, a), b in zip(original.named_parameters(), converted.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-9, msg=key)
    for (key, a), b in zip(original.named_buffers(), converted.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=key)
    original.eval(), converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-9, atol=1e-12)


def test_prefer_memory_keeps_ours_in_training(cache, monkeypatch):
    timed = _force(monkeypatch, "torch")
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                                        nn.ReLU()), nn.Hardswish())
    converted = cnnkernels.convert(model, prefer="memory")
    converted(torch.randn(2, 3, 6, 6))
    rows = {r["kind"]: r for r in tuning.decisions_of(converted)}
    assert rows["ConvBNAct2d"]["choice"] == "ours"
    assert rows["ConvBNAct2d"]["source"] == "prefer=memory"
    assert rows["HardSwish"]["choice"] == "torch"  # keeps no less than PyTorch: still tuned
    assert len(timed) == 1


def test_no_timing_on_fake_tensors_or_inside_saved_tensor_hooks(cache, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    timed = _force(monkeypatch, "torch")
    layer = HardSwish()
    with FakeTensorMode():
        layer(torch.empty(2, 3, 4, 4))
    with torch.autograd.graph.save_on_cpu():
        layer(torch.randn(2, 3, 4, 4, requires_grad=True))
    assert timed == [] and tuning.decisions_of(layer) == []


def test_torch_compile_inference_runs_pytorch_ops_training_ours(cache, monkeypatch):
    """Under compile nothing is timed; the traced graph holds PyTorch's ops in inference (so
    Inductor can fuse them) and our op in training; fullgraph holds."""
    timed = _force(monkeypatch, "ours")
    graphs = []

    def record(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward
    model = cnnkernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                                             nn.ReLU(), nn.Hardswish()))
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend=record, fullgraph=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    model.train()
    compiled(x).sum().backward()
    ours = [any("cnnkernels" in target for target in graph) for graph in graphs]
    assert ours == [False, True], graphs
    assert len(timed) == 2  # the two eager calls above, not the traced ones


def test_ranks_take_rank_zeros_choice(tmp_path):
    import tuning_worker

    from conftest import run_ranks

    ranks = run_ranks(tuning_worker.__file__, 2, tmp_path)
    assert ranks[0]["choices"] == ranks[1]["choices"]
    assert set(ranks[0]["choices"]) == {"torch"}  # rank 0's timing said PyTorch, rank 1's ours
    for key, value in ranks[0]["state"].items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, ranks[1]["state"][key]), key


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tuning_on_cuda_times_with_events_and_keeps_the_numbers(cache):
    """On the GPU: both candidates timed (CUDA events), a choice recorded in the cache file of the
    cuda device kind, and the converted block's output equal to the original's either way."""
    torch.manual_seed(0)
    original = torchvision.models.mobilenet_v3_small().features[4].cuda().eval()
    converted = cnnkernels.convert(nn.Sequential(original))[0]
    x = torch.randn(8, 24, 28, 28, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-5)
    rows = tuning.decisions_of(converted)
    assert rows and all(r["source"] == "timed" and min(r["times"].values()) > 0 for r in rows)
    assert any(p.name.startswith("tuning-cuda-") for p in cache.iterdir())
