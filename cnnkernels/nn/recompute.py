"""BatchNorm + activation outputs that autograd keeps as the recipe that made them.

In ``conv → BN → act → conv`` the second conv saves its input, the activation's output ``y``, for
its weight gradient, while the fused BatchNorm+act already keeps its own input ``z``. ``y`` is
``act(scale·z + shift (+ residual))`` with per-channel scale and shift, so keeping both doubles the
activation memory of the layer. Here the consumer runs under saved-tensor hooks that store ``y`` as
a `Recipe` (``z``, the batch statistics, the BN's weight and bias) and rebuild it in backward with the
same kernels the forward ran, bit for bit, in one elementwise pass. Inside a block (ResNet's
``bn1 → relu → conv2``, an inverted residual's ``expand → depthwise → project``, a downsample's BN
feeding the residual add) ``y`` is never seen by user code, so nothing can modify it in place.

The recipe is used only where it is exact and cheap: training with batch statistics (the
statistics are computed first and handed to the op, so the recompute folds the very same ones), not
under torch.compile (Inductor chooses what to recompute itself), not under SyncBN over several
ranks (the op combines statistics across ranks), and not inside a user's own saved-tensor hooks
(``save_on_cpu``, a profiler), which ours would hide.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import activations
from ..ops.batch_norm_act import _kernels, _world_size, batch_norm_act
from ..ops.layout import to_channels_last
from .batchnorm import FoldCache, bn_act, process_group_of


class Recipe:
    """What rebuilds act(BN(z) (+ residual)) with the batch statistics (mean, var) of a forward."""

    __slots__ = ("z", "residual", "mean", "var", "weight", "bias", "versions", "eps", "code",
                 "negative_slope")

    def __init__(self, z, residual, mean, var, weight, bias, eps, code, negative_slope) -> None:
        self.z, self.residual, self.mean, self.var = z, residual, mean, var
        self.weight, self.bias = weight, bias
        self.versions = _versions(weight, bias)
        self.eps, self.code, self.negative_slope = eps, code, negative_slope

    def rebuild(self) -> torch.Tensor:
        if _versions(self.weight, self.bias) != self.versions:
            raise RuntimeError(
                "cnnkernels: a BatchNorm's weight or bias was modified in place between the forward "
                "and the backward that needs it (as autograd refuses for nn.BatchNorm2d); run "
                "backward before the optimizer step")
        if torch.is_grad_enabled():  # create_graph=True: a graph back to z and the parameters
            return batch_norm_act(self.z, self.weight, self.bias, None, None, True, 0.0, self.eps,
                                  activations.NAMES[self.code], self.negative_slope,
                                  residual=self.residual)
        kernels = _kernels(self.z)
        count = self.z.numel() // self.z.shape[1]
        detached = [None if t is None else t.detach() for t in (self.weight, self.bias)]
        scale, shift, _ = kernels.fold(self.mean, self.var, *detached, None, None, 0.0, self.eps,
                                       count)
        return kernels.affine(self.z.detach(), scale, shift, self.code, self.negative_slope,
                              None if self.residual is None else self.residual.detach())


class ChannelsLastCopy:
    """A channels_last copy of x, made again in backward (x itself is kept by its producer)."""

    __slots__ = ("x",)

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def rebuild(self) -> torch.Tensor:
        return to_channels_last(self.x if torch.is_grad_enabled() else self.x.detach())


REBUILT = (Recipe, ChannelsLastCopy)


def _versions(*tensors) -> tuple:
    return tuple(None if t is None else t._version for t in tensors)


def _user_hooks_active() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(True) is not None


def rebuilding_applies(x: torch.Tensor) -> bool:
    """Whether a tensor made from x may be kept as what rebuilds it: autograd records, not under
    torch.compile, not inside a user's saved-tensor hooks."""
    return torch.is_grad_enabled() and x.requires_grad and x.numel() > 0 and \
        not torch.compiler.is_compiling() and not _user_hooks_active()


def recipes_apply(bn: nn.Module, z: torch.Tensor) -> bool:
    """Whether act(bn(z)) can be kept as a Recipe (see the module docstring)."""
    if not (bn.training and rebuilding_applies(z)):
        return False
    group = process_group_of(bn)
    return group is None or _world_size(group) == 1


def bn_act_recipe(bn: nn.Module, z: torch.Tensor, activation: str, negative_slope: float = 0.01,
                  residual: torch.Tensor | None = None,
                  batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                  fold_cache: FoldCache | None = None) -> tuple[torch.Tensor, Recipe | None]:
    """bn_act(bn, z, ...) and the Recipe of its output (None where recipes_apply says no)."""
    if not recipes_apply(bn, z):
        return bn_act(bn, z, activation, negative_slope, residual, batch_stats, fold_cache), None
    if batch_stats is None:
        batch_stats = _kernels(z).stats(z)
    mean, var = (t.detach() for t in batch_stats)
    y = bn_act(bn, z, activation, negative_slope, residual, (mean, var), fold_cache)
    recipe = Recipe(z, residual, mean, var, bn.weight, bn.bias, float(bn.eps),
                    activations.activation_code(activation), float(negative_slope))
    return y, recipe


def kept_as_recipe(y: torch.Tensor, recipe: Recipe | ChannelsLastCopy | None):
    """A context in which autograd saves `y` as `recipe` (every other tensor as it is)."""
    if recipe is None:
        return contextlib.nullcontext()

    # y's address and geometry, not y: the hooks live as long as the graph, and must not keep
    # y alive (y is alive, so no other tensor has its address, while the context is open)
    key = (y.data_ptr(), y.dtype, y.shape, y.stride())

    def pack(t: torch.Tensor):
        if (t.data_ptr(), t.dtype, t.shape, t.stride()) == key:
            return recipe
        return t  # inputs and per-channel tensors the ops make: no cycle through their nodes

    def unpack(packed):
        return packed.rebuild() if type(packed) in REBUILT else packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
