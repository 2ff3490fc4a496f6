"""BatchNorm2d + activation: cnnkernels.nn.BatchNormAct2d vs nn.BatchNorm2d → nn.ReLU (eager),
training forward+backward and evaluation, on MobileNetV2 / ResNet-50 / DenseNet-121 shapes."""
import pytest
import torch
from torch import nn

from benchutil import DEVICE, QUICK, run_synchronized
from cnnkernels.nn import BatchNormAct2d

SHAPES = [(8, 96, 28, 28)] if QUICK else [(32, 96, 56, 56), (32, 144, 56, 56), (32, 256, 56, 56),
                                          (32, 384, 14, 14), (32, 1024, 14, 14)]


@pytest.mark.parametrize("direction", ["eval", "fwd+bwd"])
@pytest.mark.parametrize("side", ["torch", "cnnkernels"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_relu(benchmark, shape, side, direction):
    reference = nn.Sequential(nn.BatchNorm2d(shape[1]), nn.ReLU(inplace=True)).to(DEVICE)
    module = BatchNormAct2d.from_modules(reference[0], reference[1]) if side == "cnnkernels" else reference
    x = torch.randn(shape, device=DEVICE)
    if direction == "eval":
        module.eval()

        def step():
            with torch.no_grad():
                module(x)
    else:
        module.train()
        x.requires_grad_()
        grad = torch.randn(shape, device=DEVICE)

        def step():
            torch.autograd.grad(module(x), x, grad)
    benchmark(run_synchronized(step))
