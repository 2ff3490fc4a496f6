"""torchvision models, plain vs cnnkernels.convert-ed (and torch.compile of the plain model with
CNNKERNELS_BENCH_COMPILE=1): training step and inference (cnnkernels/models_bench.py; `cnnkernels
bench models [--compile]`)."""
import pytest
import torch

from benchutil import DEVICE, QUICK, ROUNDS, WITH_COMPILE, run_synchronized
from cnnkernels import models_bench, profile

BATCH, IMAGE = (2, 128) if QUICK else (8, 224)
pytest.importorskip("torchvision")


@pytest.mark.parametrize("direction", ["inference", "training"])
@pytest.mark.parametrize("side", ["torch", "cnnkernels"] + (["torch.compile"] if WITH_COMPILE else []))
@pytest.mark.parametrize("name", models_bench.CORE_MODELS)
def test_model_step(benchmark, name, side, direction):
    plain, converted, counts = models_bench.build(name, DEVICE, torch.float32)
    model = {"cnnkernels": converted, "torch": plain}.get(side) or profile.compile_fresh(plain)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, device=DEVICE)
    step = models_bench.step_fn(model, x, direction)
    benchmark.extra_info["swapped"] = counts
    benchmark.pedantic(run_synchronized(step), rounds=max(3, ROUNDS // 10), warmup_rounds=1)
