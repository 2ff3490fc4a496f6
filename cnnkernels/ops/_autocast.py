"""torch.autocast for our convolution ops: like F.conv2d, which autocast runs in its lower
precision, they cast the activation and the conv's own tensors (weight, bias) to the autocast
dtype; per-channel epilogue vectors stay in the compute type (float32)."""
from __future__ import annotations

import torch


_AUTOCAST_DEVICES = frozenset({"cpu", "cuda"})  # asked without a call: this runs on every op call


def cast_for_autocast(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple:
    """(x, *tensors) in the autocast dtype of x's device when autocast is on there, else as given."""
    # meta (and other devices autocast has no dispatch key for) ask first: is_autocast_enabled
    # raises for them
    if not isinstance(x, torch.Tensor):
        return (x, *tensors)
    device = x.device.type
    if not (device in _AUTOCAST_DEVICES or torch.amp.is_autocast_available(device)) or \
            not torch.is_autocast_enabled(device):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in (x, *tensors))
