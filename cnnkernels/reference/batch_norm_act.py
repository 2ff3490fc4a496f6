"""Reference batch_norm_act kernels (statistics, backward reductions, backward elementwise pass)
with torch ops in the compute type: the semantics of the csrc/ and Triton kernels."""
from __future__ import annotations

import torch

from .activation import activation_backward


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view([1, -1] + [1] * (x.dim() - 2))


def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(x.to(compute), _channel_dims(x), correction=0)
    return mean, var


def _dz(grad, x, scale, shift, residual, activation, negative_slope):
    pre = x.to(scale.dtype) * _per_channel(scale, x) + _per_channel(shift, x)
    if residual is not None:
        pre = pre + residual.to(scale.dtype)
    return activation_backward(grad.to(scale.dtype), pre, activation, negative_slope)


def backward_reduce(grad, x, scale, shift, mean, residual=None, activation=0,
                    negative_slope=0.01) -> tuple[torch.Tensor, torch.Tensor]:
    dz = _dz(grad, x, scale, shift, residual, activation, negative_slope)
    xmu = x.to(scale.dtype) - _per_channel(mean, x)
    dims = _channel_dims(x)
    return dz.sum(dims), (dz * xmu).sum(dims)


def backward_elemt(grad, x, scale, shift, mean, coef_dz, coef_xmu, coef_1, residual=None,
                   activation=0, negative_slope=0.01, residual_grad=False):
    dz = _dz(grad, x, scale, shift, residual, activation, negative_slope)
    xmu = x.to(scale.dtype) - _per_channel(mean, x)
    dx = _per_channel(coef_dz, x) * dz + _per_channel(coef_xmu, x) * xmu + _per_channel(coef_1, x)
    grad_residual = dz.to(x.dtype) if residual is not None and residual_grad else x.new_empty(0)
    return dx.to(x.dtype), grad_residual
