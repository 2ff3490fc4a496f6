"""SqueezeExcite: torchvision's SqueezeExcitation (fc1, fc2 as 1x1 convolutions; the same
state_dict keys) computed by cnnkernels.ops.squeeze_excite (one fused backward pass)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import activations
from ..ops.squeeze_excite import GATES, squeeze_excite
from ..tuning import runs_torch
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


def _plain_1x1_problem(name: str, conv: nn.Module) -> str | None:
    if type(conv) is not nn.Conv2d or conv.kernel_size != (1, 1) or conv.stride != (1, 1) or \
            conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1 or \
            conv.bias is None:
        return f"its {name} is not a plain 1x1 nn.Conv2d with a bias"
    return None


def unsupported_parts(module: nn.Module) -> str | None:
    """Why a torchvision SqueezeExcitation cannot become ours (None if it can)."""
    pool = getattr(module, "avgpool", None)
    if type(pool) is not nn.AdaptiveAvgPool2d or pool.output_size not in (1, (1, 1)):
        return f"its avgpool is {type(pool).__name__}, not AdaptiveAvgPool2d(1)"
    problem = _plain_1x1_problem("fc1", module.fc1) or _plain_1x1_problem("fc2", module.fc2)
    if problem:
        return problem
    if type(module.activation) not in _TORCH_ACTIVATIONS:
        return f"activation {type(module.activation).__name__} is not one of ours"
    if type(module.scale_activation) not in _TORCH_GATES:
        return f"scale_activation {type(module.scale_activation).__name__} (only Sigmoid, Hardsigmoid)"
    return None


def is_timm_squeeze_excite(module: nn.Module) -> bool:
    """timm's SqueezeExcite of EfficientNet / MobileNetV3 (conv_reduce, act1, conv_expand, gate)."""
    return type(module).__name__ == "SqueezeExcite" and type(module).__module__.startswith("timm.") \
        and all(hasattr(module, name) for name in ("conv_reduce", "act1", "conv_expand", "gate"))


def timm_unsupported_parts(module: nn.Module) -> str | None:
    """Why a timm SqueezeExcite cannot become ours (None if it can)."""
    if type(module.act1) not in _TORCH_ACTIVATIONS:
        return f"activation {type(module.act1).__name__} is not one of ours"
    if type(module.gate) not in _TORCH_GATES:
        return f"gate {type(module.gate).__name__} (only Sigmoid, Hardsigmoid)"
    problem = _plain_1x1_problem("conv_reduce", module.conv_reduce) or \
        _plain_1x1_problem("conv_expand", module.conv_expand)
    if problem:
        return problem
    if getattr(module, "add_maxpool", False):
        return "it adds a max pool to the mean"
    if type(getattr(module, "bn", nn.Identity())) is not nn.Identity:
        return f"its bn is {type(module.bn).__name__}"
    return None


class SqueezeExcite(nn.Module):
    """x · gate(fc2(act(fc1(mean_hw(x))))) with torchvision SqueezeExcitation's parameters."""

    # names of the two 1x1 convolutions (state_dict keys); TimmSqueezeExcite uses timm's
    _names = ("fc1", "fc2")

    def __init__(self, input_channels: int, squeeze_channels: int, activation: str = "relu",
                 gate: str = "sigmoid", negative_slope: float = 0.01, device=None,
                 dtype=None) -> None:
        super().__init__()
        activations.activation_code(activation)
        if gate not in GATES:
            raise ValueError(f"SqueezeExcite: unknown gate {gate!r}; expected one of {', '.join(GATES)}")
        self.add_module(self._names[0], nn.Conv2d(input_channels, squeeze_channels, 1,
                                                  device=device, dtype=dtype))
        self.add_module(self._names[1], nn.Conv2d(squeeze_channels, input_channels, 1,
                                                  device=device, dtype=dtype))
        self.activation, self.gate, self.negative_slope = activation, gate, float(negative_slope)

    @property
    def reduce(self) -> nn.Conv2d:
        """The squeezing 1x1 convolution (fc1)."""
        return self._modules[self._names[0]]  # type: ignore[return-value]

    @property
    def expand(self) -> nn.Conv2d:
        """The expanding 1x1 convolution (fc2)."""
        return self._modules[self._names[1]]  # type: ignore[return-value]

    @classmethod
    def from_torchvision(cls, se: nn.Module) -> "SqueezeExcite":
        if not is_torchvision_squeeze_excitation(se):
            raise TypeError(f"SqueezeExcite.from_torchvision expects torchvision.ops."
                            f"SqueezeExcitation, got {type(se).__name__}")
        problem = unsupported_parts(se)
        if problem:
            raise TypeError(f"SqueezeExcite.from_torchvision: {problem}")
        return cls._copy_of(se, se.fc1, se.activation, se.scale_activation)

    @classmethod
    def from_timm(cls, se: nn.Module) -> "TimmSqueezeExcite":
        """Ours with timm's key names (conv_reduce, conv_expand) and a copy of its parameters."""
        if not is_timm_squeeze_excite(se):
            raise TypeError(f"SqueezeExcite.from_timm expects timm's SqueezeExcite, got "
                            f"{type(se).__name__}")
        problem = timm_unsupported_parts(se)
        if problem:
            raise TypeError(f"SqueezeExcite.from_timm: {problem}")
        return TimmSqueezeExcite._copy_of(se, se.conv_reduce, se.act1, se.gate)

    @classmethod
    def _copy_of(cls, se: nn.Module, reduce: nn.Conv2d, act: nn.Module, gate: nn.Module):
        """A `cls` with the activation and gate of `se` and a copy of its state (same keys)."""
        module = cls(reduce.in_channels, reduce.out_channels, _TORCH_ACTIVATIONS[type(act)],
                     _TORCH_GATES[type(gate)],
                     act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.01,
                     device=reduce.weight.device, dtype=reduce.weight.dtype)
        module.load_state_dict(se.state_dict())
        return module.train(se.training)

    def to_torchvision(self) -> nn.Module:
        act_type = {name: t for t, name in _TORCH_ACTIVATIONS.items()}[self.activation]
        gate_type = {name: t for t, name in _TORCH_GATES.items()}[self.gate]
        act = (lambda: act_type(self.negative_slope)) if self.activation == "leaky_relu" else act_type
        se = _torchvision_se()(self.reduce.in_channels, self.reduce.out_channels, act, gate_type)
        se = se.to(device=self.reduce.weight.device, dtype=self.reduce.weight.dtype)
        se.load_state_dict(self.state_dict())
        return se.train(self.training)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, gate={self.gate!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_torch(self, x):
            return self.forward_torch(x)
        return self.forward_ours(x)

    def forward_ours(self, x: torch.Tensor) -> torch.Tensor:
        return squeeze_excite(x, self.reduce.weight, self.reduce.bias, self.expand.weight,
                              self.expand.bias, self.activation, self.gate, self.negative_slope)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """What torchvision's SqueezeExcitation computes."""
        scale = self.reduce(F.adaptive_avg_pool2d(x, 1))
        scale = self.expand(activations.torch_activation(scale, self.activation,
                                                         self.negative_slope))
        scale = torch.sigmoid(scale) if self.gate == "sigmoid" else F.hardsigmoid(scale)
        return scale * x


class TimmSqueezeExcite(SqueezeExcite):
    """SqueezeExcite with timm's state_dict keys (conv_reduce, conv_expand), as convert() puts in
    place of timm's SqueezeExcite."""

    _names = ("conv_reduce", "conv_expand")
