"""h-swish / h-sigmoid: cnnkernels vs torch.nn.functional (eager, and torch.compile where enabled),
forward and forward+backward, on shapes from MobileNetV3 (cnnkernels.cases)."""
import pytest
import torch
import torch.nn.functional as F

import cnnkernels
from cnnkernels import cases, ops, profile

from benchutil import CPU_HEAP_KEPT, DEVICE, QUICK, ROUNDS, implementations, run_synchronized

DTYPE = torch.float32
TORCH_FNS = {"hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid}
OUR_FNS = {"hardswish": ops.hardswish, "hardsigmoid": ops.hardsigmoid}


def pick_function(op: str, impl: str):
    if impl == "torch":
        return TORCH_FNS[op]
    if impl == "torch.compile":
        return torch.compile(TORCH_FNS[op])
    return OUR_FNS[op]


def backend_of(impl: str) -> str:
    return impl[len("cnnkernels["):-1] if impl.startswith("cnnkernels[") else "auto"


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("case", cases.cases(quick=QUICK), ids=lambda c: f"{c.op}-{c.label}")
def test_activation(benchmark, case, impl, direction):
    torch.manual_seed(0)
    x = (torch.randn(case.shape, device=DEVICE, dtype=DTYPE) * 4).requires_grad_(direction != "fwd")
    grad = torch.randn_like(x)
    fn = pick_function(case.op, impl)

    def forward():
        return fn(x)

    def forward_backward():
        torch.autograd.grad(fn(x), x, grad)

    benchmark.group = f"{case.op} {case.label} {str(DTYPE)[6:]} {direction} [{DEVICE.type}]"
    benchmark.extra_info.update(op=case.op, shape=case.shape, impl=impl, direction=direction,
                                cpu_heap_kept=CPU_HEAP_KEPT,
                                device=cnnkernels.info()["device"], source=case.source)
    with cnnkernels.use_backend(backend_of(impl)):
        target = run_synchronized(forward if direction == "fwd" else forward_backward)
        target()  # warm-up (and compilation for torch.compile) outside the timed rounds
        benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=2)
        if impl != "torch" and benchmark.enabled:
            # Rounds of different benchmarks run minutes apart; a ratio from medians measured
            # round-robin with PyTorch on the same tensors is robust to the machine's drift.
            reference = TORCH_FNS[case.op]
            torch_side = (lambda: reference(x)) if direction == "fwd" else (
                lambda: torch.autograd.grad(reference(x), x, grad))
            medians = profile.compare_times({"torch": torch_side, "ours": target}, DEVICE,
                                            reps=ROUNDS)
            benchmark.extra_info["speedup_vs_torch_interleaved"] = medians["torch"] / medians["ours"]
