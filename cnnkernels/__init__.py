"""cnnkernels: fused CUDA, Triton and C++ kernels for efficient CNNs, behind drop-in PyTorch layers.

    import cnnkernels
    cnnkernels.info()                       # what was built, the device, the active backend
    y = cnnkernels.ops.hardswish(x)         # same numbers as torch.nn.functional.hardswish
    with cnnkernels.use_backend("triton"):  # auto | cpu | cuda | triton | torch
        ...
    model = cnnkernels.convert(model)       # each layer runs the faster of ours and PyTorch's
    cnnkernels.set_tuning("off")            # auto (default) | cached | off: ours always
"""
from __future__ import annotations

import importlib.metadata

import torch

from . import _extension, backend
from ._version import __version__
from .backend import (
    BACKENDS,
    BackendUnavailableError,
    FallbackWarning,
    get_backend,
    set_backend,
    use_backend,
)
from . import ops  # noqa: E402  (registers autograd and fake kernels of the compiled ops)
from . import nn  # noqa: E402
from . import models  # noqa: E402
from . import conversion, profile, tuning  # noqa: E402  (documented as cnnkernels.profile)
from .tuning import get_tuning, set_tuning, use_tuning  # noqa: E402
from .conversion import ConversionReport, convert, revert  # noqa: E402


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_name() -> str:
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def info() -> dict:
    """What is available here: versions, the compiled kernels, Triton, the device, the backend."""
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cpu_ext": _extension.cpu_ext,
        "cuda_ext": _extension.cuda_ext,
        "cuda_arch_list": _extension.cuda_arch_list,
        "triton": backend.triton_available(),
        "triton_version": _triton_version(),
        "triton_interpret": backend.triton_interpreted(),
        "device": _device_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_isa": _extension._C.cpu_isa() if _extension.cpu_ext else None,
        "num_threads": torch.get_num_threads(),
        "backend": get_backend(),
        "tuning": tuning.get_tuning(),
    }


__all__ = [
    "__version__", "info", "ops", "nn", "BACKENDS", "set_backend", "get_backend", "use_backend",
    "BackendUnavailableError", "FallbackWarning", "models", "convert", "revert", "ConversionReport",
    "conversion", "profile", "tuning", "get_tuning", "set_tuning", "use_tuning",
]
