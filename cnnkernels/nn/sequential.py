"""BNActSequential: an nn.Sequential whose BatchNorm → activation neighbours run as one pass.

cnnkernels.convert (kind "batchnorm_act") gives this class to a plain Sequential that holds a
BatchNorm2d followed by one of torch's activations (ShuffleNet's branches, DenseNet's stem, user
models). Its children stay the very modules they were, so a parent that calls them one by one
(``body[1](body[0](x) - 10)``), indexing, hooks and frozen parameters see no change; only a call
of the whole Sequential fuses each pair, and only while the pair is still a BatchNorm and an
activation we compute, without hooks.
"""
from __future__ import annotations

import torch
from torch import nn

from .batchnorm import NORMS, FoldCache, activation_of, bn_act
from ..tuning import runs_torch
from .conv import _has_forward_hooks, torch_call


def fusable_pair(norm: nn.Module, act: nn.Module | None) -> bool:
    """A BatchNorm followed by one of our activations (not the identity), neither with hooks."""
    return type(norm) in NORMS and act is not None and type(act) is not nn.Identity and \
        activation_of(act) is not None and not _has_forward_hooks(norm) and \
        not _has_forward_hooks(act)


def bn_act_pairs(seq: nn.Sequential) -> dict[str, str]:
    """{BatchNorm child name: activation child name} for the fusable neighbours of `seq`."""
    names = list(seq._modules)
    return {first: second for first, second in zip(names, names[1:])
            if fusable_pair(seq._modules[first], seq._modules[second])}


class BNActSequential(nn.Sequential):
    """nn.Sequential that runs each BatchNorm → activation pair of its children as one fused
    batch_norm_act pass (same numbers, same running statistics, less memory kept for backward)."""

    keeps_less_memory = True  # each fused pair keeps the BN input only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and runs_torch(self, x):
            return self.forward_torch(x)
        return self.forward_ours(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """nn.Sequential's forward, each converted child running PyTorch's computation."""
        for module in self._modules.values():
            x = torch_call(module, x)
        return x

    def forward_ours(self, x: torch.Tensor) -> torch.Tensor:
        children = list(self._modules.items())
        index = 0
        while index < len(children):
            name, module = children[index]
            after = children[index + 1][1] if index + 1 < len(children) else None
            if isinstance(x, torch.Tensor) and x.dim() == 4 and fusable_pair(module, after):
                activation, slope = activation_of(after)
                x = bn_act(module, x, activation, slope, fold_cache=self._fold_cache(name))
                index += 2
            else:
                x = module(x)
                index += 1
        return x

    def _fold_cache(self, name: str) -> FoldCache:
        caches = self.__dict__.setdefault("_fold_caches", {})
        if name not in caches:
            caches[name] = FoldCache()
        return caches[name]
