"""torchvision models, plain vs cnnkernels.convert-ed: training step and inference, with the
round-robin speed-up in extra_info (cnnkernels/models_bench.py; `cnnkernels bench models`)."""
import pytest
import torch

from benchutil import DEVICE, QUICK, ROUNDS, run_synchronized
from cnnkernels import models_bench

BATCH, IMAGE = (2, 128) if QUICK else (8, 224)
pytest.importorskip("torchvision")


@pytest.mark.parametrize("direction", ["inference", "training"])
@pytest.mark.parametrize("side", ["torch", "cnnkernels"])
@pytest.mark.parametrize("name", models_bench.MODELS)
def test_model_step(benchmark, name, side, direction):
    plain, converted, counts = models_bench.build(name, DEVICE, torch.float32)
    model = converted if side == "cnnkernels" else plain
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, device=DEVICE)
    step = models_bench.step_fn(model, x, direction)
    benchmark.extra_info["swapped"] = counts
    benchmark.pedantic(run_synchronized(step), rounds=max(3, ROUNDS // 10), warmup_rounds=1)
