"""ResNet blocks whose BatchNorms run fused with their ReLU, the last one with the residual add.

`ResidualBlock` replaces torchvision's BasicBlock / Bottleneck (cnnkernels.convert, kind
"resnet"): the very children under the same names (conv1, bn1, ..., downsample, relu), so the
state_dict keys do not change and each child computes what it did; the block's call runs
``bn → relu`` as one pass and ``bn_last → += identity → relu`` as one pass too (batch_norm_act's
residual input). Autograd keeps each BN's input (and the identity) instead of the BN output, the
sum and the ReLU output. When a child stops being what the fused path computes (another type, a
hook) the call runs the children one by one, as torchvision's forward does.
"""
from __future__ import annotations

import torch
from torch import nn

from .batchnorm import NORMS, BatchNormAct2d, FoldCache, bn_act
from .conv import _has_forward_hooks, has_hooks, run_conv, torch_call
from .conv_bn_act import ConvBNAct2d, conv_bn_act_parts, unsupported_conv
from ..tuning import runs_torch
from .recompute import bn_act_recipe, kept_as_recipe


def _torchvision_blocks() -> tuple[type, ...]:
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # torchvision is optional
        return ()
    return BasicBlock, Bottleneck


def is_torchvision_resnet_block(module: nn.Module) -> bool:
    blocks = _torchvision_blocks()
    return bool(blocks) and type(module) in blocks


def is_timm_resnet_block(module: nn.Module) -> bool:
    return type(module).__name__ in ("BasicBlock", "Bottleneck") and \
        type(module).__module__.startswith("timm.models.resnet")


def torchvision_block_problem(block: nn.Module) -> str | None:
    """Why a torchvision BasicBlock / Bottleneck does not compute what ResidualBlock does."""
    depth = 3 if hasattr(block, "conv3") else 2
    if not all(type(getattr(block, f"bn{i}", None)) in NORMS for i in range(1, depth + 1)):
        return "its norm layers are not BatchNorm2d"
    if type(getattr(block, "relu", None)) is not nn.ReLU:
        return f"its relu is {type(getattr(block, 'relu', None)).__name__}, not nn.ReLU"
    return None


def timm_block_problem(block: nn.Module) -> str | None:
    """Why a timm BasicBlock / Bottleneck is not the plain torchvision block in disguise."""
    for name in ("drop_block", "aa"):
        part = getattr(block, name, None)
        if part is not None and type(part) is not nn.Identity:
            return f"its {name} is {type(part).__name__}"
    for name in ("se", "drop_path"):
        if getattr(block, name, None) is not None:
            return f"it has {name} ({type(getattr(block, name)).__name__})"
    depth = 3 if hasattr(block, "conv3") else 2
    if not all(type(getattr(block, f"act{i}", None)) is nn.ReLU for i in range(1, depth + 1)):
        return "its activations are not all ReLU"
    if not all(type(getattr(block, f"bn{i}")) in (nn.BatchNorm2d, nn.SyncBatchNorm)
               for i in range(1, depth + 1)):
        return "its norm layers are not BatchNorm2d"
    return None


class ResidualBlock(nn.Module):
    """relu(bn_last(conv_last(... relu(bn1(conv1(x))) ...)) + downsample(x)) with fused BN+act."""

    def __init__(self, convs: list[nn.Conv2d], norms: list[nn.BatchNorm2d],
                 downsample: nn.Module | None, relu: nn.Module, stride: int,
                 original: type | None = None) -> None:
        super().__init__()
        if len(convs) != len(norms) or len(convs) < 2:
            raise ValueError("ResidualBlock: expected as many convs as norms (2 or 3)")
        for i, (conv, norm) in enumerate(zip(convs, norms), start=1):
            self.add_module(f"conv{i}", conv)
            self.add_module(f"bn{i}", norm)
        self.relu = relu
        self.downsample = downsample
        self.stride = stride
        self.depth = len(convs)
        self.original = original
        self._fold_caches = [FoldCache() for _ in norms]

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "ResidualBlock":
        """Ours, holding `block`'s very modules."""
        if not is_torchvision_resnet_block(block):
            raise TypeError(f"ResidualBlock.from_torchvision expects torchvision's BasicBlock or "
                            f"Bottleneck, got {type(block).__name__}")
        problem = torchvision_block_problem(block)
        if problem:
            raise TypeError(f"ResidualBlock.from_torchvision: {problem}")
        depth = 3 if hasattr(block, "conv3") else 2
        convs = [getattr(block, f"conv{i}") for i in range(1, depth + 1)]
        norms = [getattr(block, f"bn{i}") for i in range(1, depth + 1)]
        ours = cls(convs, norms, block.downsample, block.relu, block.stride, type(block))
        ours.training = block.training  # not .train(): its layers keep their own modes (frozen BNs)
        return ours

    @classmethod
    def from_timm(cls, block: nn.Module) -> "ResidualBlock":
        """The same for timm's BasicBlock / Bottleneck when it computes what torchvision's does
        (timm_block_problem is None): same conv/bn/downsample names, so the same keys."""
        problem = timm_block_problem(block) if is_timm_resnet_block(block) else \
            f"not timm's BasicBlock or Bottleneck but {type(block).__name__}"
        if problem:
            raise TypeError(f"ResidualBlock.from_timm: {problem}")
        depth = 3 if hasattr(block, "conv3") else 2
        convs = [getattr(block, f"conv{i}") for i in range(1, depth + 1)]
        norms = [getattr(block, f"bn{i}") for i in range(1, depth + 1)]
        stride = convs[1].stride[0] if depth == 3 else convs[0].stride[0]
        ours = cls(convs, norms, block.downsample, nn.ReLU(inplace=True), stride)
        ours.training = block.training  # its layers keep their own modes
        return ours

    def to_torchvision(self) -> nn.Module:
        """torchvision's block with the same modules and weights (for export / revert)."""
        block_type = self.original or dict(zip((2, 3), _torchvision_blocks()))[self.depth]
        block = block_type.__new__(block_type)
        nn.Module.__init__(block)
        for i in range(1, self.depth + 1):
            block.add_module(f"conv{i}", getattr(self, f"conv{i}"))
            bn = getattr(self, f"bn{i}")
            if isinstance(bn, BatchNormAct2d):  # as built by earlier versions
                bn = bn.to_modules()[0]
            block.add_module(f"bn{i}", bn)
        block.relu = self.relu
        block.downsample = self.downsample
        block.stride = self.stride
        block.training = self.training  # its layers keep their own modes
        return block

    def _fusable(self) -> bool:
        """Whether the children are still what the fused path computes (the downsample is called
        as a module either way, so its hooks fire)."""
        modules = self._modules
        parts = [modules.get(f"{kind}{i}") for kind in ("conv", "bn") for i in range(1, self.depth + 1)]
        norms = parts[self.depth:]
        return all(type(n) in NORMS for n in norms) and type(modules.get("relu")) is nn.ReLU \
            and not any(_has_forward_hooks(m) for m in (*parts, modules["relu"]))

    keeps_less_memory = True  # BN outputs kept as recipes (recompute.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable() or runs_torch(self, x):
            return self.forward_torch(x)
        return self.forward_ours(x)

    def forward_ours(self, x: torch.Tensor) -> torch.Tensor:
        # run_conv: the 1x1 convolutions of NCHW CPU input as our pointwise op's BLAS matmuls.
        # Each relu(bn(z)) is kept by the next conv as its recipe (recompute.py), not a tensor.
        out, recipe = x, None
        for i in range(1, self.depth):
            with kept_as_recipe(out, recipe):
                z = run_conv(getattr(self, f"conv{i}"), out)
            out, recipe = bn_act_recipe(getattr(self, f"bn{i}"), z, "relu",
                                        fold_cache=self._fold_caches[i - 1])
        identity, identity_recipe = self._identity(x)
        last = self.depth
        with kept_as_recipe(out, recipe):
            z = run_conv(getattr(self, f"conv{last}"), out)
        # torchvision adds in place, `out += identity`, so under autocast a float32 identity
        # lands in the convolution's dtype
        with kept_as_recipe(identity, identity_recipe):
            return bn_act(getattr(self, f"bn{last}"), z, "relu", residual=identity.to(z.dtype),
                          fold_cache=self._fold_caches[last - 1])

    def _identity(self, x: torch.Tensor):
        """The residual, and its Recipe where the downsample is a ConvBNAct2d run here."""
        downsample = self.downsample
        if downsample is None:
            return x, None
        if type(downsample) is ConvBNAct2d and downsample.fusable() and \
                not _has_forward_hooks(downsample):
            return downsample.forward_recipe(x, None)
        parts = conv_bn_act_parts(downsample)  # torchvision's Sequential(conv1x1, BatchNorm2d)
        if parts is not None and parts[2] is None and unsupported_conv(parts[0]) is None and \
                not any(has_hooks(m) for m in (downsample, *parts[:2])):
            return bn_act_recipe(parts[1], parts[0](x), "identity")
        return downsample(x), None

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's forward over the children as they are now (a converted downsample runs
        PyTorch's computation too)."""
        out = x
        for i in range(1, self.depth):
            out = self.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out)))
        out = getattr(self, f"bn{self.depth}")(getattr(self, f"conv{self.depth}")(out))
        identity = x if self.downsample is None else torch_call(self.downsample, x)
        out += identity
        return self.relu(out)
