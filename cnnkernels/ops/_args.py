"""Argument checks shared by the op fronts: messages name the op and the argument, say what was
expected and what came, so that a user can act on them without reading our sources."""
from __future__ import annotations

import numbers

import torch


def check_tensor(value: object, op: str, name: str) -> None:
    """TypeError unless `value` is a torch.Tensor (a list or a NumPy array is not one)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: expected argument '{name}' to be a torch.Tensor, got "
                        f"{type(value).__name__}")


def check_optional_tensor(value: object, op: str, name: str) -> None:
    if value is not None:
        check_tensor(value, op, name)


def _integer_like(value: object) -> bool:
    """int, NumPy integers and 0-d integer tensors; bools are not integers here (NumPy's bool is not
    numbers.Integral either)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and not value.is_complex() \
            and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_int(value: object, op: str, name: str) -> int:
    """`value` as a Python int: accepts what indexes a sequence (int, np.int64, torch.tensor(2)),
    refuses floats (2.0 is not a stride), bools and anything else, by name."""
    if type(value) is int:  # the usual case, answered first: this runs on every op call
        return value
    if not _integer_like(value):
        raise TypeError(f"{op}: expected argument '{name}' to be an int, got "
                        f"{type(value).__name__} {value!r}")
    return int(value)


def as_int_pair(value: object, op: str, name: str) -> list[int]:
    """[a, b] from an integer-like value (both the same) or a pair of them."""
    if _integer_like(value):
        return [int(value)] * 2
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or \
            (isinstance(value, torch.Tensor) and value.dim() != 1):
        raise TypeError(f"{op}: expected argument '{name}' to be an int or a pair of ints, got "
                        f"{type(value).__name__} {value!r}")
    values = list(value)
    if len(values) != 2 or not all(_integer_like(v) for v in values):
        raise TypeError(f"{op}: expected argument '{name}' to be an int or a pair of ints, got "
                        f"{value!r}")
    return [int(v) for v in values]


def as_real(value: object, op: str, name: str) -> float:
    """A real number as a float (0-d floating or integer tensors too); bools refused."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool and \
            not value.is_complex():
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{op}: expected argument '{name}' to be a real number, got "
                    f"{type(value).__name__} {value!r}")
