"""`cnnkernels.convert(model)`: swap cnnkernels' layers into an existing model; `revert` undoes it.

The walk needs no tracing: it looks at each submodule and replaces the ones it recognises, copying
every parameter and buffer and keeping train/eval mode, device, dtype and every state_dict key, so
checkpoints load in both directions. Recognised today:

================  =====================================================  ==============================
kind              replaced                                               by
================  =====================================================  ==============================
conv_bn_act       an ``nn.Sequential`` of exactly Conv2d → BatchNorm2d   ``ConvBNAct2d`` (same "0.*",
                  (→ activation): torchvision's ``Conv2dNormActivation``  "1.*" keys; BN folded into
                                                                         the conv's epilogue in eval)
hardswish         ``nn.Hardswish``                                       ``cnnkernels.nn.HardSwish``
hardsigmoid       ``nn.Hardsigmoid``                                     ``cnnkernels.nn.HardSigmoid``
depthwise         ``nn.Conv2d`` with ``groups == in_channels``           ``cnnkernels.nn.DepthwiseConv2d``
densenet          torchvision ``_DenseBlock``, timm ``DenseBlock``       ``DenseBlock(memory="shared")``
dense_transition  torchvision ``_Transition`` (BN → ReLU → conv1×1 →     ``DenseTransition``: BN+ReLU
                  2×2 avg pool), timm ``DenseTransition``                fused, pool before the conv
batchnorm_act     ``BatchNorm2d`` / ``SyncBatchNorm`` then an activation  ``BatchNormAct2d`` (+ ``nn.Identity``
                  in an ``nn.Sequential`` (``Conv2dNormActivation``);    where the activation was)
                  timm's ``BatchNormAct2d`` (activation one of ours)
squeeze_excite    torchvision ``SqueezeExcitation``, timm                ``cnnkernels.nn.SqueezeExcite``
                  ``SqueezeExcite``                                      (timm's keys for timm's)
resnet            torchvision / timm ``BasicBlock`` / ``Bottleneck``     ``ResidualBlock``: every BN fused
                                                                         with its ReLU, the last with the
                                                                         residual add too
max_pool          ``nn.MaxPool2d``                                       ``cnnkernels.nn.MaxPool2d``: NCHW
                                                                         CPU inputs pooled in
                                                                         channels_last (same values)
inverted_residual torchvision MobileNetV2 / V3 ``InvertedResidual``      ``InvertedResidual``: the
                                                                         projection, its BN and the
                                                                         residual add fused (same
                                                                         keys); its other layers
                                                                         converted as anywhere else
================  =====================================================  ==============================

Every kind is on by default (see DEFAULT_KINDS); ``include`` / ``exclude`` choose. timm's layers
are swapped only where they compute exactly what the torchvision layer does (e.g. a timm
Bottleneck without SE, drop-block or anti-aliasing); ``revert`` gives timm's own classes back.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable

from torch import nn

from .nn.activation import HardSigmoid, HardSwish
from .nn.batchnorm import _TORCH_ACTIVATIONS, BatchNormAct2d
from .nn.conv import DepthwiseConv2d
from .nn.conv_bn_act import ConvBNAct2d, conv_bn_act_parts, unsupported_conv
from .nn.pool import MaxPool2d
from .nn.inverted_residual import (InvertedResidual, inverted_residual_problem,
                                   is_torchvision_inverted_residual)
from .nn.densenet import (DenseBlock, DenseTransition, _is_torchvision_dense_block,
                          dense_block_from, dense_block_mode_problem, dense_block_to_torchvision,
                          is_dense_transition, is_timm_dense_block, is_timm_dense_transition,
                          link_channels_last_hand_offs, timm_dense_block_problem,
                          timm_transition_problem, transition_problem)
from .nn.resnet import (ResidualBlock, is_timm_resnet_block, is_torchvision_resnet_block,
                        timm_block_problem)
from .nn.squeeze_excite import (SqueezeExcite, is_timm_squeeze_excite,
                                is_torchvision_squeeze_excitation, timm_unsupported_parts,
                                unsupported_parts)

KINDS = ("conv_bn_act", "hardswish", "hardsigmoid", "depthwise", "densenet", "dense_transition",
         "batchnorm_act", "resnet", "squeeze_excite", "max_pool", "inverted_residual")
# Kinds whose replacement holds the original's layers, still to be converted by the walk.
_WALKED_INTO = ("inverted_residual",)
# Every kind is on by default. conv_bn_act was opt-in until its eval path (BatchNorm folded into
# the conv) measured faster inside whole models than the default conversion: with oneDNN's fused
# 1x1 convolution it does on the dev CPU (session 7, interleaved runs, batch 8, NCHW: MobileNetV2
# inference 1.16-1.22x eager vs 1.08-1.13x without it, MobileNetV3-Large 1.04-1.15x vs 0.96-1.07x;
# channels_last 1.02-1.07x vs 0.87-0.96x; training unchanged or faster). A kind added later starts
# opt-in by leaving it out of DEFAULT_KINDS.
DEFAULT_KINDS = KINDS


@dataclass
class Swap:
    name: str
    kind: str
    original: str
    replacement: str | None  # None: left alone
    reason: str = ""


@dataclass
class ConversionReport:
    """What `convert` replaced and what it left alone (and why)."""

    swaps: list[Swap] = field(default_factory=list)

    @property
    def replaced(self) -> list[Swap]:
        return [s for s in self.swaps if s.replacement is not None]

    @property
    def left_alone(self) -> list[Swap]:
        return [s for s in self.swaps if s.replacement is None]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for swap in self.replaced:
            counts[swap.kind] = counts.get(swap.kind, 0) + 1
        return counts

    def __str__(self) -> str:
        lines = [f"{'module':<40} {'kind':<16} {'was':<18} now / why not"]
        for s in self.swaps:
            outcome = s.replacement if s.replacement is not None else f"left alone: {s.reason}"
            lines.append(f"{s.name:<40} {s.kind:<16} {s.original:<18} {outcome}")
        summary = ", ".join(f"{n} {k}" for k, n in self.counts().items()) or "nothing"
        lines.append(f"replaced: {summary}; left alone: {len(self.left_alone)}")
        return "\n".join(lines)


def _depthwise_problem(conv: nn.Conv2d) -> str | None:
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros')"
    if isinstance(conv.padding, str) and conv.padding != "valid" and any(s != 1 for s in conv.stride):
        return "padding='same' with stride > 1"
    return None


def _is_timm_batchnorm_act(module: nn.Module) -> bool:
    """timm's BatchNormAct2d: an nn.BatchNorm2d subclass that applies `.act` (and `.drop`)."""
    return type(module).__name__ == "BatchNormAct2d" and type(module).__module__.startswith("timm.") \
        and isinstance(module, nn.BatchNorm2d)


def _timm_batchnorm_act_problem(module: nn.Module) -> str | None:
    if type(getattr(module, "drop", nn.Identity())) is not nn.Identity:
        return f"drop layer {type(module.drop).__name__}"
    if type(getattr(module, "act", nn.Identity())) not in _TORCH_ACTIVATIONS:
        return f"activation {type(module.act).__name__} is not one of ours"
    return None


def _with_mode_of(original: nn.Module, ours: nn.Module) -> nn.Module:
    """`ours` in `original`'s train/eval mode, its own flag only: its layers keep theirs."""
    ours.training = original.training
    return ours


def _remembering(original: nn.Module, ours: nn.Module) -> nn.Module:
    """`ours`, with an empty (meta-device) copy of the third-party module it replaces, from which
    revert() rebuilds that module: timm's layers are not importable by name like torchvision's.
    A plain attribute, not a submodule: it has no state_dict keys and follows no .to()."""
    template = copy.deepcopy(original).to("meta")
    object.__setattr__(ours, "_revert_template", template)
    return ours


def _rebuilt_from_template(module: nn.Module, template: nn.Module) -> nn.Module:
    """The remembered module with `module`'s parameters and buffers, device, dtype and modes: each
    submodule takes the mode of ours of the same name (frozen BatchNorms stay frozen), the others
    the mode of the nearest named ancestor, `module` itself at the top."""
    state = module.state_dict()
    tensor = next((t for t in state.values() if t.is_floating_point()), None)
    layer = copy.deepcopy(template).to_empty(device=tensor.device if tensor is not None else "cpu")
    if tensor is not None:
        layer = layer.to(dtype=tensor.dtype)
    layer.load_state_dict(state)
    ours = dict(module.named_modules())
    modes = {"": module.training}
    for name, sub in layer.named_modules():  # parents come before their children
        parent = name.rpartition(".")[0]
        sub.training = ours[name].training if name in ours else modes.get(parent, module.training)
        modes[name] = sub.training
    return layer


def _from_timm_batchnorm_act(module: nn.Module) -> BatchNormAct2d:
    """Ours with the timm layer's BN state; revert() rebuilds the timm layer."""
    act = getattr(module, "act", None)
    return _remembering(module, BatchNormAct2d.from_modules(
        module, None if type(act) is nn.Identity else act))


def _conv_bn_act_from(module: nn.Sequential, parts) -> ConvBNAct2d:
    """Ours for a Conv → BN (→ act) Sequential; revert() gives back a subclass such as
    torchvision's Conv2dNormActivation as that class, not as a plain nn.Sequential."""
    ours = ConvBNAct2d.from_modules(*parts)
    return ours if type(module) is nn.Sequential else _remembering(module, ours)


def _classify(module: nn.Module) -> tuple[str, Callable[[], nn.Module] | None, str] | None:
    """(kind, factory of the replacement or None, reason when None) for modules we know."""
    parts = conv_bn_act_parts(module)
    if parts is not None:
        problem = unsupported_conv(parts[0])
        if problem:
            return "conv_bn_act", None, problem
        return "conv_bn_act", lambda: _conv_bn_act_from(module, parts), ""
    if _is_timm_batchnorm_act(module):
        problem = _timm_batchnorm_act_problem(module)
        if problem:
            return "batchnorm_act", None, problem
        return "batchnorm_act", lambda: _from_timm_batchnorm_act(module), ""
    if type(module) is nn.Hardswish:
        return "hardswish", lambda: HardSwish.from_torch(module), ""
    if type(module) is nn.Hardsigmoid:
        return "hardsigmoid", lambda: HardSigmoid.from_torch(module), ""
    if type(module) is nn.Conv2d and module.groups == module.in_channels and module.groups > 1 \
            and module.out_channels % module.in_channels == 0:
        problem = _depthwise_problem(module)
        if problem:
            return "depthwise", None, problem
        return "depthwise", lambda: DepthwiseConv2d.from_conv(module), ""
    if _is_torchvision_dense_block(module):
        problem = dense_block_mode_problem(module)
        if problem:
            return "densenet", None, problem
        return "densenet", lambda: dense_block_from(module, memory="shared"), ""
    if is_dense_transition(module):
        problem = transition_problem(module)
        if problem:
            return "dense_transition", None, problem
        return "dense_transition", lambda: _remembering(
            module, DenseTransition.from_transition(module)), ""
    if is_timm_dense_transition(module):
        problem = timm_transition_problem(module) or _timm_batchnorm_act_problem(module.norm)
        if problem:
            return "dense_transition", None, problem
        return "dense_transition", lambda: _remembering(module, _with_mode_of(
            module, DenseTransition.from_parts(
                BatchNormAct2d.from_modules(module.norm, module.norm.act), module.conv))), ""
    if is_timm_dense_block(module):
        problem = timm_dense_block_problem(module) or dense_block_mode_problem(module)
        if problem:
            return "densenet", None, problem
        return "densenet", lambda: _remembering(module, dense_block_from(module, "shared")), ""
    if is_torchvision_squeeze_excitation(module):
        problem = unsupported_parts(module)
        if problem:
            return "squeeze_excite", None, problem
        return "squeeze_excite", lambda: SqueezeExcite.from_torchvision(module), ""
    if is_timm_squeeze_excite(module):
        problem = timm_unsupported_parts(module)
        if problem:
            return "squeeze_excite", None, problem
        return "squeeze_excite", lambda: _remembering(module, SqueezeExcite.from_timm(module)), ""
    if is_timm_resnet_block(module):
        problem = timm_block_problem(module)
        if problem:
            return "resnet", None, problem
        return "resnet", lambda: _remembering(module, ResidualBlock.from_timm(module)), ""
    if is_torchvision_resnet_block(module):
        norms = [module._modules.get(f"bn{i}") for i in (1, 2, 3) if f"bn{i}" in module._modules]
        if not all(type(n) in (nn.BatchNorm2d, nn.SyncBatchNorm) for n in norms):
            return "resnet", None, "its norm layers are not BatchNorm2d"
        return "resnet", lambda: ResidualBlock.from_torchvision(module), ""
    if type(module) is nn.MaxPool2d:
        return "max_pool", lambda: MaxPool2d.from_torch(module), ""
    if is_torchvision_inverted_residual(module):
        problem = inverted_residual_problem(module)
        if problem:
            return "inverted_residual", None, problem
        return "inverted_residual", lambda: InvertedResidual.from_torchvision(module), ""
    if isinstance(module, nn.BatchNorm2d):
        return "batchnorm", None, "no activation follows it in a Sequential (or batchnorm_act not included)"
    return None


def _bn_act_pairs(parent: nn.Module) -> dict[str, str]:
    """{BatchNorm child name: activation child name} for BN → activation neighbours in a Sequential."""
    if not isinstance(parent, nn.Sequential):
        return {}
    names = list(parent._modules)
    pairs = {}
    for first, second in zip(names, names[1:]):
        bn, act = parent._modules[first], parent._modules[second]
        if type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm) and type(act) in _TORCH_ACTIVATIONS and \
                type(act) is not nn.Identity:
            pairs[first] = second
    return pairs


def _kinds(names: Iterable[str] | None, argument: str) -> set[str] | None:
    if names is None:
        return None
    chosen = {names} if isinstance(names, str) else set(names)
    unknown = chosen - set(KINDS)
    if unknown:
        raise ValueError(f"cnnkernels.convert: unknown kind(s) in {argument}: "
                         f"{', '.join(sorted(unknown))}; choose from {', '.join(KINDS)}")
    return chosen


def convert(model: nn.Module, *, inplace: bool = False, include: Iterable[str] | None = None,
            exclude: Iterable[str] | None = None, report: bool = False):
    """Replace recognised submodules of `model` by cnnkernels' layers (see the module docstring).

    Returns the new root (the same object with ``inplace=True``, else a deep copy), or
    ``(root, ConversionReport)`` with ``report=True``. ``include``/``exclude`` take kinds from
    ``cnnkernels.conversion.KINDS``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"cnnkernels.convert expects an nn.Module, got {type(model).__name__}")
    include_kinds = _kinds(include, "include") or set(DEFAULT_KINDS)
    exclude_kinds = _kinds(exclude, "exclude") or set()
    wanted_kinds = include_kinds - exclude_kinds
    root = model if inplace else copy.deepcopy(model)
    result = ConversionReport()

    def visit(parent: nn.Module, prefix: str) -> None:
        pairs = _bn_act_pairs(parent) if "batchnorm_act" in wanted_kinds else {}
        for child_name, child in list(parent.named_children()):
            name = prefix + child_name
            if child_name in pairs:  # BN → act: BN becomes BatchNormAct2d, the act an Identity
                act_name = pairs[child_name]
                act = parent._modules[act_name]
                setattr(parent, child_name, BatchNormAct2d.from_modules(child, act))
                setattr(parent, act_name, nn.Identity())
                result.swaps.append(Swap(name, "batchnorm_act", f"{type(child).__name__}+{type(act).__name__}",
                                         "BatchNormAct2d"))
                continue
            if child_name in pairs.values():  # the activation now fused into the BatchNorm before it
                continue
            found = _classify(child)
            if found is not None:
                kind, factory, reason = found
                wanted = kind in wanted_kinds
                if factory is not None and wanted:
                    new = factory()
                    setattr(parent, child_name, new)
                    result.swaps.append(Swap(name, kind, type(child).__name__, type(new).__name__))
                    if kind in _WALKED_INTO:
                        visit(new, name + ".")
                    continue  # otherwise the replacement's own children are ours
                # an opt-in kind nobody asked about is not news: report the others
                if kind not in KINDS or kind in DEFAULT_KINDS or kind in include_kinds | exclude_kinds:
                    result.swaps.append(Swap(name, kind, type(child).__name__, None,
                                             reason or "not included (include/exclude)"))
            visit(child, name + ".")

    if _classify(root) is not None:
        raise ValueError("cnnkernels.convert: pass the model that contains the layer, not the "
                         "layer itself (the root cannot be replaced in place)")
    visit(root, "")
    link_channels_last_hand_offs(root)
    return (root, result) if report else root


def revert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace cnnkernels' layers by the plain PyTorch (and torchvision) modules they stand for."""
    root = model if inplace else copy.deepcopy(model)

    def plain(module: nn.Module) -> nn.Module | None:
        template = getattr(module, "_revert_template", None)
        if template is not None:  # back to the timm layer it replaced
            return _rebuilt_from_template(module, template)
        if isinstance(module, BatchNormAct2d):
            return module.to_modules()
        if isinstance(module, ConvBNAct2d):
            return module.to_modules()
        if isinstance(module, (HardSwish, HardSigmoid)):
            return module.to_torch()
        if isinstance(module, DepthwiseConv2d):
            return module.to_conv().train(module.training)
        if isinstance(module, DenseBlock):
            return dense_block_to_torchvision(module)
        if isinstance(module, ResidualBlock):
            return module.to_torchvision()
        if isinstance(module, SqueezeExcite):
            return module.to_torchvision()
        if isinstance(module, MaxPool2d):
            return module.to_torch()
        if isinstance(module, InvertedResidual):
            return module.to_torchvision()
        return None

    def visit(parent: nn.Module) -> None:
        names = list(parent._modules)
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BatchNormAct2d) and isinstance(parent, nn.Sequential):
                index = names.index(child_name)
                after = names[index + 1] if index + 1 < len(names) else None
                if after is not None and isinstance(parent._modules[after], nn.Identity):
                    bn, act = child.to_modules()  # back into the two places convert took
                    setattr(parent, child_name, bn)
                    setattr(parent, after, act)
                    continue
            new = plain(child)
            if new is not None:
                setattr(parent, child_name, new)
                child = new  # it may hold layers convert swapped too (InvertedResidual's)
            visit(child)

    visit(root)
    return root
