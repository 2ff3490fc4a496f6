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


def backend_of(impl: str) -> str:
    return impl[len("cnnkernels["):-1] if impl.startswith("cnnkernels[") else "auto"


def run_case(benchmark, case, impl: str, direction: str, dtype=torch.float32,
             channels_last: bool = False) -> None:
    """Time one case (cnnkernels.cases) on one side, forward or forward+backward, and record next
    to it the speed-up over PyTorch eager measured round-robin on the same tensors."""
    from cnnkernels import cases

    prepared = cases.prepare(case, DEVICE, dtype, requires_grad=direction != "fwd",
                             channels_last=channels_last)
    if impl == "torch":
        side = prepared.torch_fn
    elif impl == "torch.compile":
        side = profile.compile_fresh(prepared.torch_fn)
    else:
        side = prepared.ours_fn
    grad = torch.randn_like(prepared.torch_fn()) if direction != "fwd" else None

    def make(fn):
        if direction == "fwd":
            return run_synchronized(fn)
        return run_synchronized(lambda: torch.autograd.grad(fn(), prepared.leaves, grad))

    layout = " channels_last" if channels_last else ""
    benchmark.group = f"{case.op} {case.label}{layout} {str(dtype)[6:]} {direction} [{DEVICE.type}]"
    benchmark.extra_info.update(op=case.op, shape=case.shape, kernel=case.kernel,
                                stride=case.stride, impl=impl, direction=direction,
                                device=cnnkernels.info()["device"], source=case.source,
                                channels_last=channels_last, cpu_heap_kept=CPU_HEAP_KEPT)
    with cnnkernels.use_backend(backend_of(impl)):
        target = make(side)
        target()  # warm-up (and compilation for torch.compile) outside the timed rounds
        benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=2)
        if impl != "torch" and benchmark.enabled:
            # Rounds of different benchmarks run minutes apart; a ratio of medians measured
            # round-robin with PyTorch on the same tensors is robust to the machine's drift.
            medians = profile.compare_times({"torch": make(prepared.torch_fn), "ours": target},
                                            DEVICE, reps=ROUNDS)
            benchmark.extra_info["speedup_vs_torch_interleaved"] = medians["torch"] / medians["ours"]
