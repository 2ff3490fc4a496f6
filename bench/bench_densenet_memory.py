"""DenseNet-BC training steps per memory mode (naive, checkpoint, shared): step time with
pytest-benchmark, and next to it the bytes autograd keeps after the forward (extra_info).

Peak memory needs a fresh process per configuration: `cnnkernels memory densenet` measures it
(cnnkernels/memory.py); this suite shares its model and step."""
import pytest
import torch
import torch.nn.functional as F

from benchutil import DEVICE, QUICK, ROUNDS, run_synchronized
from cnnkernels import models, profile
from cnnkernels.memory import IMPLS

DEPTH, GROWTH, BATCH = (40, 12, 8) if QUICK else (100, 12, 64)


@pytest.mark.parametrize("impl", IMPLS)
def test_densenet_bc_training_step(benchmark, impl):
    torch.manual_seed(0)
    model = models.densenet_bc(DEPTH, GROWTH, memory=impl).to(DEVICE).train()
    x = torch.randn(BATCH, 3, 32, 32, device=DEVICE)
    target = torch.randint(0, 10, (BATCH,), device=DEVICE)

    def step():
        F.cross_entropy(model(x), target).backward()
        model.zero_grad(set_to_none=True)

    benchmark.extra_info["saved_activation_bytes"] = profile.saved_activation_bytes(model, x)
    benchmark.extra_info["config"] = f"DenseNet-BC L={DEPTH} k={GROWTH} batch {BATCH} 32x32"
    benchmark.pedantic(run_synchronized(step), rounds=max(3, ROUNDS // 10), warmup_rounds=1)
