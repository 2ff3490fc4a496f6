"""Reference activations by code (cnnkernels/activations.py): what fused epilogues must equal."""
import torch
import torch.nn.functional as F

from .. import activations


def apply_activation(y: torch.Tensor, code: int, negative_slope: float = 0.01) -> torch.Tensor:
    if code == activations.IDENTITY:
        return y
    if code == activations.RELU:
        return F.relu(y)
    if code == activations.RELU6:
        return F.relu6(y)
    if code == activations.LEAKY_RELU:
        return F.leaky_relu(y, negative_slope)
    if code == activations.HARDSWISH:
        return F.hardswish(y)
    if code == activations.HARDSIGMOID:
        return F.hardsigmoid(y)
    raise ValueError(f"unknown activation code {code}")
