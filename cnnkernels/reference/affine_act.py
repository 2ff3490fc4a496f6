"""Reference affine_act: act(x * scale[c] + shift[c] (+ residual)) with torch ops, in the compute
type."""
from __future__ import annotations

import torch

from .activation import apply_activation


def affine_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: int = 0,
               negative_slope: float = 0.01, residual: torch.Tensor | None = None) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = x.to(scale.dtype) * scale.view(shape) + shift.view(shape)
    if residual is not None:
        y = y + residual.to(scale.dtype)
    return apply_activation(y, activation, negative_slope).to(x.dtype)
