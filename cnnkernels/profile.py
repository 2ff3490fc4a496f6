"""Time measurement shared by bench/, the command line and the report.

Timings are medians over repetitions after a warm-up; on CUDA each repetition is timed with events
on the current stream. A repetition is one synchronised call by default (latency: host overhead
included), or several back-to-back calls (`calls_per_rep`; throughput, as in a training loop). Competing implementations are timed round-robin (A, B, A, B, ...) on the
same tensors, so slow drifts of the machine (frequency, other processes) hit every side alike and
the ratios computed from one run are fair.
"""
from __future__ import annotations

import ctypes
import statistics
import sys
import time
from typing import Callable, Mapping

import torch


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def keep_cpu_memory_mapped() -> bool:
    """Make glibc keep freed memory instead of returning it to the kernel.

    PyTorch's CPU allocator is plain malloc; glibc serves large blocks with fresh mmap()s and gives
    them back on free, so every large output is page-faulted in again (~10 ms for a 38 MB tensor
    here), and which side of a comparison gets recycled memory depends on the order of frees. Keeping
    the heap (as PyTorch's CUDA caching allocator does on the GPU) makes CPU timings measure the
    kernels, for every side alike. Returns False where this is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Seconds per call of `calls` back-to-back calls. calls=1 starts from an idle GPU, so host
    overhead (Python, dispatch, launches) counts in full; with more, the host queues work while
    the GPU runs, and the time tends to the device time when the kernels outlast the host side."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) / calls


def compile_fresh(fn: Callable[..., object], **options) -> Callable[..., object]:
    """torch.compile(fn) after clearing Dynamo's caches. Every benchmark case's torch function is
    a closure over the same code object, so Dynamo guards each case's tensors as a recompilation
    of that one frame; after config.recompile_limit (8) cases it silently runs the rest eagerly,
    and 'torch.compile' would time eager PyTorch."""
    torch._dynamo.reset()
    return torch.compile(fn, **options)


def compare_times(fns: Mapping[str, Callable[[], object]], device: torch.device | str, *,
                  warmup: int = 3, reps: int = 20, calls_per_rep: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin; each repetition times
    `calls_per_rep` back-to-back calls (see _time_once)."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, device, calls_per_rep))
    return {name: statistics.median(times) for name, times in samples.items()}


# --- memory -------------------------------------------------------------------------------------

_M_MMAP_THRESHOLD = -3


def return_freed_cpu_memory() -> bool:
    """Make glibc give every large freed block back to the kernel at once, so the resident set
    size follows the bytes PyTorch holds. (By default glibc raises its mmap threshold after the
    first large free and then serves tensors from a heap it keeps, so peak RSS would depend on the
    allocation history.) Call before measuring CPU memory; returns False where this is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_MAX, 65536)  # glibc's default; keep_cpu_memory_mapped sets 0
                  and libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
                  and libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024))
        libc.malloc_trim(0)  # and give back what a kept heap still holds
        return ok
    except (OSError, AttributeError):
        return False


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"cnnkernels: /proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def peak_memory(step_fn: Callable[[], object], device: torch.device | str) -> int:
    """Bytes a call of `step_fn` needs at its peak beyond what was held before it.

    CUDA: peak allocated bytes of the caching allocator around the call. CPU: peak resident set
    size (Linux VmHWM, reset before the call) minus the resident size before it; run this in a
    fresh process per configuration, after `return_freed_cpu_memory()` and one warm-up call, as
    `cnnkernels memory densenet` does, or earlier configurations' heap pollutes the numbers."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step_fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"cnnkernels: peak_memory measures 'cpu' or 'cuda', not {device.type!r}")
    if not sys.platform.startswith("linux"):
        raise RuntimeError("cnnkernels: CPU peak memory is read from /proc (Linux only)")
    before = _proc_status_kib("VmRSS")
    _reset_peak_rss()
    step_fn()
    return max(0, _proc_status_kib("VmHWM") - before) * 1024


def saved_activation_bytes(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes of the distinct tensor storages that a forward of `model` leaves alive for backward.

    Every tensor an operator creates during the forward is noted (a dispatch mode below
    autograd sees them all, inside custom autograd Functions and checkpoints too); what is still
    alive when the forward has returned is exactly what the autograd graph holds: the tensors
    nodes saved, plus inputs that torch.utils.checkpoint keeps for its recomputation (which
    saved-tensor hooks never see, so counting through those hooks alone would flatter
    checkpointing). Parameters, buffers and the output itself are not counted."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    created: list[tuple[StorageWeakRef, int, int]] = []

    class NoteStorages(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for leaf in tree_leaves(result):
                if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                    storage = leaf.untyped_storage()
                    created.append((StorageWeakRef(storage), storage.data_ptr(), storage.nbytes()))
            return result

    with NoteStorages():
        output = model(*inputs)
    excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    excluded.update(t.untyped_storage().data_ptr() for t in tree_leaves(output)
                    if isinstance(t, torch.Tensor))
    alive = {ptr: nbytes for ref, ptr, nbytes in created if not ref.expired() and ptr not in excluded}
    del output
    return sum(alive.values())
