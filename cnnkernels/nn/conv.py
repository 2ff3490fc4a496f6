"""Convolution layers: DepthwiseConv2d, a drop-in for nn.Conv2d(groups=in_channels), and
run_conv, which runs an nn.Conv2d's 1x1 convolutions through our pointwise op where that is
faster."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals  # the global hook registries

from .. import _extension, backend, ops
from ..ops._args import as_int, as_int_pair
from ..ops.pointwise_conv2d import KERNELS as POINTWISE_KERNELS, matmul_applies
from ..tuning import runs_torch


def run_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x), a 1x1 NCHW convolution on the CPU as our pointwise op: batched BLAS GEMMs
    forward and backward, faster there than ATen's oneDNN convolution on planes of 28x28 or more
    (ops.pointwise_conv2d.matmul_applies). Any other convolution: conv(x)."""
    if is_plain_1x1(conv) and not _has_forward_hooks(conv) and \
            pointwise_matmul_runs(x, conv.weight, conv.stride[0], conv.groups):
        return ops.pointwise_conv2d(x, conv.weight, conv.bias)
    return conv(x)


def pointwise_matmul_runs(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int) -> bool:
    """Whether ops.pointwise_conv2d(x, weight, stride=stride, groups=groups) runs on our CPU
    kernels as batched BLAS matmuls (ops.pointwise_conv2d.matmul_applies), outside autocast."""
    return x.dim() == 4 and weight.dtype == x.dtype and matmul_applies(x, stride, groups) and \
        _extension.cpu_ext and not torch.is_autocast_enabled("cpu") and \
        backend.select(x.device, POINTWISE_KERNELS, "pointwise_conv2d") == "cpu"


def _has_forward_hooks(module: nn.Module) -> bool:
    """Hooks that calling the module would run (pruning and weight_norm recompute the weight in
    a pre-hook; user hooks tap features): then the module itself must be called."""
    return bool(module._forward_pre_hooks or module._forward_hooks or
                _module_globals._global_forward_pre_hooks or
                _module_globals._global_forward_hooks)


def torch_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) as PyTorch computes it: a tunable layer's ``forward_torch`` (unless hooks expect
    the module itself to be called), any other module called."""
    forward = getattr(module, "forward_torch", None)
    if forward is None or _has_forward_hooks(module):
        return module(x)
    return forward(x)


def has_hooks(module: nn.Module) -> bool:
    """Any hook of the module's own (forward, pre-forward, backward) or a forward set on the
    instance: a layer built from copies of such a module would lose them."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_hooks or
                getattr(module, "_backward_pre_hooks", None) or "forward" in vars(module))


def is_plain_1x1(conv: nn.Conv2d) -> bool:
    """A 1x1 kernel without padding and the same stride both ways (what pointwise_conv2d runs)."""
    return type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.padding == (0, 0) and \
        conv.stride[0] == conv.stride[1]


def _positive_pair(value, name: str) -> tuple[int, int]:
    pair = tuple(as_int_pair(value, "DepthwiseConv2d", name))
    if min(pair) < 1:
        raise ValueError(f"DepthwiseConv2d: {name} must be >= 1, got {value!r}")
    return pair


class DepthwiseConv2d(nn.Module):
    """Depthwise convolution with our kernels. Parameters `weight` [C*m, 1, kh, kw] and `bias`
    [C*m] carry the same names, shapes and initialisation as nn.Conv2d(C, C*m, k, groups=C), so
    state_dicts load both ways."""

    __constants__ = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "channel_multiplier"]

    def __init__(self, in_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, channel_multiplier: int = 1, device=None, dtype=None) -> None:
        super().__init__()
        in_channels = as_int(in_channels, "DepthwiseConv2d", "in_channels")
        channel_multiplier = as_int(channel_multiplier, "DepthwiseConv2d", "channel_multiplier")
        if in_channels <= 0 or channel_multiplier <= 0:
            raise ValueError(f"DepthwiseConv2d: in_channels and channel_multiplier must be "
                             f"positive, got {in_channels} and {channel_multiplier}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.channel_multiplier = channel_multiplier
        self.out_channels = in_channels * channel_multiplier
        self.kernel_size = _positive_pair(kernel_size, "kernel_size")
        self.stride = _positive_pair(stride, "stride")
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError("DepthwiseConv2d: expected argument 'padding' to be an int, a pair "
                             f"of ints, 'same' or 'valid', got {padding!r}")
        self.padding = padding if isinstance(padding, str) else \
            tuple(as_int_pair(padding, "DepthwiseConv2d", "padding"))
        if isinstance(self.padding, tuple) and min(self.padding) < 0:
            raise ValueError(f"DepthwiseConv2d: padding must be >= 0, got {padding!r}")
        self.dilation = _positive_pair(dilation, "dilation")
        self.weight = nn.Parameter(torch.empty(self.out_channels, 1, *self.kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's initialisation (kaiming_uniform with a=sqrt(5), bias from fan-in)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_torch(self, x):
            return self.forward_torch(x)
        return self.forward_ours(x)

    def forward_ours(self, x: torch.Tensor) -> torch.Tensor:
        return ops.depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding,
                                    self.dilation)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """What nn.Conv2d(groups=in_channels) computes."""
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.in_channels)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.channel_multiplier != 1:
            text += f", channel_multiplier={self.channel_multiplier}"
        if self.bias is None:
            text += ", bias=False"
        return text

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """Ours, sharing nothing with `conv` but holding copies of its parameters."""
        if not isinstance(conv, nn.Conv2d) or conv.groups != conv.in_channels or \
                conv.out_channels % conv.in_channels:
            raise TypeError("DepthwiseConv2d.from_conv expects an nn.Conv2d with groups == "
                            f"in_channels, got {conv!r}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"DepthwiseConv2d.from_conv: padding_mode={conv.padding_mode!r} is "
                             "not supported (only 'zeros')")
        module = cls(conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     bias=conv.bias is not None,
                     channel_multiplier=conv.out_channels // conv.in_channels,
                     device=conv.weight.device, dtype=conv.weight.dtype)
        module.load_state_dict(conv.state_dict())
        module.train(conv.training)
        return module

    def to_conv(self) -> nn.Conv2d:
        """The equivalent nn.Conv2d, for export."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, groups=self.in_channels,
                         bias=self.bias is not None, device=self.weight.device,
                         dtype=self.weight.dtype)
        conv.load_state_dict(self.state_dict())
        return conv
