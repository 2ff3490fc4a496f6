"""Which implementation runs an op: the backend registry.

Backends: ``auto`` (default), ``cpu`` (our C++ kernels), ``cuda`` (our CUDA kernels), ``triton``
(our Triton kernels) and ``torch`` (the pure-torch reference). ``auto`` picks the compiled kernel for
the tensor's device, Triton on CUDA when the CUDA kernels were not compiled in, and the reference
when nothing compiled is present (one FallbackWarning per process; an error when
CNNKERNELS_STRICT=1).

Choose with ``set_backend(name)``, the context manager ``use_backend(name)`` or the environment
variable ``CNNKERNELS_BACKEND``. The choice is process-wide (not per thread) and is read when an op
runs; under torch.compile it is read at trace time.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from typing import Iterator

import torch

from . import _extension

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, no device, or wrong device)."""


class FallbackWarning(UserWarning):
    """An op ran on the pure-torch reference because no compiled kernel was available."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def triton_interpreted() -> bool:
    """Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return _env_flag("TRITON_INTERPRET")


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return triton_installed() and (torch.cuda.is_available() or triton_interpreted())


def why_unavailable(name: str) -> str | None:
    """None if `name` can run here, else the reason it cannot."""
    if name in ("auto", "torch"):
        return None
    if name == "cpu":
        return None if _extension.cpu_ext else "the compiled extension cnnkernels._C is missing"
    if name == "cuda":
        if not _extension.cuda_ext:
            return ("cnnkernels._C was built without CUDA kernels" if _extension.cpu_ext
                    else "the compiled extension cnnkernels._C is missing")
        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    if name == "triton":
        if not triton_installed():
            return "triton is not installed"
        return None if triton_available() else (
            "torch sees no CUDA device (set TRITON_INTERPRET=1 before importing triton to run "
            "Triton kernels on CPU tensors through the interpreter)")
    raise ValueError(_unknown(name))


def _unknown(name: object) -> str:
    return f"unknown cnnkernels backend {name!r}; expected one of {', '.join(BACKENDS)}"


def _validated(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(_unknown(name))
    name = name.lower()
    reason = why_unavailable(name)
    if reason is not None:
        raise BackendUnavailableError(f"cnnkernels backend {name!r} is not available: {reason}")
    return name


class _State:
    backend: str = "auto"
    warned_fallback: bool = False


_state = _State()


def get_backend() -> str:
    return _state.backend


def set_backend(name: str) -> None:
    """Select the backend for all following op calls (process-wide)."""
    _state.backend = _validated(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Temporarily select a backend: ``with cnnkernels.use_backend("triton"): ...``."""
    previous = _state.backend
    _state.backend = _validated(name)
    try:
        yield _state.backend
    finally:
        _state.backend = previous


def _fallback(device: torch.device) -> str:
    message = (f"cnnkernels: no compiled kernel for {device.type} tensors "
               f"({why_unavailable('cpu' if device.type == 'cpu' else 'cuda')}); "
               "running the pure-torch reference instead")
    if _env_flag("CNNKERNELS_STRICT"):
        raise BackendUnavailableError(message + " (refused because CNNKERNELS_STRICT=1)")
    if not _state.warned_fallback:
        _state.warned_fallback = True
        warnings.warn(message, FallbackWarning, stacklevel=4)
    return "torch"


ALL_KERNELS = frozenset({"cpu", "cuda", "triton"})


def select(device: torch.device, kernels: frozenset = ALL_KERNELS, op: str = "this op") -> str:
    """The implementation that runs an op on tensors on `device`: cpu | cuda | triton | torch.

    `kernels` names the implementations the op has (an op may not have all three yet)."""
    name = _state.backend
    if name not in ("auto", "torch") and name not in kernels:
        raise BackendUnavailableError(
            f"cnnkernels backend {name!r} has no kernel for {op} yet; it has "
            f"{', '.join(sorted(kernels))}")
    if name == "auto":
        if device.type == "cpu":
            return "cpu" if _extension.cpu_ext else _fallback(device)
        if device.type == "cuda":
            if _extension.cuda_ext and "cuda" in kernels:
                return "cuda"
            return "triton" if triton_installed() else _fallback(device)
        if device.type == "meta":
            return "cpu" if _extension.cpu_ext else "torch"  # shapes only: the fake kernels answer
        return "torch"
    if name == "torch":
        return "torch"
    if name == "triton":
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return "triton"
    elif device.type == name or device.type == "meta":
        return name
    raise BackendUnavailableError(
        f"cnnkernels backend {name!r} cannot run tensors on {device}; move the tensor, or choose "
        "another backend with cnnkernels.set_backend()")


def _initial_backend() -> str:
    requested = os.environ.get("CNNKERNELS_BACKEND", "").strip()
    return _validated(requested) if requested else "auto"


_state.backend = _initial_backend()
