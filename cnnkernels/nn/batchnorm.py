"""BatchNormAct2d: nn.BatchNorm2d followed by an activation, as one module."""
from __future__ import annotations

import torch
from torch import nn

from .. import activations
from ..ops.affine_act import _compute_dtype, affine_act
from ..ops.batch_norm_act import WORLD, _eval_invstd, batch_norm_act, fold_statistics

_TORCH_ACTIVATIONS = {nn.Identity: "identity", nn.ReLU: "relu", nn.ReLU6: "relu6",
                      nn.LeakyReLU: "leaky_relu", nn.Hardswish: "hardswish",
                      nn.Hardsigmoid: "hardsigmoid"}


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
        reference = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats,
                                   device=device, dtype=dtype)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.activation, self.negative_slope = activation, float(negative_slope)
        self.process_group = process_group
        self._folded_key, self._folded = None, None  # eval's scale/shift, see _running_fold
        self.weight, self.bias = reference.weight, reference.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(reference, name))

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

    def _needs_grad(self, x, residual) -> bool:
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, residual, self.weight, self.bias))

    def _running_fold(self, compute: torch.dtype):
        """(scale, shift) of the running statistics for evaluation, folded again only when a
        parameter or buffer changed: the key holds each tensor's storage address and version
        counter (bumped by every in-place write: optimizer steps, load_state_dict, BN updates).
        Folding is ~10 tiny ops: as long as the elementwise pass itself on MobileNet-sized maps."""
        tensors = (self.weight, self.bias, self.running_mean, self.running_var)
        key = tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors) + \
            (self.eps, compute)
        if key != self._folded_key:
            invstd = _eval_invstd(self.running_var, self.eps, compute)
            self._folded = fold_statistics(self.running_mean, invstd, self.weight, self.bias, compute)
            self._folded_key = key
        return self._folded

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """act(BN(x) (+ residual)). `batch_stats`: x's per-channel (mean, biased var), when a
        preceding kernel computed them (ConvBNAct2d's Triton GEMM); used only where batch
        statistics are."""
        if x.dim() != 4:
            raise ValueError(f"BatchNormAct2d: expected a 4-D input, got {x.dim()}-D")
        # nn.BatchNorm2d.forward's bookkeeping, verbatim in meaning
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats and not self._needs_grad(x, residual) and \
                not torch.compiler.is_compiling():
            scale, shift = self._running_fold(_compute_dtype(x.dtype))
            return affine_act(x, scale, shift, self.activation, self.negative_slope,
                              residual=residual)
        track = not self.training or self.track_running_stats
        return batch_norm_act(x, self.weight, self.bias, self.running_mean if track else None,
                              self.running_var if track else None, use_batch_stats, factor,
                              self.eps, self.activation, self.negative_slope, residual=residual,
                              process_group=self.process_group if self.training else None,
                              batch_stats=batch_stats if use_batch_stats else None)
