"""Squeeze-and-excitation: cnnkernels.ops.squeeze_excite vs torchvision's SqueezeExcitation
composition (eager, and torch.compile where enabled), forward and forward+backward, on
MobileNetV3-Large's SE blocks (cnnkernels.cases)."""
import pytest

from benchutil import QUICK, implementations, run_case
from cnnkernels import cases


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("case", cases.cases(("squeeze_excite",), quick=QUICK),
                         ids=lambda c: f"{c.op}-{c.label}")
def test_squeeze_excite(benchmark, case, impl, direction):
    run_case(benchmark, case, impl, direction)
