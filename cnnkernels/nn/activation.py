"""Activation layers: drop-ins for nn.Hardswish / nn.Hardsigmoid (same `inplace` argument)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..tuning import runs_torch


class _ElementwiseActivation(nn.Module):
    __constants__ = ["inplace"]
    torch_type: type[nn.Module]

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""

    @classmethod
    def from_torch(cls, module: nn.Module):
        """Build ours from the PyTorch module it replaces (keeps `inplace`)."""
        if not isinstance(module, cls.torch_type):
            raise TypeError(f"{cls.__name__}.from_torch expects {cls.torch_type.__name__}, "
                            f"got {type(module).__name__}")
        return cls(inplace=module.inplace)

    def to_torch(self) -> nn.Module:
        return self.torch_type(inplace=self.inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_torch(self, x):
            return self.forward_torch(x)
        return self.forward_ours(x)


class HardSwish(_ElementwiseActivation):
    """x * relu6(x + 3) / 6, the same numbers as nn.Hardswish, with our kernels."""

    torch_type = nn.Hardswish

    def forward_ours(self, x: torch.Tensor) -> torch.Tensor:
        return ops.hardswish(x, inplace=self.inplace)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(x, inplace=self.inplace)


class HardSigmoid(_ElementwiseActivation):
    """relu6(x + 3) / 6, the same numbers as nn.Hardsigmoid, with our kernels."""

    torch_type = nn.Hardsigmoid

    def forward_ours(self, x: torch.Tensor) -> torch.Tensor:
        return ops.hardsigmoid(x, inplace=self.inplace)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardsigmoid(x, inplace=self.inplace)
