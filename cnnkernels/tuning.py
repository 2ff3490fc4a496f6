"""Never slower than PyTorch: each converted layer runs, per input signature, the faster of our
kernels and PyTorch's own computation of the layers it replaced, timed once on this machine.

A tunable layer has two forwards, ``forward_ours(x)`` and ``forward_torch(x)`` (what the
unconverted module computes: the same parameters, buffers and running-statistics updates). Its
``forward`` asks `runs_torch(layer, x)` which one to run. The signature is the layer's
configuration, x's shape, dtype, memory format and device, train/eval, whether autograd records,
and the autocast state.

Modes (``set_tuning``, ``use_tuning``, the environment variable ``CNNKERNELS_TUNE``):
- ``auto`` (default): the first time a layer meets a signature, both forwards are timed (training
  with autograd: forward plus backward with a throwaway gradient, which reaches no ``.grad``);
  PyTorch's is kept only when it is faster by more than `MARGIN`, so noise does not flip choices.
  The timing restores the layer's buffers (running statistics move once per real forward) and the
  RNG state. Decisions are cached in memory and on disk.
- ``cached``: decisions come from the cache alone, never timed; a miss runs our kernels.
- ``off``: our kernels always.

The disk cache is one JSON file per device kind in ``CNNKERNELS_CACHE_DIR`` (default
``$XDG_CACHE_HOME/cnnkernels`` or ``~/.cache/cnnkernels``), keyed by the device's name, torch,
cnnkernels and the CPU's ISA; it is written atomically, and a corrupt or foreign file is ignored
with one warning.

Where timing is not possible or not meaningful, our kernels run and nothing is recorded: tensor
subclasses (FakeTensor, meta), inside saved-tensor hooks (checkpointing, save_on_cpu), during CUDA
graph capture. Under torch.compile nothing is timed: inference runs PyTorch's ops, which Inductor
fuses with their neighbours (our opaque ops would break those fusions); training keeps ours, whose
backward Inductor's CPU code does not beat. With
``convert(..., prefer="memory")`` the layers whose training keeps fewer activations
(``keeps_less_memory``) always run ours in training. Layers that synchronise BatchNorm statistics
across ranks are not tuned. Under torch.distributed every rank takes rank 0's decision.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ._version import __version__

MODES = ("auto", "off", "cached")
MARGIN = 0.03  # PyTorch's forward must be this much faster to replace ours
REPEATS = 5  # timed runs per candidate after one warm-up run each, interleaved
MIN_REPEATS = 3
BUDGET_S = 0.2  # timing stops after MIN_REPEATS once one signature has cost this much
CACHE_FORMAT = 1


class TuningCacheWarning(UserWarning):
    """The tuning cache file could not be read or written; decisions stay in memory."""


class _State:
    mode: str = "auto"
    decisions: dict = {}  # cache file path -> {key: entry}
    warned: set = set()
    seconds: float = 0.0  # spent timing, since the process started
    timed: int = 0  # signatures timed
    depth: int = 0  # timings in progress (nested: a block's candidates call its layers)
    generation: int = 0  # bumped by clear_memory: the layers' own decisions are then stale


_state = _State()


# --- modes ---------------------------------------------------------------------------------------

def _validated(mode: str) -> str:
    if not isinstance(mode, str) or mode.strip().lower() not in MODES:
        raise ValueError(f"cnnkernels tuning mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode.strip().lower()


def get_tuning() -> str:
    return _state.mode


def set_tuning(mode: str) -> None:
    """``"auto"`` | ``"cached"`` | ``"off"`` for every following layer call (process-wide)."""
    _state.mode = _validated(mode)


@contextlib.contextmanager
def use_tuning(mode: str) -> Iterator[str]:
    """Temporarily select a tuning mode: ``with cnnkernels.use_tuning("off"): ...``."""
    previous = _state.mode
    _state.mode = _validated(mode)
    try:
        yield _state.mode
    finally:
        _state.mode = previous


def _initial_mode() -> str:
    requested = os.environ.get("CNNKERNELS_TUNE", "").strip()
    if not requested:
        return "auto"
    try:
        return _validated(requested)
    except ValueError as error:
        raise ValueError(f"CNNKERNELS_TUNE: {error}") from None


_state.mode = _initial_mode()


def clear_memory() -> None:
    """Forget every decision held in memory (the layers' own and the cache's); the disk cache is
    read again when next needed."""
    _state.decisions.clear()
    _state.generation += 1


def statistics_of_tuning() -> dict:
    """Seconds spent timing and signatures timed, since the process started."""
    return {"seconds": _state.seconds, "timed": _state.timed}


# --- the decision on the hot path -----------------------------------------------------------------

def runs_torch(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer` runs PyTorch's own computation (``forward_torch``) for `x` now."""
    mode = _state.mode
    if mode == "off":
        return False
    if torch.compiler.is_compiling():
        return not (layer.training and torch.is_grad_enabled())
    if type(x) is not torch.Tensor and type(x) is not nn.Parameter:
        return False  # FakeTensor and other subclasses: no time to measure
    signature = _signature(layer, x)
    decided = layer.__dict__.get("_tuned")
    if decided is None or decided[0] != _state.generation:
        decided = layer.__dict__["_tuned"] = (_state.generation, {})
    entry = decided[1].get(signature)
    if entry is None:
        entry = _decide(layer, x, signature, mode)
        if entry is None:
            return False  # not decidable now: ours, and ask again next time
        decided[1][signature] = entry
    return entry["choice"] == "torch"


def _layout(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def _records_grad(layer: nn.Module, x: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad:
        return True
    parameters = layer.__dict__.get("_tuning_parameters")
    if parameters is None:
        parameters = layer.__dict__["_tuning_parameters"] = tuple(layer.parameters())
    for parameter in parameters:
        if parameter.requires_grad:
            return True
    return False


def _autocast_dtype(device: torch.device):
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.amp.is_autocast_available(kind) and \
        torch.is_autocast_enabled(kind) else None


def _signature(layer: nn.Module, x: torch.Tensor) -> tuple:
    """Written for speed (it runs on every call of every tunable layer, ~1 us): a torch.Size is
    a tuple, and the autocast state is worked out only where autocast is on."""
    device = x.device
    return (x.shape, x.dtype, device, _layout(x),
            layer.training, _records_grad(layer, x),
            _autocast_dtype(device) if torch._C._is_any_autocast_enabled() else None)


# --- deciding -------------------------------------------------------------------------------------

def _configuration(layer: nn.Module) -> str:
    """The layer's class and a digest of its repr (every child's configuration): two layers with
    the same configuration share decisions, in memory and on disk."""
    found = layer.__dict__.get("_tuning_configuration")
    if found is None:
        digest = hashlib.sha1(repr(layer).encode()).hexdigest()[:16]
        found = layer.__dict__["_tuning_configuration"] = f"{type(layer).__name__}:{digest}"
    return found


def _key(layer: nn.Module, signature: tuple) -> str:
    shape, dtype, device, layout, training, grad, autocast = signature
    return "|".join([_configuration(layer), "x".join(map(str, shape)), str(dtype).split(".")[-1],
                     device.type, layout, "train" if training else "eval",
                     "grad" if grad else "nograd", str(autocast).split(".")[-1]])


def _untunable(layer: nn.Module) -> str | None:
    """Why PyTorch's forward cannot stand in for ours (None if it can)."""
    for module in layer.modules():
        if isinstance(module, nn.SyncBatchNorm) or getattr(module, "process_group", None) is not None:
            return "BatchNorm statistics synchronised across ranks"
    return None


def _timing_possible(x: torch.Tensor) -> bool:
    if torch._C._autograd._top_saved_tensors_default_hooks(True) is not None:
        return False  # checkpointing, save_on_cpu, our recipes: timing would run inside them
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _decide(layer: nn.Module, x: torch.Tensor, signature: tuple, mode: str) -> dict | None:
    grad = signature[5]
    if grad and layer.training and getattr(layer, "prefer", "speed") == "memory" and \
            getattr(layer, "keeps_less_memory", False):
        return {"choice": "ours", "source": "prefer=memory"}
    reason = _untunable(layer)
    if reason is not None:
        return {"choice": "ours", "source": reason}
    path = cache_path(x.device)
    decisions = _decisions(path)
    key = _key(layer, signature)
    entry = decisions.get(key)
    if entry is not None:
        return dict(entry, source="cache")
    if mode == "cached":
        return {"choice": "ours", "source": "not in the cache"}
    if not _timing_possible(x):
        return None
    started = time.perf_counter()
    _state.depth += 1  # a block's candidates tune the layers inside them: count the time once
    try:
        times = time_candidates(layer, x, grad)
    finally:
        _state.depth -= 1
    choice = "torch" if times["torch"] < times["ours"] * (1 - MARGIN) else "ours"
    choice = _agreed(choice, x.device)
    if _state.depth == 0:
        _state.seconds += time.perf_counter() - started
    _state.timed += 1
    entry = {"choice": choice, "times": times}
    decisions[key] = entry
    _save(path, decisions)
    return dict(entry, source="timed")


def _agreed(choice: str, device: torch.device) -> str:
    """Rank 0's choice on every rank, so that all ranks compute the same way."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return choice
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if choice == "torch" else 0], device=on)
    dist.broadcast(flag, src=0)
    return "torch" if int(flag.item()) else "ours"


# --- timing ---------------------------------------------------------------------------------------

class _Untouched:
    """Restores the layer's buffers and the RNG after the candidates ran."""

    def __init__(self, layer: nn.Module, device: torch.device) -> None:
        # a layer in eval may hold children in training (each keeps its own mode)
        moving = any(module.training for module in layer.modules())
        self.buffers = [(b, b.clone()) for b in layer.buffers()] if moving else []
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)


def _one_call(forward: Callable, layer: nn.Module, x: torch.Tensor,
              grad: bool) -> Callable[[], None]:
    """A call of forward on a fresh copy of x, made before the timer starts; with `grad`, its
    backward too, into autograd.grad's results rather than any .grad. A layer that works in place
    gets a copy that is not a leaf, as its input in a network is not."""
    copy = x.detach().clone()
    in_place = getattr(layer, "inplace", False)
    if not grad:
        return lambda: forward(copy)
    copy.requires_grad_(x.requires_grad)
    inputs = [t for t in (copy, *layer.parameters()) if t.requires_grad]

    def run() -> None:
        with torch.enable_grad():
            out = forward(copy.clone() if in_place else copy)
            if out.requires_grad:
                torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)
    return run


def _seconds(run: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def time_candidates(layer: nn.Module, x: torch.Tensor, grad: bool) -> dict[str, float]:
    """Median seconds per call of ``forward_ours`` and ``forward_torch`` on x (forward and
    backward when `grad`): one warm-up run each (ours first, so that its errors are the ones
    raised), then up to REPEATS runs each, interleaved. Buffers and RNG are left as found."""
    candidates = {"ours": layer.forward_ours, "torch": layer.forward_torch}
    kept = _Untouched(layer, x.device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    try:
        for forward in candidates.values():
            _one_call(forward, layer, x, grad)()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        started = time.perf_counter()
        for repeat in range(REPEATS):
            order = list(candidates.items())
            if repeat % 2:
                order.reverse()
            for name, forward in order:
                samples[name].append(_seconds(_one_call(forward, layer, x, grad), x.device))
            if repeat + 1 >= MIN_REPEATS and time.perf_counter() - started > BUDGET_S:
                break
    finally:
        kept.restore()
    return {name: statistics.median(values) for name, values in samples.items()}


# --- the cache on disk ----------------------------------------------------------------------------

def cache_dir() -> Path:
    chosen = os.environ.get("CNNKERNELS_CACHE_DIR")
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnkernels"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def header(device: torch.device) -> dict:
    """What a decision depends on besides the layer and its input."""
    from . import _extension
    isa = _extension._C.cpu_isa() if _extension.cpu_ext else None
    return {"device": _device_name(device), "device_type": device.type, "torch": torch.__version__,
            "cnnkernels": __version__, "cpu_isa": isa, "cpu_capability":
                torch.backends.cpu.get_cpu_capability()}


_paths: dict = {}


def cache_path(device: torch.device) -> Path:
    key = (str(cache_dir()), device.type, device.index)
    path = _paths.get(key)
    if path is None:
        digest = hashlib.sha1(json.dumps(header(device), sort_keys=True).encode()).hexdigest()
        path = _paths[key] = cache_dir() / f"tuning-{device.type}-{digest[:16]}.json"
    return path


def _warn_once(path: Path, message: str) -> None:
    if (path, message) not in _state.warned:
        _state.warned.add((path, message))
        warnings.warn(message, TuningCacheWarning, stacklevel=5)


def _decisions(path: Path) -> dict:
    """The decisions for this cache file: read from disk the first time."""
    decisions = _state.decisions.get(path)
    if decisions is None:
        decisions = _state.decisions[path] = _read(path)
    return decisions


def _valid_entry(entry) -> bool:
    return isinstance(entry, dict) and entry.get("choice") in ("ours", "torch")


def _read(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        _warn_once(path, f"cnnkernels: ignoring the tuning cache {path}: it cannot be read "
                         f"({type(error).__name__}: {error})")
        return {}
    expected = header(torch.device(path.name.split("-")[1]))
    if not isinstance(content, dict) or content.get("format") != CACHE_FORMAT or \
            not isinstance(content.get("decisions"), dict):
        _warn_once(path, f"cnnkernels: ignoring the tuning cache {path}: not a cnnkernels tuning "
                         f"cache of format {CACHE_FORMAT}")
        return {}
    if {k: content.get("header", {}).get(k) for k in expected} != expected:
        _warn_once(path, f"cnnkernels: ignoring the tuning cache {path}: it was written for "
                         f"another machine or version ({content.get('header')})")
        return {}
    return {key: entry for key, entry in content["decisions"].items() if _valid_entry(entry)}


def _save(path: Path, decisions: dict) -> None:
    """Written atomically: a reader sees the old file or the new one, never a part."""
    device = torch.device(path.name.split("-")[1])
    content = {"format": CACHE_FORMAT, "header": header(device), "decisions": decisions}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(handle, "w") as stream:
            json.dump(content, stream, indent=0, sort_keys=True)
        os.replace(temporary, path)
    except OSError as error:
        _warn_once(path, f"cnnkernels: the tuning cache {path} cannot be written "
                         f"({error}); decisions stay in memory")


# --- what was decided -----------------------------------------------------------------------------

def decisions_of(model: nn.Module) -> list[dict]:
    """Each tunable layer of `model` and what it decided per signature (the layers' own memory)."""
    rows = []
    for name, module in model.named_modules():
        decided = module.__dict__.get("_tuned")
        if decided is None or decided[0] != _state.generation:
            continue
        for signature, entry in decided[1].items():
            shape, dtype, device, layout, training, grad, autocast = signature
            rows.append({"layer": name, "kind": type(module).__name__, "shape": list(shape),
                         "dtype": str(dtype).split(".")[-1], "device": str(device),
                         "layout": layout, "mode": "train" if training else "eval",
                         "grad": grad, "choice": entry["choice"],
                         "source": entry.get("source", ""), "times": entry.get("times")})
    return rows
