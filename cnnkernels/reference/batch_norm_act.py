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


def fold(mean, var, weight, bias, running_mean, running_var, momentum, eps, count):
    """(scale, shift, invstd) from the batch statistics, and the running statistics' update in
    place (unbiased variance; skipped for an empty batch, where scale = 0 and shift = bias)."""
    invstd = torch.rsqrt(var + eps) if count > 0 else torch.zeros_like(var)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    bias_ = torch.zeros_like(scale) if bias is None else bias.to(scale.dtype)
    shift = bias_ - mean * scale if count > 0 else bias_.clone()
    if running_mean is not None and count > 0:
        for running, batch in ((running_mean, mean), (running_var, var * (count / max(count - 1, 1)))):
            running.copy_(momentum * batch.to(running.dtype) + (1 - momentum) * running)
    return scale, shift, invstd


def backward_coefs(sum_dz, sum_dz_xmu, scale, invstd, count):
    """(Σdz·x̂, k_xmu, k_1) of backward_elemt: dx = scale·dz + k_xmu·(x − mean) + k_1."""
    dz_xhat = sum_dz_xmu * invstd
    n = max(count, 1)
    return dz_xhat, scale * dz_xhat * invstd * (-1.0 / n), scale * sum_dz * (-1.0 / n)
