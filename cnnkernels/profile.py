"""Time measurement shared by bench/, the command line and the report.

Timings are medians over repetitions after a warm-up; on CUDA each repetition is timed with events
on the current stream. Competing implementations are timed round-robin (A, B, A, B, ...) on the
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


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def compare_times(fns: Mapping[str, Callable[[], object]], device: torch.device | str, *,
                  warmup: int = 3, reps: int = 20) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, device))
    return {name: statistics.median(times) for name, times in samples.items()}
