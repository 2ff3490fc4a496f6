"""`cnnkernels bench overhead`: the host cost per call of every op and every converted layer kind,
ours against eager PyTorch's equivalent, on tensors so small that the kernels cost next to nothing.

On a GPU the kernels of a MobileNet layer at batch 64 take 10-100 µs, so what the host spends per
call (Python, dispatch, autograd, launches) decides whether a converted model is faster; the same
cost shows on any CPU with tiny tensors. Each row is timed round-robin in one run
(cnnkernels.profile.compare_times); ratio = ours / eager, so below 1 we cost less. On CUDA each row
also counts the kernels launched per call (torch.profiler).

Layers are built by `convert()` from the eager module they replace, and their outputs are checked
against it before timing, so a row can never time something that computes less.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# N, C, H, W of the input: what a kernel does on 256 values costs nothing next to the host side
SHAPE = (2, 8, 4, 4)
MODES = ("eval", "train")


@dataclasses.dataclass
class Pair:
    """One row: what is timed for ours and for eager, in one mode."""

    name: str
    kind: str  # "op" or "layer"
    mode: str  # "eval" (forward, no grad) or "train" (forward + backward)
    ours: Callable[[], object]
    eager: Callable[[], object]


def _input(device, requires_grad: bool, channels: int = SHAPE[1]) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(SHAPE[0], channels, *SHAPE[2:], device=device)
    return x.requires_grad_(requires_grad)


def _step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str):
    """The timed call: fn(x) under no_grad (eval), or fn(x) and its backward (train)."""
    if mode == "eval":
        def run():
            with torch.no_grad():
                return fn(x)
        return run
    grad = torch.randn_like(fn(x))

    def run_with_backward():
        fn(x).backward(grad)
    return run_with_backward


# --- ops -------------------------------------------------------------------------------------------

def _op_pairs(device, mode: str) -> list[Pair]:
    from . import ops

    train = mode == "train"
    x = _input(device, train)
    channels = x.shape[1]
    g = torch.Generator().manual_seed(1)

    def param(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(train)

    dw_weight, pw_weight = param(channels, 1, 3, 3), param(2 * channels, channels, 1, 1)
    bn_weight, bn_bias = param(channels), param(channels)
    mean, var = torch.zeros(channels, device=device), torch.ones(channels, device=device)
    fc1, fc2 = param(channels // 2, channels), param(channels, channels // 2)
    b1, b2 = param(channels // 2), param(channels)
    scale = torch.rand(channels, device=device) + 0.5
    shift = torch.randn(channels, device=device)
    pairs = [
        ("hardswish", ops.hardswish, F.hardswish),
        ("hardsigmoid", ops.hardsigmoid, F.hardsigmoid),
        ("depthwise_conv2d", lambda t: ops.depthwise_conv2d(t, dw_weight, None, 1, 1),
         lambda t: F.conv2d(t, dw_weight, None, 1, 1, 1, channels)),
        ("pointwise_conv2d", lambda t: ops.pointwise_conv2d(t, pw_weight),
         lambda t: F.conv2d(t, pw_weight)),
        ("batch_norm_act", lambda t: ops.batch_norm_act(t, bn_weight, bn_bias, mean, var, train),
         lambda t: F.relu(F.batch_norm(t, mean, var, bn_weight, bn_bias, train))),
        ("squeeze_excite", lambda t: ops.squeeze_excite(t, fc1, b1, fc2, b2),
         lambda t: t * F.hardsigmoid(F.linear(F.relu(F.linear(t.mean((2, 3)), fc1, b1)),
                                              fc2, b2))[:, :, None, None]),
    ]
    if not train:  # the inference epilogue ops have no autograd
        view = (1, -1, 1, 1)
        pairs.append(("affine_act", lambda t: ops.affine_act(t, scale, shift, "relu"),
                      lambda t: F.relu(torch.addcmul(shift.view(view), t, scale.view(view)))))
    return [Pair(name, "op", mode, _step(ours, x, mode), _step(eager, x, mode))
            for name, ours, eager in pairs]


# --- layers ----------------------------------------------------------------------------------------

def _eager_layers(channels: int) -> list[tuple[str, Callable[[], nn.Module]]]:
    """(the class convert() gives, a builder of the eager module it replaces)."""
    import torchvision

    return [
        ("HardSwish", lambda: nn.Hardswish()),
        ("BNActSequential", lambda: nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())),
        ("ConvBNAct2d", lambda: nn.Sequential(nn.Conv2d(channels, 2 * channels, 1, bias=False),
                                              nn.BatchNorm2d(2 * channels), nn.ReLU6())),
        ("DepthwiseConv2d", lambda: nn.Conv2d(channels, channels, 3, padding=1, groups=channels)),
        ("SqueezeExcite", lambda: torchvision.ops.SqueezeExcitation(
            channels, channels // 2, scale_activation=nn.Hardsigmoid)),
        ("ResidualBlock", lambda: torchvision.models.resnet.BasicBlock(channels, channels)),
        ("InvertedResidual", lambda: torchvision.models.mobilenetv2.InvertedResidual(
            channels, channels, 1, 4)),
    ]


def _give_statistics(module: nn.Module) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)


def _layer_pairs(device, mode: str) -> list[Pair]:
    from .conversion import convert
    from .nn import BatchNormAct2d

    train = mode == "train"
    x = _input(device, train)
    pairs = []
    for name, build in _eager_layers(x.shape[1]):
        eager = _eager(build, device, train)
        ours = convert(eager).train(train)  # copies: the eager module stays as it was
        if type(ours).__name__ != name:
            raise RuntimeError(f"bench overhead: convert() gave {type(ours).__name__}, not {name}")
        pairs.append(_layer_pair(name, ours, eager, x, mode))
    # the layer timm's BatchNormAct2d becomes, against the nn pair it computes
    eager = _eager(lambda: nn.Sequential(nn.BatchNorm2d(x.shape[1]), nn.ReLU()), device, train)
    ours = BatchNormAct2d.from_modules(eager[0], eager[1]).train(train)
    pairs.append(_layer_pair("BatchNormAct2d", ours, eager, x, mode))
    return pairs


def _eager(build: Callable[[], nn.Module], device, train: bool) -> nn.Module:
    torch.manual_seed(0)
    eager = build()
    _give_statistics(eager)
    return eager.to(device).train(train)


def _layer_pair(name: str, ours: nn.Module, eager: nn.Module, x: torch.Tensor, mode: str) -> Pair:
    _check_same_outputs(name, ours, eager, x.detach())
    return Pair(name, "layer", mode, _step(ours, x, mode), _step(eager, x, mode))


def _check_same_outputs(name: str, ours: nn.Module, eager: nn.Module, x: torch.Tensor) -> None:
    was_training = ours.training
    ours.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), eager(x), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"bench overhead: converted {name} differs: {m}")
    ours.train(was_training), eager.train(was_training)


# --- timing ----------------------------------------------------------------------------------------

def launches_per_call(fn: Callable[[], object], calls: int = 5) -> float | None:
    """CUDA kernels launched per call (None off CUDA)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels) / calls


def run(device: torch.device, reps: int = 15, calls_per_rep: int = 200,
        modes=MODES) -> dict:
    """Every row of both kinds and modes: per-call µs of ours and eager, their ratio, and on CUDA
    the launches per call."""
    from . import profile

    rows = []
    for mode in modes:
        for pair in _op_pairs(device, mode) + _layer_pairs(device, mode):
            medians = profile.compare_times({"ours": pair.ours, "eager": pair.eager}, device,
                                            warmup=20, reps=reps, calls_per_rep=calls_per_rep)
            row = {"name": pair.name, "kind": pair.kind, "mode": mode,
                   "ours_us": medians["ours"] * 1e6, "eager_us": medians["eager"] * 1e6,
                   "ratio": medians["ours"] / medians["eager"]}
            if device.type == "cuda":
                row["ours_launches"] = launches_per_call(pair.ours)
                row["eager_launches"] = launches_per_call(pair.eager)
            rows.append(row)
    return {"device": str(device), "shape": list(SHAPE), "threads": torch.get_num_threads(),
            "reps": reps, "calls_per_rep": calls_per_rep, "rows": rows}


def format_table(result: dict) -> str:
    launches = any("ours_launches" in r for r in result["rows"])
    head = "| kind | name | mode | ours µs | eager µs | ours / eager |"
    rule = "|---|---|---|---|---|---|"
    if launches:
        head += " launches ours | launches eager |"
        rule += "---|---|"
    lines = [head, rule]
    for r in result["rows"]:
        line = (f"| {r['kind']} | {r['name']} | {r['mode']} | {r['ours_us']:.1f} | "
                f"{r['eager_us']:.1f} | {r['ratio']:.2f}x |")
        if launches:
            line += f" {r['ours_launches']:.0f} | {r['eager_launches']:.0f} |"
        lines.append(line)
    return "\n".join(lines)


def title(result: dict) -> str:
    return (f"Host overhead per call on {result['device']}, input {tuple(result['shape'])}, "
            f"{result['threads']} thread(s); median of {result['reps']} round-robin repetitions "
            f"of {result['calls_per_rep']} calls per side. ours / eager below 1: we cost less.")
