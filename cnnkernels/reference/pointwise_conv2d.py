"""Reference pointwise_conv2d with torch ops: act(scale·conv1x1(x) + shift + bias (+ residual)),
the epilogue in the compute type (the semantics of csrc/pointwise_conv2d.cpp)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activation import apply_activation


def epilogue_vectors(x, out_channels, bias, scale, shift):
    """(scale, shift + bias) in the compute type; ones / zeros where absent."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = scale if scale is not None else torch.ones(out_channels, dtype=compute, device=x.device)
    t = torch.zeros(out_channels, dtype=compute, device=x.device) if shift is None else shift
    return s, t if bias is None else t + bias


def pointwise_conv2d(x, weight, bias=None, stride=1, groups=1, scale=None, shift=None,
                     residual=None, activation=0, negative_slope=0.01):
    z = F.conv2d(x, weight, None, stride, 0, 1, groups)
    s, t = epilogue_vectors(x, weight.shape[0], bias, scale, shift)
    pre = z.to(s.dtype) * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)
    if residual is not None:
        pre = pre + residual.to(s.dtype)
    return apply_activation(pre, activation, negative_slope).to(x.dtype)
