"""batch_norm_act: act(BatchNorm(x)) with autograd that keeps only the input.

PyTorch's `BatchNorm2d → activation` keeps two input-sized tensors for backward (the BN input and
the activation's input or output). Here backward recomputes BatchNorm's output from the saved
input and per-channel statistics in one `affine_act` pass, so autograd keeps x alone. Evaluation
(running statistics) is a single fused pass. First version: forward statistics and the backward
reductions are ATen's (native_batch_norm, native_batch_norm_backward) — the fused one-pass kernels,
the residual input and SyncBN of the BN+act issue are still to come.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import activations
from .affine_act import _compute_dtype, affine_act


def fold_statistics(mean, invstd, weight, bias, compute):
    """(scale, shift) with which fma(x, scale, shift) is BatchNorm's output, folded as ATen's CPU
    kernel folds it: alpha = invstd·weight, beta = fma(−mean, alpha, bias) (float32: an exact
    float64 product and one subtraction)."""
    invstd = invstd.to(compute)
    scale = invstd if weight is None else invstd * weight.to(compute)
    bias_ = torch.zeros_like(scale) if bias is None else bias.to(compute)
    shift = (bias_.double() - mean.double() * scale.double()).to(compute)
    return scale, shift


def _eval_invstd(running_var, eps, compute):
    return torch.reciprocal(torch.sqrt(running_var.to(compute) + eps))


def _act_(y, code, negative_slope):
    if code == activations.RELU:
        y.relu_()
    elif code == activations.RELU6:
        F.relu6(y, inplace=True)
    elif code == activations.LEAKY_RELU:
        F.leaky_relu_(y, negative_slope)
    elif code == activations.HARDSWISH:
        F.hardswish(y, inplace=True)
    elif code == activations.HARDSIGMOID:
        F.hardsigmoid(y, inplace=True)
    return y


def _act_backward(grad, pre, code, negative_slope):
    """The activation's backward as autograd computes it, from its input."""
    aten = torch.ops.aten
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
    return grad


class _BatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, code,
                negative_slope):
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps)
        _act_(y, code, negative_slope)
        if not training:  # backward folds the statistics used now, even if the buffers move later
            mean = running_mean.clone()
            invstd = _eval_invstd(running_var, eps, _compute_dtype(x.dtype))
        ctx.config = (training, eps, code, negative_slope, weight is None, bias is None)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        training, eps, code, negative_slope, no_weight, no_bias = ctx.config
        x, weight, bias, mean, invstd = ctx.saved_tensors
        scale, shift = fold_statistics(mean, invstd, weight, bias, _compute_dtype(x.dtype))
        pre = affine_act(x, scale, shift, "identity")  # BatchNorm's output again, one pass
        grad_pre = _act_backward(grad.contiguous(memory_format=_format(x)), pre, code,
                                 negative_slope)
        del pre
        if training:
            grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_pre, x, weight, None, None, mean, invstd, True, eps,
                [ctx.needs_input_grad[0], not no_weight, not no_bias])
        else:  # running statistics are constants: dx = g·scale, dw = Σ g·x̂, db = Σ g
            dims = [d for d in range(x.dim()) if d != 1]
            shape = [1, -1] + [1] * (x.dim() - 2)
            grad_x = grad_pre * scale.view(shape).to(x.dtype)
            x_hat = (x.to(scale.dtype) - mean.view(shape).to(scale.dtype)) * invstd.view(shape)
            grad_w = None if no_weight else (grad_pre.to(scale.dtype) * x_hat).sum(dims).to(weight.dtype)
            grad_b = None if no_bias else grad_pre.sum(dims).to(bias.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def _format(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def batch_norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                   training: bool, momentum: float = 0.1, eps: float = 1e-5,
                   activation: str = "relu", negative_slope: float = 0.01) -> torch.Tensor:
    """act(batch_norm(x, ...)) with F.batch_norm's arguments (training uses batch statistics and
    updates the running ones in place with `momentum`)."""
    code = activations.activation_code(activation)
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("batch_norm_act: expected argument 'x' to be a tensor [N, C, ...], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if training:
        F._verify_batch_size(x.size())
    elif running_mean is None or running_var is None:
        raise ValueError("batch_norm_act: evaluation needs running_mean and running_var")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if not training and not needs_grad:  # one fused pass with the running statistics
        compute = _compute_dtype(x.dtype)
        scale, shift = fold_statistics(running_mean, _eval_invstd(running_var, eps, compute), weight, bias,
                             compute)
        return affine_act(x, scale, shift, activation, negative_slope)
    return _BatchNormAct.apply(x, weight, bias, running_mean, running_var, training, momentum,
                               eps, code, float(negative_slope))
