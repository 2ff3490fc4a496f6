"""Depthwise convolution: cnnkernels vs F.conv2d(groups=C) (eager, and torch.compile where
enabled), forward and forward+backward (grad for x and weight), on the layers of MobileNetV2,
MobileNetV3-Large and ConvNeXt-T (cnnkernels.cases), NCHW and channels_last."""
import pytest

from benchutil import DEVICE, QUICK, implementations, run_case
from cnnkernels import cases

# Batch 32 on a GPU; 8 on a CPU, where a full MobileNet batch takes seconds per layer.
BATCH = None if DEVICE.type == "cuda" else 8


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("case", cases.cases(("depthwise_conv2d",), quick=QUICK, batch=BATCH),
                         ids=lambda c: c.label.replace(" ", "-"))
def test_depthwise_conv2d(benchmark, case, impl, direction, layout):
    run_case(benchmark, case, impl, direction, channels_last=layout == "channels_last")
