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


def activation_backward(grad: torch.Tensor, pre: torch.Tensor, code: int,
                        negative_slope: float = 0.01) -> torch.Tensor:
    """grad · act'(pre) as autograd computes it for the activation's input `pre`."""
    aten = torch.ops.aten
    if code == activations.IDENTITY:
        return grad
    if code == activations.RELU:
        return aten.threshold_backward(grad, pre, 0)
    if code == activations.RELU6:
        return aten.hardtanh_backward(grad, pre, 0.0, 6.0)
    if code == activations.LEAKY_RELU:
        return aten.leaky_relu_backward(grad, pre, negative_slope, False)
    if code == activations.HARDSWISH:
        return aten.hardswish_backward(grad, pre)
    if code == activations.HARDSIGMOID:
        return aten.hardsigmoid_backward(grad, pre)
    raise ValueError(f"unknown activation code {code}")
