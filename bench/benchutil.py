"""Shared settings of the bench/ suites: the device and which sides to time.

    pytest bench --benchmark-json out.json      # full run
    pytest bench --benchmark-disable            # smoke: every case once, no timing (CI)
    CNNKERNELS_BENCH_QUICK=1                    # fewer, smaller shapes
    CNNKERNELS_BENCH_COMPILE=1                  # also time torch.compile (default on CUDA)
    CNNKERNELS_BENCH_ROUNDS=100                 # timed rounds per benchmark (default 30, quick 10)
"""
import os

import torch

import cnnkernels
from cnnkernels import profile

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("CNNKERNELS_BENCH_QUICK") == "1"
ROUNDS = int(os.environ.get("CNNKERNELS_BENCH_ROUNDS", "10" if QUICK else "30"))
# Timings measure kernels, not page faults of freshly mmap'ed outputs (see profile.py).
CPU_HEAP_KEPT = DEVICE.type == "cpu" and profile.keep_cpu_memory_mapped()
WITH_COMPILE = os.environ.get("CNNKERNELS_BENCH_COMPILE", "1" if DEVICE.type == "cuda" else "0") == "1"


def our_backends() -> list[str]:
    """Our implementations that can run on DEVICE (the Triton interpreter is not timed)."""
    info = cnnkernels.info()
    if DEVICE.type == "cpu":
        return ["cpu"] if info["cpu_ext"] else []
    return [b for b, ok in (("cuda", info["cuda_ext"]), ("triton", info["triton"])) if ok]


def implementations() -> list[str]:
    """'torch' (eager), optionally 'torch.compile', and 'cnnkernels[<backend>]' for each backend."""
    sides = ["torch"] + (["torch.compile"] if WITH_COMPILE else [])
    return sides + [f"cnnkernels[{b}]" for b in our_backends()]


def run_synchronized(fn):
    """Wrap fn so that each timed call includes the GPU work it launched."""
    if DEVICE.type != "cuda":
        return fn

    def synced():
        fn()
        torch.cuda.synchronize()
    return synced
