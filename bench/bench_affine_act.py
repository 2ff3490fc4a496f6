"""affine_act (BatchNorm's elementwise pass with folded statistics, fused with the activation):
cnnkernels.ops.affine_act vs `relu_(x * scale + shift)` in torch ops, forward only (it has no
autograd), on the BatchNorm shapes of cnnkernels.cases, in NCHW and channels_last."""
import pytest

from benchutil import QUICK, implementations, run_case
from cnnkernels import cases


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("case", cases.cases(("affine_act",), quick=QUICK),
                         ids=lambda c: f"{c.op}-{c.label}")
def test_affine_relu(benchmark, case, impl, layout):
    run_case(benchmark, case, impl, "fwd", channels_last=layout == "channels_last")
