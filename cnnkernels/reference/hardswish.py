"""Reference h-swish / h-sigmoid: PyTorch's own kernels are the definition we match bit for bit."""
import torch
import torch.nn.functional as F


def hardswish(x: torch.Tensor) -> torch.Tensor:
    return F.hardswish(x)


def hardswish_(x: torch.Tensor) -> torch.Tensor:
    return F.hardswish(x, inplace=True)


def hardswish_backward(grad_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.hardswish_backward(grad_output, x)


def hardswish_second_derivative(x: torch.Tensor) -> torch.Tensor:
    """d²/dx² hardswish(x): 1/3 on the open interval (-3, 3), 0 elsewhere."""
    inside = (x > -3.0) & (x < 3.0)
    return torch.where(inside, torch.full_like(x, 1.0 / 3.0), torch.zeros_like(x))


def hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.hardsigmoid(x)


def hardsigmoid_(x: torch.Tensor) -> torch.Tensor:
    return F.hardsigmoid(x, inplace=True)


def hardsigmoid_backward(grad_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.hardsigmoid_backward(grad_output, x)


def hardsigmoid_second_derivative(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)
