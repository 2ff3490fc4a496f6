"""Reference squeeze_excite backward pass with torch ops, in the compute type."""
from __future__ import annotations

import torch


def squeeze_excite_backward(grad: torch.Tensor, x: torch.Tensor,
                            gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad · gate[n, c], Σ_hw grad · x)."""
    g = grad.to(gate.dtype)
    grad_x = (g * gate[:, :, None, None]).to(x.dtype)
    return grad_x, (g * x.to(gate.dtype)).sum((2, 3))
