"""BatchNorm2d + ReLU: cnnkernels.ops.batch_norm_act vs F.batch_norm → relu_ (eager, and
torch.compile where enabled), evaluation ("fwd") and a training step ("fwd+bwd"), on MobileNetV2 /
ResNet-50 / DenseNet-121 shapes (cnnkernels.cases), in NCHW and channels_last."""
import pytest

from benchutil import QUICK, implementations, run_case
from cnnkernels import cases


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("case", cases.cases(("batch_norm_act",), quick=QUICK),
                         ids=lambda c: f"{c.op}-{c.label}")
def test_batch_norm_relu(benchmark, case, impl, direction, layout):
    run_case(benchmark, case, impl, direction, channels_last=layout == "channels_last")
