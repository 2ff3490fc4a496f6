"""`cnnkernels.convert(model)`: swap cnnkernels' layers into an existing model; `revert` undoes it.

The walk needs no tracing: it looks at each submodule and replaces the ones it recognises, keeping
every parameter and buffer (the same tensors), train/eval modes, device, dtype and every state_dict
key, so checkpoints load in both directions. Recognised today:

================  =====================================================  ==============================
kind              replaced                                               by
================  =====================================================  ==============================
conv_bn_act       an ``nn.Sequential`` of exactly Conv2d → BatchNorm2d   ``ConvBNAct2d``: the same three
                  (→ activation): torchvision's ``Conv2dNormActivation``  modules, run fused when the
                                                                         whole is called (BN folded
                                                                         into the conv's epilogue in
                                                                         eval)
hardswish         ``nn.Hardswish``                                       ``cnnkernels.nn.HardSwish``
hardsigmoid       ``nn.Hardsigmoid``                                     ``cnnkernels.nn.HardSigmoid``
depthwise         ``nn.Conv2d`` with ``groups == in_channels``           ``cnnkernels.nn.DepthwiseConv2d``
densenet          torchvision ``_DenseBlock``, timm ``DenseBlock``       ``DenseBlock(memory="shared")``
dense_transition  torchvision ``_Transition`` (BN → ReLU → conv1×1 →     ``DenseTransition``: BN+ReLU
                  2×2 avg pool), timm ``DenseTransition``                fused, pool before the conv
batchnorm_act     ``BatchNorm2d`` / ``SyncBatchNorm`` then an activation  the Sequential becomes a
                  in an ``nn.Sequential``;                               ``BNActSequential`` holding the
                  timm's ``BatchNormAct2d`` (activation one of ours)     same modules, each pair run
                                                                         fused; timm's: ``BatchNormAct2d``
squeeze_excite    torchvision ``SqueezeExcitation``, timm                ``cnnkernels.nn.SqueezeExcite``
                  ``SqueezeExcite``                                      (timm's keys for timm's)
resnet            torchvision / timm ``BasicBlock`` / ``Bottleneck``     ``ResidualBlock`` holding the same
                                                                         modules: every BN fused with its
                                                                         ReLU, the last with the residual
                                                                         add too
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

What convert() promises: the converted model computes what the original computes and trains as
it trains. Replacements hold the original parameters and buffers (frozen stay frozen, tied stay
tied); containers whose children stay (ConvBNAct2d, BNActSequential, ResidualBlock,
InvertedResidual) keep the very modules, fuse only when called as a whole, and run their children
one by one once a child is no longer what the fused path computes (another type, a hook); a
module reached through two parents maps to one replacement; a module whose kind is known but whose
parts differ (a swapped activation, another pool, a forward of its own), whose parts have hooks or
are shared with another parent, is left alone with the reason in the report; our own layers are
never converted again.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable

from torch import nn

from .nn.activation import HardSigmoid, HardSwish
from .nn.batchnorm import _TORCH_ACTIVATIONS, BatchNormAct2d
from .nn.conv import DepthwiseConv2d, has_hooks
from .nn.batchnorm import FoldCache
from .nn.conv_bn_act import ConvBNAct2d, conv_bn_act_parts, runs_as_sequential, unsupported_conv
from .nn.sequential import BNActSequential, bn_act_pairs
from .nn.pool import MaxPool2d
from .nn.inverted_residual import (InvertedResidual, inverted_residual_problem,
                                   is_torchvision_inverted_residual)
from .nn.densenet import (DenseBlock, DenseTransition, _is_torchvision_dense_block,
                          dense_block_from, dense_block_layers_problem, dense_block_mode_problem,
                          dense_block_to_torchvision,
                          is_dense_transition, is_timm_dense_block, is_timm_dense_transition,
                          link_channels_last_hand_offs, timm_dense_block_problem,
                          timm_transition_problem, transition_problem)
from .nn.resnet import (ResidualBlock, is_timm_resnet_block, is_torchvision_resnet_block,
                        timm_block_problem, torchvision_block_problem)
from .nn.squeeze_excite import (SqueezeExcite, is_timm_squeeze_excite,
                                is_torchvision_squeeze_excitation, timm_unsupported_parts,
                                unsupported_parts)

KINDS = ("conv_bn_act", "hardswish", "hardsigmoid", "depthwise", "densenet", "dense_transition",
         "batchnorm_act", "resnet", "squeeze_excite", "max_pool", "inverted_residual")
# Kinds whose replacement holds the original's layers, still to be converted by the walk.
_WALKED_INTO = ("inverted_residual",)
# Every kind is on by default: a kind is turned on only once whole models measure faster with it
# (bench/RESULTS.md). A kind added later starts opt-in by leaving it out of DEFAULT_KINDS.
DEFAULT_KINDS = KINDS


PREFERENCES = ("speed", "memory")


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


def _reclassed(module: nn.Module, cls: type) -> nn.Module:
    """A `cls` holding `module`'s very children, parameters, buffers, hooks and attributes (its
    class remembered for revert): for containers whose children stay what they were."""
    ours = cls.__new__(cls)
    ours.__dict__.update(vars(module))
    for name in ("_modules", "_parameters", "_buffers"):
        ours.__dict__[name] = dict(vars(module)[name])
    ours.__dict__["_original_class"] = type(module)
    return ours


def _conv_bn_act_from(module: nn.Sequential) -> ConvBNAct2d:
    """Ours for a Conv → BN (→ act) Sequential such as torchvision's Conv2dNormActivation,
    holding the same three modules; revert() gives back its class."""
    ours = _reclassed(module, ConvBNAct2d)
    ours._fold_cache = FoldCache()
    return ours


def _classify(module: nn.Module) -> tuple[str, Callable[[], nn.Module] | None, str] | None:
    """(kind, factory of the replacement or None, reason when None) for modules we know."""
    parts = conv_bn_act_parts(module)
    if parts is not None:
        problem = unsupported_conv(parts[0])
        if problem:
            return "conv_bn_act", None, problem
        return "conv_bn_act", lambda: _conv_bn_act_from(module), ""
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
        problem = dense_block_layers_problem(module) or dense_block_mode_problem(module)
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
        problem = timm_dense_block_problem(module) or dense_block_layers_problem(module) or \
            dense_block_mode_problem(module)
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
        problem = torchvision_block_problem(module)
        if problem:
            return "resnet", None, problem
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


def _kinds(names: Iterable[str] | None, argument: str) -> set[str] | None:
    if names is None:
        return None
    chosen = {names} if isinstance(names, str) else set(names)
    unknown = chosen - set(KINDS)
    if unknown:
        raise ValueError(f"cnnkernels.convert: unknown kind(s) in {argument}: "
                         f"{', '.join(sorted(unknown))}; choose from {', '.join(KINDS)}")
    return chosen


# Our layers: convert() leaves them (and what they hold) as they are, so converting twice is
# converting once.
_OURS = (BatchNormAct2d, ConvBNAct2d, BNActSequential, HardSwish, HardSigmoid, DepthwiseConv2d,
         DenseBlock, DenseTransition, ResidualBlock, SqueezeExcite, MaxPool2d, InvertedResidual)
# Kinds whose replacement holds the original's very children (their hooks and sharing stay)
_HOLDS_CHILDREN = ("conv_bn_act",)


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or \
        any(True for _ in module.buffers(recurse=False))


def _shared_modules(root: nn.Module) -> set[int]:
    """ids of the modules reached through more than one parent (or name)."""
    seen: dict[int, int] = {}
    for _, module in root.named_modules(remove_duplicate=False):
        seen[id(module)] = seen.get(id(module), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _absorbed_problem(module: nn.Module, shared: set[int]) -> str | None:
    """Why a module must be left alone although its kind is known: its replacement copies its
    parts, so hooks on them would no longer fire, a part shared with another parent would be
    split in two, and a forward set on the instance would be lost."""
    for name, sub in module.named_modules():
        where = f"its {name}" if name else "it"
        if has_hooks(sub):
            return f"{where} has hooks or a forward of its own (they would be lost)"
        if sub is not module and id(sub) in shared and _has_state(sub):
            return f"{where} is shared with another parent (it would be split in two)"
    return None


def _adopt_tensors(original: nn.Module, ours: nn.Module) -> None:
    """Gives `ours` the original's very parameters and buffers wherever a name and shape match
    (state_dict keys are the same by design): requires_grad, tied weights, and the tensors an
    optimizer already holds stay as they were."""
    for kind in ("parameters", "buffers"):
        theirs = dict(getattr(original, f"named_{kind}")(remove_duplicate=False))
        for name, tensor in list(getattr(ours, f"named_{kind}")(remove_duplicate=False)):
            source = theirs.get(name)
            if source is None or source is tensor or source.shape != tensor.shape or \
                    source.dtype != tensor.dtype or source.device != tensor.device:
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = ours.get_submodule(owner_name)
            getattr(owner, f"_{kind}")[leaf] = source


class _Root(nn.Module):
    """Holds the model as a child, so that the model itself can be replaced like any layer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def _name_in_model(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else "(the model itself)"


class _Walk:
    """One pass of convert() over a model: replaces what it recognises, reports every swap."""

    def __init__(self, root: nn.Module, wanted: set[str], include: set[str],
                 exclude: set[str]) -> None:
        self.wanted, self.include, self.exclude = wanted, include, exclude
        self.shared = _shared_modules(root)
        # id(original) -> (original, ours), for shared modules; holding the originals keeps their
        # ids from being reused by new objects
        self.replaced: dict[int, tuple[nn.Module, nn.Module]] = {}
        self.visited: dict[int, nn.Module] = {}
        self.report = ConversionReport()

    def visit(self, parent: nn.Module, prefix: str, skip: Iterable[str] = ()) -> None:
        for child_name, child in list(parent._modules.items()):  # duplicates too
            if child_name in skip:
                continue
            name = prefix + child_name
            if id(child) in self.replaced:  # a module met again: the same replacement
                setattr(parent, child_name, self.replaced[id(child)][1])
                continue
            if child is None or id(child) in self.visited or isinstance(child, _OURS):
                continue
            self.visited[id(child)] = child
            new = self._replacement(child, name)
            if new is not None:
                self.replaced[id(child)] = (child, new)
                setattr(parent, child_name, new)
                continue
            self.visit(child, name + ".")

    def _replacement(self, module: nn.Module, name: str) -> nn.Module | None:
        """Ours for `module` (its own children already walked where they stay), or None."""
        found = _classify(module)
        if found is not None:
            kind, factory, reason = found
            if factory is not None and kind in self.wanted:
                reason = "" if kind in _HOLDS_CHILDREN else _absorbed_problem(module, self.shared)
                if not reason:
                    return self._swap(module, name, kind, factory)
            self._left_alone(name, kind, module, reason)
        if "batchnorm_act" in self.wanted and runs_as_sequential(module) and \
                not isinstance(module, _OURS):
            pairs = bn_act_pairs(module)
            if pairs:
                return self._fuse_pairs(module, name, pairs)
        return None

    def _swap(self, module: nn.Module, name: str, kind: str, factory) -> nn.Module:
        new = factory()
        _adopt_tensors(module, new)
        self.report.swaps.append(Swap(name, kind, type(module).__name__, type(new).__name__))
        if kind in _WALKED_INTO:
            self.visit(new, name + ".")
        return new

    def _fuse_pairs(self, module: nn.Sequential, name: str, pairs: dict[str, str]) -> nn.Module:
        new = _reclassed(module, BNActSequential)
        for norm, act in pairs.items():
            self.report.swaps.append(Swap(
                f"{name}.{norm}", "batchnorm_act",
                f"{type(module._modules[norm]).__name__}+{type(module._modules[act]).__name__}",
                "fused in BNActSequential"))
        # the pairs' modules stay as they are: the Sequential's call fuses them
        self.visit(new, name + ".", skip=[*pairs, *pairs.values()])
        return new

    def _left_alone(self, name: str, kind: str, module: nn.Module, reason: str) -> None:
        # an opt-in kind nobody asked about is not news: report the others
        if kind not in KINDS or kind in DEFAULT_KINDS or kind in self.include | self.exclude:
            self.report.swaps.append(Swap(name, kind, type(module).__name__, None,
                                          reason or "not included (include/exclude)"))


def convert(model: nn.Module, *, inplace: bool = False, include: Iterable[str] | None = None,
            exclude: Iterable[str] | None = None, report: bool = False, prefer: str = "speed"):
    """Replace recognised submodules of `model` by cnnkernels' layers (see the module docstring).

    Returns the new root: a deep copy, or with ``inplace=True`` `model` itself changed in place,
    except where `model` itself is a layer convert() replaces (e.g. a Conv → BN → act
    Sequential): then the replacement, which holds `model`'s children. ``(root,
    ConversionReport)`` with ``report=True``. ``include``/``exclude`` take kinds from
    ``cnnkernels.conversion.KINDS``.

    A converted model computes what the original computes and trains as it trains: replacements
    hold the original parameters and buffers (frozen ones stay frozen, tied ones tied); a module
    reached through two parents maps to one replacement; a block with hooks inside, a part shared
    with another parent, or parts that are not what our layer computes is left alone, with the
    reason in the report; our own layers are left as they are (converting twice is converting
    once).

    ``prefer``: ``"speed"`` lets each layer run, per input signature, the faster of our kernels
    and PyTorch's own computation (cnnkernels.tuning); ``"memory"`` keeps our kernels in training
    wherever they keep fewer activations (BatchNorm+act, Conv-BN-act, the ResNet and inverted
    residual blocks), even where PyTorch's would be faster."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"cnnkernels.convert expects an nn.Module, got {type(model).__name__}")
    if prefer not in PREFERENCES:
        raise ValueError(f"cnnkernels.convert: prefer must be one of {', '.join(PREFERENCES)}, "
                         f"got {prefer!r}")
    include_kinds = _kinds(include, "include") or set(DEFAULT_KINDS)
    exclude_kinds = _kinds(exclude, "exclude") or set()
    root = _Root(model if inplace else copy.deepcopy(model))
    walk = _Walk(root, include_kinds - exclude_kinds, include_kinds, exclude_kinds)
    walk.visit(root, "")
    for swap in walk.report.swaps:
        swap.name = _name_in_model(swap.name)
    new_root = root.model
    link_channels_last_hand_offs(new_root)
    for module in new_root.modules():
        if hasattr(module, "forward_torch"):
            module.prefer = prefer
    return (new_root, walk.report) if report else new_root


def _plain(module: nn.Module) -> nn.Module | None:
    """The plain PyTorch (torchvision, timm) module one of ours stands for, or None."""
    original_class = vars(module).get("_original_class")
    if original_class is not None:  # a container convert() reclassed: its class back
        plain = _reclassed(module, original_class)
        for name in ("_original_class", "_fold_cache", "_fold_caches"):
            plain.__dict__.pop(name, None)
        return plain
    template = getattr(module, "_revert_template", None)
    if template is not None:  # back to the timm layer it replaced
        return _rebuilt_from_template(module, template)
    if isinstance(module, (BatchNormAct2d, ConvBNAct2d)):
        return module.to_modules()
    if isinstance(module, BNActSequential):
        return _reclassed(module, nn.Sequential)
    if isinstance(module, (HardSwish, HardSigmoid, MaxPool2d)):
        return module.to_torch()
    if isinstance(module, DepthwiseConv2d):
        return module.to_conv().train(module.training)
    if isinstance(module, DenseBlock):
        return dense_block_to_torchvision(module)
    if isinstance(module, (ResidualBlock, SqueezeExcite, InvertedResidual)):
        return module.to_torchvision()
    return None


def revert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace cnnkernels' layers by the plain PyTorch (and torchvision, timm) modules they stand
    for. Returns the new root, as convert() does (`model` itself may be replaced)."""
    root = _Root(model if inplace else copy.deepcopy(model))
    replaced: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(ours) -> (ours, plain)

    def visit(parent: nn.Module) -> None:
        names = list(parent._modules)
        for child_name, child in list(parent._modules.items()):  # duplicates too
            if child is None:
                continue
            if id(child) in replaced:
                setattr(parent, child_name, replaced[id(child)][1])
                continue
            if isinstance(child, BatchNormAct2d) and isinstance(parent, nn.Sequential):
                index = names.index(child_name)
                after = names[index + 1] if index + 1 < len(names) else None
                if after is not None and isinstance(parent._modules[after], nn.Identity):
                    bn, act = child.to_modules()  # back into the two places convert took
                    setattr(parent, child_name, bn)
                    setattr(parent, after, act)
                    continue
            new = _plain(child)
            if new is not None:
                _adopt_tensors(child, new)
                replaced[id(child)] = (child, new)
                setattr(parent, child_name, new)
                child = new  # it may hold layers convert swapped too (InvertedResidual's)
            visit(child)

    visit(root)
    return root.model
