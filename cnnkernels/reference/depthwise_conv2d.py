"""Reference depthwise convolution: F.conv2d(groups=C), then the optional inference epilogue."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activation import apply_activation


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     stride: list[int], padding: list[int], dilation: list[int],
                     scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                     activation: int = 0, negative_slope: float = 0.01) -> torch.Tensor:
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])
    if scale is not None:
        y = y * scale.to(y.dtype).view(1, -1, 1, 1) + shift.to(y.dtype).view(1, -1, 1, 1)
    return apply_activation(y, activation, negative_slope)
