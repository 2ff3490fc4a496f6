"""MobileNetV2's inverted residual block with its projection, BatchNorm and residual add fused.

torchvision's ``InvertedResidual`` ends its ``conv`` Sequential with a bare 1x1 projection and a
BatchNorm2d (no activation), and adds the block's input outside that Sequential. Neither is a
Conv → BN → act run that ``convert`` can swap for a ConvBNAct2d without renaming keys, so
`InvertedResidual` takes over the block (cnnkernels.convert, kind "inverted_residual"): the same
``conv`` Sequential under the same child names (``conv.0.*`` ... ``conv.3.*``, so the state_dict
keys do not change), its BatchNorm a BatchNormAct2d without activation, and a forward that runs the
projection as ``conv_bn_act(conv.2, conv.3, h, residual=x)``:
- eval without autograd: one pointwise op, BN folded into its epilogue with the residual add;
- training: the 1x1 conv (BLAS matmuls for NCHW CPU input), then BN + residual add in one pass.
The expansion and depthwise layers are converted by convert's walk as anywhere else.
"""
from __future__ import annotations

import torch
from torch import nn

from .batchnorm import BatchNormAct2d
from .conv import _has_forward_hooks, is_plain_1x1
from .conv_bn_act import conv_bn_act


def _torchvision_block() -> type | None:
    try:
        from torchvision.models.mobilenetv2 import InvertedResidual as block
    except ImportError:  # torchvision is optional
        return None
    return block


def is_torchvision_inverted_residual(module: nn.Module) -> bool:
    block = _torchvision_block()
    return block is not None and type(module) is block


def inverted_residual_problem(block: nn.Module) -> str | None:
    """Why a torchvision InvertedResidual does not end in a plain 1x1 projection + BatchNorm2d."""
    layers = list(block.conv.children()) if isinstance(block.conv, nn.Sequential) else []
    if len(layers) < 2:
        return "its conv is not a Sequential ending in a projection and a BatchNorm"
    conv, bn = layers[-2], layers[-1]
    if not (type(conv) is nn.Conv2d and is_plain_1x1(conv)):
        return f"its projection is not a plain 1x1 nn.Conv2d but {type(conv).__name__}"
    if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return f"its last norm layer is not BatchNorm2d but {type(bn).__name__}"
    return None


class InvertedResidual(nn.Module):
    """x + bn(project(layers(x))) (the residual when `use_res_connect`), the projection fused."""

    def __init__(self, conv: nn.Sequential, stride: int, use_res_connect: bool,
                 out_channels: int) -> None:
        super().__init__()
        if not isinstance(conv[-1], BatchNormAct2d) or not is_plain_1x1(conv[-2]):
            raise ValueError("InvertedResidual: conv must end in a 1x1 nn.Conv2d and a "
                             "BatchNormAct2d")
        self.stride = stride
        self.use_res_connect = use_res_connect
        self.out_channels = out_channels
        self.conv = conv

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "InvertedResidual":
        """Ours, holding `block`'s layers and a BatchNormAct2d copy of its last BatchNorm."""
        problem = inverted_residual_problem(block) if is_torchvision_inverted_residual(block) \
            else f"not torchvision's InvertedResidual but {type(block).__name__}"
        if problem:
            raise TypeError(f"InvertedResidual.from_torchvision: {problem}")
        names = list(block.conv._modules)
        conv = nn.Sequential()
        for name in names[:-1]:
            conv.add_module(name, block.conv._modules[name])
        conv.add_module(names[-1], BatchNormAct2d.from_modules(block.conv._modules[names[-1]]))
        return cls(conv, block.stride, block.use_res_connect,
                   block.out_channels).train(block.training)

    def to_torchvision(self) -> nn.Module:
        """torchvision's block holding the same layers, the last BatchNorm a BatchNorm2d again
        (revert then walks its layers)."""
        block_type = _torchvision_block()
        block = block_type.__new__(block_type)
        nn.Module.__init__(block)
        names = list(self.conv._modules)
        conv = nn.Sequential()
        for name in names[:-1]:
            conv.add_module(name, self.conv._modules[name])
        conv.add_module(names[-1], self.conv._modules[names[-1]].to_modules()[0])
        block.stride = self.stride
        block.use_res_connect = self.use_res_connect
        block.out_channels = self.out_channels
        block._is_cn = self.stride > 1
        block.conv = conv
        return block.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.use_res_connect else None
        if _has_forward_hooks(self.conv):  # hooks on the Sequential see its output, as before
            out = self.conv(x)
            return out + residual if residual is not None else out
        layers = list(self.conv.children())
        h = x
        for layer in layers[:-2]:
            h = layer(h)
        return conv_bn_act(layers[-2], layers[-1], h, residual)
