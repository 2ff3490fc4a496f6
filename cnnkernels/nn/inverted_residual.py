"""MobileNetV2/V3 inverted residual blocks with the projection, its BatchNorm and the residual add
fused.

torchvision's blocks add their input outside the Sequential that holds their layers, so the
projection's BatchNorm cannot take the residual in the same pass; and MobileNetV2's ends that
Sequential with a bare 1x1 projection and a BatchNorm2d (no activation), which is no Conv → BN →
act run that ``convert`` could swap for a ConvBNAct2d without renaming keys. `InvertedResidual`
takes over either block (cnnkernels.convert, kind "inverted_residual"): the same Sequential under
the same name and child names (``conv.0.*`` ... ``conv.3.*`` in V2, ``block.0.*`` ... in V3), so
the state_dict keys do not change, and a forward that runs the projection with the residual:
- eval without autograd: one pointwise op, BN folded into its epilogue with the residual add;
- training: the 1x1 conv (BLAS matmuls for NCHW CPU input), then BN + residual add in one pass.
In V2 the projection's conv and BatchNorm2d stay as they are and run fused from the block; in V3 the
projection is a Conv2dNormActivation, which convert's walk makes a ConvBNAct2d as anywhere else
(with conv_bn_act excluded it stays, and the add runs after it as in torchvision).
"""
from __future__ import annotations

import torch
from torch import nn

from .batchnorm import NORMS, BatchNormAct2d, FoldCache
from .conv import _has_forward_hooks, is_plain_1x1, torch_call
from .conv_bn_act import ConvBNAct2d, conv_bn_act
from ..tuning import runs_torch
from .recompute import kept_as_recipe

_NORMS = (*NORMS, BatchNormAct2d)


def _torchvision_blocks() -> dict[type, str]:
    """{torchvision block class: the name of its layers' Sequential}."""
    try:
        from torchvision.models import mobilenetv2, mobilenetv3
    except ImportError:  # torchvision is optional
        return {}
    return {mobilenetv2.InvertedResidual: "conv", mobilenetv3.InvertedResidual: "block"}


def is_torchvision_inverted_residual(module: nn.Module) -> bool:
    return type(module) in _torchvision_blocks()


def inverted_residual_problem(block: nn.Module) -> str | None:
    """Why a torchvision inverted residual block does not end in a projection we can fuse."""
    name = _torchvision_blocks()[type(block)]
    layers = getattr(block, name, None)
    if not isinstance(layers, nn.Sequential) or len(layers) < 2:
        return f"its {name} is not a Sequential of at least two layers"
    if name == "block":  # V3: the projection is a Conv2dNormActivation without activation
        return None
    conv, bn = layers[-2], layers[-1]
    if not (type(conv) is nn.Conv2d and is_plain_1x1(conv)):
        return f"its projection is not a plain 1x1 nn.Conv2d but {type(conv).__name__}"
    if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return f"its last norm layer is not BatchNorm2d but {type(bn).__name__}"
    return None


class InvertedResidual(nn.Module):
    """x + project(layers(x)) (the residual when `use_res_connect`), the projection fused."""

    def __init__(self, layers: nn.Sequential, layers_name: str, stride: int,
                 use_res_connect: bool, out_channels: int, original: type | None = None) -> None:
        super().__init__()
        if layers_name not in ("conv", "block"):
            raise ValueError(f"InvertedResidual: layers_name must be 'conv' (MobileNetV2) or "
                             f"'block' (MobileNetV3), got {layers_name!r}")
        if layers_name == "conv" and not _ends_in_projection(layers):
            raise ValueError("InvertedResidual: a MobileNetV2 block's layers must end in a 1x1 "
                             "nn.Conv2d and a BatchNorm2d")
        self.layers_name = layers_name
        self.stride = stride
        self.use_res_connect = use_res_connect
        self.out_channels = out_channels
        self.original = original
        self.add_module(layers_name, layers)
        self._fold_cache = FoldCache()

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "InvertedResidual":
        """Ours, holding `block`'s very layers."""
        problem = inverted_residual_problem(block) if is_torchvision_inverted_residual(block) \
            else f"not a torchvision InvertedResidual but {type(block).__name__}"
        if problem:
            raise TypeError(f"InvertedResidual.from_torchvision: {problem}")
        name = _torchvision_blocks()[type(block)]
        layers = getattr(block, name)
        stride = block.stride if name == "conv" else (2 if block._is_cn else 1)
        ours = cls(layers, name, stride, block.use_res_connect, block.out_channels, type(block))
        ours.training = block.training  # not .train(): its layers keep their own modes (frozen BNs)
        return ours

    def to_torchvision(self) -> nn.Module:
        """torchvision's block holding the same layers (V2: the last BatchNorm a BatchNorm2d
        again); revert then walks its layers."""
        blocks = _torchvision_blocks()
        block_type = self.original or next(t for t, n in blocks.items() if n == self.layers_name)
        block = block_type.__new__(block_type)
        nn.Module.__init__(block)
        layers = self.layers()
        if self.layers_name == "conv":
            block.stride = self.stride
            if isinstance(layers[-1], BatchNormAct2d):  # as built by earlier versions
                layers = _with_last(layers, layers[-1].to_modules()[0])
        block.use_res_connect = self.use_res_connect
        block.out_channels = self.out_channels
        block._is_cn = self.stride > 1
        block.add_module(self.layers_name, layers)
        block.training = self.training  # its layers keep their own modes
        return block

    def layers(self) -> nn.Sequential:
        return self._modules[self.layers_name]

    keeps_less_memory = True  # BN outputs kept as recipes (recompute.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_torch(self, x):
            return self.forward_torch(x)
        return self.forward_ours(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's forward, each converted layer running PyTorch's computation."""
        out = x
        for layer in self.layers().children():
            out = torch_call(layer, out)
        if not self.use_res_connect:
            return out
        if self.layers_name == "conv":
            return x + out
        out += x
        return out

    def forward_ours(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.use_res_connect else None
        layers = self.layers()
        children = list(layers.children())
        v2 = self.layers_name == "conv"
        projection = children[-2:] if v2 else children[-1:]
        if not self._fusable(x, layers, projection):  # as torchvision: the add after the layers
            out = layers(x)
            if residual is None:
                return out
            # V2 adds out of place (x + out: autocast's output promoted to x's dtype), V3 in
            # place (result += input: the result keeps the layers' dtype)
            return residual + out if v2 else (out + residual).to(out.dtype)
        h, recipe = self._head(children[:-2] if v2 else children[:-1], x)
        with kept_as_recipe(h, recipe):
            if v2:
                return conv_bn_act(children[-2], children[-1], h, residual,
                                   fold_cache=self._fold_cache)
            return children[-1](h, residual)

    @staticmethod
    def _head(layers: list[nn.Module], x: torch.Tensor):
        """The layers before the projection; each ConvBNAct2d's output is kept by the next layer
        as its recipe (recompute.py), and the last one's recipe is returned with the output."""
        h, recipe = x, None
        for layer in layers:
            if type(layer) is ConvBNAct2d and layer.fusable() and not _has_forward_hooks(layer):
                h, recipe = layer.forward_recipe(h, recipe)
                continue
            with kept_as_recipe(h, recipe):
                h = layer(h)
            recipe = None
        return h, recipe

    def _fusable(self, x: torch.Tensor, layers: nn.Sequential, projection: list[nn.Module]) -> bool:
        """Whether the residual can be added inside the projection: not where hooks on the
        layers or on the projection's modules expect to see them called (pruning recomputes a
        weight in a pre-hook); not under autocast when x is not in autocast's dtype (the
        projection's output is, and torchvision's add then promotes to x's dtype); and in V3 only
        a ConvBNAct2d projection without activation (with conv_bn_act excluded it stays a
        Conv2dNormActivation)."""
        if any(_has_forward_hooks(m) for m in [layers, *projection]):
            return False
        if self.layers_name == "conv" and not _ends_in_projection(layers):
            return False
        kind = x.device.type
        if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind) and \
                x.dtype != torch.get_autocast_dtype(kind):
            return False
        last = projection[-1]
        return self.layers_name == "conv" or (isinstance(last, ConvBNAct2d) and last.fusable()
                                              and last.activation == "identity")


def _ends_in_projection(layers: nn.Sequential) -> bool:
    """MobileNetV2's block end: a plain 1x1 nn.Conv2d, then a BatchNorm (no activation)."""
    return len(layers) >= 2 and type(layers[-2]) is nn.Conv2d and is_plain_1x1(layers[-2]) and \
        type(layers[-1]) in _NORMS and \
        (not isinstance(layers[-1], BatchNormAct2d) or layers[-1].activation == "identity")


def _with_last(layers: nn.Sequential, last: nn.Module) -> nn.Sequential:
    """A Sequential of the same children under the same names, the last one replaced."""
    names = list(layers._modules)
    out = nn.Sequential()
    for name in names[:-1]:
        out.add_module(name, layers._modules[name])
    out.add_module(names[-1], last)
    return out
