"""BatchNormAct2d: nn.BatchNorm2d followed by an activation, as one module."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import activations
from ..tuning import runs_torch
from ..ops.affine_act import _compute_dtype, affine_act
from ..ops.batch_norm_act import WORLD, _eval_invstd, batch_norm_act, fold_statistics

NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)  # the BatchNorms the fused paths compute

_TORCH_ACTIVATIONS = {nn.Identity: "identity", nn.ReLU: "relu", nn.ReLU6: "relu6",
                      nn.LeakyReLU: "leaky_relu", nn.Hardswish: "hardswish",
                      nn.Hardsigmoid: "hardsigmoid"}


def check_eps_and_momentum(owner: str, eps, momentum) -> None:
    """eps > 0 (eps = 0 divides by zero on a constant channel) and momentum in [0, 1] or None (a
    cumulative average), as nn.BatchNorm2d's users expect."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{owner}: eps must be a positive number, got {eps!r}")
    if momentum is not None and (isinstance(momentum, bool) or
                                 not isinstance(momentum, (int, float)) or
                                 not 0.0 <= momentum <= 1.0):
        raise ValueError(f"{owner}: momentum must be in [0, 1] or None, got {momentum!r}")


class BatchNormAct2d(nn.Module):
    """``act(BatchNorm2d(x) + residual)`` with exactly nn.BatchNorm2d's parameters, buffers,
    state_dict keys and running-statistics semantics (momentum, ``momentum=None`` cumulative
    average, ``num_batches_tracked``, ``track_running_stats=False``). Training keeps only the input
    (and the residual) for backward — PyTorch's pair keeps two input-sized tensors; evaluation is
    one fused pass. ``forward(x, residual=None)``: the optional residual is added before the
    activation (ResNet's ``bn → +identity → relu``). ``process_group`` makes it SyncBN: in
    training, statistics and gradient sums are combined over the group's ranks (as
    nn.SyncBatchNorm), when torch.distributed is initialised.

    Deliberately not a subclass of ``_BatchNorm``: converters that rewrite BatchNorm layers must not
    drop the activation silently."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, activation: str = "relu",
                 negative_slope: float = 0.01, process_group=None, device=None,
                 dtype=None) -> None:
        super().__init__()
        activations.activation_code(activation)  # clear error for unknown names
        check_eps_and_momentum("BatchNormAct2d", eps, momentum)
        reference = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats,
                                   device=device, dtype=dtype)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.activation, self.negative_slope = activation, float(negative_slope)
        self.process_group = process_group
        self._fold_cache = FoldCache()
        self.weight, self.bias = reference.weight, reference.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(reference, name))

    def reset_running_stats(self) -> None:
        """nn.BatchNorm2d's: running mean 0, running variance 1, no batch counted."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """nn.BatchNorm2d's: the running statistics reset, weight 1, bias 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, act: nn.Module | None = None) -> "BatchNormAct2d":
        """Ours holding copies of `bn`'s parameters and buffers, applying `act` (an nn activation
        module, or None for identity). An nn.SyncBatchNorm keeps its process group."""
        if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            raise TypeError("BatchNormAct2d.from_modules expects nn.BatchNorm2d or nn.SyncBatchNorm, "
                            f"got {type(bn).__name__}")
        name = "identity" if act is None else _TORCH_ACTIVATIONS.get(type(act))
        if name is None:
            raise TypeError(f"BatchNormAct2d.from_modules: unsupported activation {type(act).__name__}; "
                            f"supported: {', '.join(t.__name__ for t in _TORCH_ACTIVATIONS)}")
        slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.01
        parameter = bn.weight if bn.weight is not None else bn.running_mean
        group = getattr(bn, "process_group", None)
        if isinstance(bn, nn.SyncBatchNorm) and group is None:
            group = WORLD  # nn.SyncBatchNorm's None: the default group, looked up when it runs
        module = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, name,
                     slope, process_group=group,
                     device=None if parameter is None else parameter.device,
                     dtype=None if parameter is None else parameter.dtype)
        module.load_state_dict(bn.state_dict())
        return module.train(bn.training)

    def to_modules(self) -> nn.Sequential:
        """nn.BatchNorm2d → activation (keys "0.*": for export, not for loading our checkpoints)."""
        bn = nn.BatchNorm2d(self.num_features, self.eps, self.momentum, self.affine,
                            self.track_running_stats)
        bn.load_state_dict(self.state_dict())
        torch_type = {name: cls for cls, name in _TORCH_ACTIVATIONS.items()}[self.activation]
        act = torch_type(self.negative_slope) if self.activation == "leaky_relu" else torch_type()
        parameter = self.weight if self.weight is not None else self.running_mean
        if parameter is not None:
            bn = bn.to(device=parameter.device, dtype=parameter.dtype)
        return nn.Sequential(bn, act).train(self.training)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, activation={self.activation!r}")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """act(BN(x) (+ residual)). `batch_stats`: x's per-channel (mean, biased var), when a
        preceding kernel computed them (ConvBNAct2d's Triton GEMM); used only where batch
        statistics are."""
        if residual is None and batch_stats is None and runs_torch(self, x):
            return self.forward_torch(x)
        return bn_act(self, x, self.activation, self.negative_slope, residual, batch_stats,
                      self._fold_cache)

    keeps_less_memory = True  # training keeps the input only, not the BN output too

    def forward_ours(self, x: torch.Tensor) -> torch.Tensor:
        return bn_act(self, x, self.activation, self.negative_slope, None, None, self._fold_cache)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """What nn.BatchNorm2d followed by the activation module computes."""
        factor, use_batch_stats = _count_batch(self, x)
        track = not self.training or self.track_running_stats
        y = F.batch_norm(x, self.running_mean if track else None,
                         self.running_var if track else None, self.weight, self.bias,
                         use_batch_stats, factor, self.eps)
        return activations.torch_activation(y, self.activation, self.negative_slope)


class FoldCache:
    """Eval's (scale, shift) of one BatchNorm, folded again only when a parameter or buffer
    changed: the key holds each tensor's storage address and version counter (bumped by every
    in-place write: optimizer steps, load_state_dict, BN updates). Folding is ~10 tiny ops, as
    long as the elementwise pass itself on MobileNet-sized maps."""

    __slots__ = ("key", "folded")

    def __init__(self) -> None:
        self.key, self.folded = None, None

    def __deepcopy__(self, memo) -> "FoldCache":
        return FoldCache()  # a copy of the module folds its own tensors

    def get(self, bn: nn.Module, compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors) + \
            (bn.eps, compute)
        if key != self.key:
            invstd = _eval_invstd(bn.running_var, bn.eps, compute)
            self.folded = fold_statistics(bn.running_mean, invstd, bn.weight, bn.bias, compute)
            self.key = key
        return self.folded


def activation_of(module: nn.Module | None) -> tuple[str, float] | None:
    """(our activation name, negative slope) for one of torch's activation modules (None: no
    module, the identity), or None when the module is not one we compute."""
    if module is None:
        return "identity", 0.01
    name = _TORCH_ACTIVATIONS.get(type(module))
    if name is None:
        return None
    return name, float(module.negative_slope) if isinstance(module, nn.LeakyReLU) else 0.01


def process_group_of(bn: nn.Module):
    """The group a BatchNorm synchronises over in training: an nn.SyncBatchNorm's (None there
    means the default group, looked up when it runs), else none."""
    if isinstance(bn, nn.SyncBatchNorm):
        return WORLD if bn.process_group is None else bn.process_group
    return getattr(bn, "process_group", None)


def _needs_grad(bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, bn.weight, bn.bias))


def _count_batch(bn: nn.Module, x: torch.Tensor) -> tuple[float, bool]:
    """nn.BatchNorm2d.forward's checks and bookkeeping before the computation: counts the batch in
    num_batches_tracked where it should, and returns (the running statistics' update factor:
    momentum, or momentum=None's cumulative average; whether batch statistics are used)."""
    if x.dim() != 4:
        raise ValueError(f"BatchNormAct2d: expected a 4-D input, got {x.dim()}-D")
    if bn.training and not bn.eps > 0:  # nn.BatchNorm2d's check: a constant channel gives NaN
        raise ValueError(f"batch_norm eps must be positive during training, but got {bn.eps}")
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor, bn.training or (bn.running_mean is None and bn.running_var is None)


def bn_act(bn: nn.Module, x: torch.Tensor, activation: str, negative_slope: float = 0.01,
           residual: torch.Tensor | None = None,
           batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
           fold_cache: FoldCache | None = None) -> torch.Tensor:
    """act(bn(x) (+ residual)) in one fused pass, for an nn.BatchNorm2d, nn.SyncBatchNorm or
    BatchNormAct2d `bn`: its parameters and buffers, its mode, and nn.BatchNorm2d.forward's
    bookkeeping of the running statistics (momentum, momentum=None's cumulative average,
    num_batches_tracked, track_running_stats=False)."""
    factor, use_batch_stats = _count_batch(bn, x)
    if not use_batch_stats and not _needs_grad(bn, x, residual) and \
            not torch.compiler.is_compiling():
        compute = _compute_dtype(x.dtype)
        scale, shift = (fold_cache or FoldCache()).get(bn, compute)
        return affine_act(x, scale, shift, activation, negative_slope, residual=residual)
    track = not bn.training or bn.track_running_stats
    return batch_norm_act(x, bn.weight, bn.bias, bn.running_mean if track else None,
                          bn.running_var if track else None, use_batch_stats, factor, bn.eps,
                          activation, negative_slope, residual=residual,
                          process_group=process_group_of(bn) if bn.training else None,
                          batch_stats=batch_stats if use_batch_stats else None)
