"""Reference affine_act: act(x * scale[c] + shift[c]) with torch ops, in the compute type."""
from __future__ import annotations

import torch

from .activation import apply_activation


def affine_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: int = 0,
               negative_slope: float = 0.01) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = x.to(scale.dtype) * scale.view(shape) + shift.view(shape)
    return apply_activation(y, activation, negative_slope).to(x.dtype)
