"""Loading of the compiled extension cnnkernels._C.

Three outcomes:
* built against the running torch: the C++ (and, when compiled in, CUDA) kernels are registered;
* missing entirely (not built, or a pure-Python install): every op falls back to the pure-torch
  reference, with one warning (an error under CNNKERNELS_STRICT=1) — see cnnkernels.backend;
* present but built against another torch: import fails here, loudly, because a C++ ABI mismatch
  otherwise shows up as an undefined symbol or, worse, as memory corruption much later.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

_REBUILD_HINT = "rebuild it with: pip install --no-build-isolation -e .  (or reinstall cnnkernels)"


class ExtensionMismatchError(ImportError):
    """cnnkernels._C exists but cannot be used with the running torch."""


def _import_c() -> Optional[ModuleType]:
    try:
        return importlib.import_module("cnnkernels._C")
    except ModuleNotFoundError as err:
        if err.name == "cnnkernels._C":
            return None
        raise
    except ImportError as err:  # present but unloadable: almost always a torch ABI mismatch
        raise ExtensionMismatchError(
            f"cnnkernels._C is present but failed to load ({err}). It was most likely built against "
            f"another torch than the running {torch.__version__}; {_REBUILD_HINT}") from err


def check_built_version(built: str, running: str) -> None:
    """Refuse an extension compiled against a different torch (local versions included:
    2.6.0+cu124 and 2.6.0+cpu have different ABIs)."""
    if built != running:
        raise ExtensionMismatchError(
            f"cnnkernels._C was built against torch {built} but torch {running} is running; "
            f"{_REBUILD_HINT}")


def _load():
    module = _import_c()
    if module is None:
        return None
    check_built_version(getattr(module, "torch_version", "<unknown>"), torch.__version__)
    return module


_C = _load()

#: the C++ CPU kernels are registered
cpu_ext: bool = _C is not None
#: the CUDA kernels were compiled in (they run only where torch sees a GPU)
cuda_ext: bool = bool(_C is not None and _C.with_cuda)
#: TORCH_CUDA_ARCH_LIST the CUDA kernels were compiled for ("" when none)
cuda_arch_list: str = _C.cuda_arch_list if _C is not None else ""
