"""h-swish / h-sigmoid: cnnkernels vs torch.nn.functional (eager, and torch.compile where enabled),
forward and forward+backward, on shapes from MobileNetV3 (cnnkernels.cases)."""
import pytest

from benchutil import QUICK, implementations, run_case
from cnnkernels import cases


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("case", cases.cases(("hardswish", "hardsigmoid"), quick=QUICK),
                         ids=lambda c: f"{c.op}-{c.label}")
def test_activation(benchmark, case, impl, direction):
    run_case(benchmark, case, impl, direction)
