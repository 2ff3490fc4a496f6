"""pointwise_conv2d (Conv1×1 → BatchNorm(eval) → ReLU, projections → + residual, in one op with the
BatchNorm folded into the epilogue) vs eager conv2d + batch_norm + ReLU, on issue 5's MobileNetV2,
ResNet-50 and DenseNet-121 1×1 layers (cnnkernels.cases), forward (inference), NCHW and
channels_last; and the training step of the same Conv1×1 → BN → ReLU as ConvBNAct2d runs it
(torch's conv, our batch_norm_act) vs eager."""
import pytest

from benchutil import QUICK, implementations, run_case
from cnnkernels import cases


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("case", cases.cases(("pointwise_conv2d",), quick=QUICK, batch=8),
                         ids=lambda c: f"{c.op}-{c.label}")
def test_conv_bn_act_inference(benchmark, case, impl, layout):
    run_case(benchmark, case, impl, "fwd", channels_last=layout == "channels_last")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("case", cases.cases(("pointwise_conv2d",), quick=QUICK, batch=8),
                         ids=lambda c: f"{c.op}-{c.label}")
def test_conv_bn_act_training(benchmark, case, impl, layout):
    run_case(benchmark, case, impl, "fwd+bwd", channels_last=layout == "channels_last")
