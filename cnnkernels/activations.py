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


def torch_activation(x, name: str, negative_slope: float = 0.01):
    """PyTorch's own function for one of our activation names, applied to x (a fresh tensor that
    nothing else reads, so the ReLUs work in place as torchvision's modules do)."""
    import torch.nn.functional as F
    if name == "identity":
        return x
    if name == "relu":
        return F.relu(x, inplace=True)
    if name == "relu6":
        return F.relu6(x, inplace=True)
    if name == "leaky_relu":
        return F.leaky_relu(x, negative_slope, inplace=True)
    if name == "hardswish":
        return F.hardswish(x)
    if name == "hardsigmoid":
        return F.hardsigmoid(x)
    raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(CODES)}")
