"""SqueezeExcite: torchvision's SqueezeExcitation (fc1, fc2 as 1x1 convolutions; the same
state_dict keys) computed by cnnkernels.ops.squeeze_excite (one fused backward pass)."""
from __future__ import annotations

import torch
from torch import nn

from .. import activations
from ..ops.squeeze_excite import GATES, squeeze_excite
from .batchnorm import _TORCH_ACTIVATIONS

_TORCH_GATES = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}


def _torchvision_se():
    try:
        from torchvision.ops import SqueezeExcitation
    except ImportError:  # torchvision is optional
        return None
    return SqueezeExcitation


def is_torchvision_squeeze_excitation(module: nn.Module) -> bool:
    cls = _torchvision_se()
    return cls is not None and type(module) is cls


def unsupported_parts(module: nn.Module) -> str | None:
    """Why a torchvision SqueezeExcitation cannot become ours (None if it can)."""
    if type(module.activation) not in _TORCH_ACTIVATIONS:
        return f"activation {type(module.activation).__name__} is not one of ours"
    if type(module.scale_activation) not in _TORCH_GATES:
        return f"scale_activation {type(module.scale_activation).__name__} (only Sigmoid, Hardsigmoid)"
    return None


class SqueezeExcite(nn.Module):
    """x · gate(fc2(act(fc1(mean_hw(x))))) with torchvision SqueezeExcitation's parameters."""

    def __init__(self, input_channels: int, squeeze_channels: int, activation: str = "relu",
                 gate: str = "sigmoid", negative_slope: float = 0.01, device=None,
                 dtype=None) -> None:
        super().__init__()
        activations.activation_code(activation)
        if gate not in GATES:
            raise ValueError(f"SqueezeExcite: unknown gate {gate!r}; expected one of {', '.join(GATES)}")
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1, device=device, dtype=dtype)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1, device=device, dtype=dtype)
        self.activation, self.gate, self.negative_slope = activation, gate, float(negative_slope)

    @classmethod
    def from_torchvision(cls, se: nn.Module) -> "SqueezeExcite":
        if not is_torchvision_squeeze_excitation(se):
            raise TypeError(f"SqueezeExcite.from_torchvision expects torchvision.ops."
                            f"SqueezeExcitation, got {type(se).__name__}")
        problem = unsupported_parts(se)
        if problem:
            raise TypeError(f"SqueezeExcite.from_torchvision: {problem}")
        act = se.activation
        module = cls(se.fc1.in_channels, se.fc1.out_channels, _TORCH_ACTIVATIONS[type(act)],
                     _TORCH_GATES[type(se.scale_activation)],
                     act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.01,
                     device=se.fc1.weight.device, dtype=se.fc1.weight.dtype)
        module.load_state_dict(se.state_dict())
        return module.train(se.training)

    def to_torchvision(self) -> nn.Module:
        act_type = {name: t for t, name in _TORCH_ACTIVATIONS.items()}[self.activation]
        gate_type = {name: t for t, name in _TORCH_GATES.items()}[self.gate]
        act = (lambda: act_type(self.negative_slope)) if self.activation == "leaky_relu" else act_type
        se = _torchvision_se()(self.fc1.in_channels, self.fc1.out_channels, act, gate_type)
        se = se.to(device=self.fc1.weight.device, dtype=self.fc1.weight.dtype)
        se.load_state_dict(self.state_dict())
        return se.train(self.training)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, gate={self.gate!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return squeeze_excite(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                              self.activation, self.gate, self.negative_slope)
