"""Names and integer codes of the activations our fused kernels apply.

The codes mirror ``enum class Activation`` in csrc/include/cnnkernels/activation.h and the
``ACT`` constexpr of cnnkernels/triton/activation.py; they appear in op schemas, so never renumber.
"""
from __future__ import annotations

IDENTITY, RELU, RELU6, LEAKY_RELU, HARDSWISH, HARDSIGMOID = range(6)

CODES = {
    "identity": IDENTITY,
    "relu": RELU,
    "relu6": RELU6,
    "leaky_relu": LEAKY_RELU,
    "hardswish": HARDSWISH,
    "hardsigmoid": HARDSIGMOID,
}

NAMES = {code: name for name, code in CODES.items()}


def activation_code(name: str) -> int:
    """The integer code of an activation name, with a clear error for unknown names."""
    try:
        return CODES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; expected one of {', '.join(CODES)}") from None
