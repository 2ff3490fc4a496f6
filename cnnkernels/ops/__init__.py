"""The ops: one Python front per op, picking the implementation for the tensor's device and the
active backend (cnnkernels.backend), with autograd and fake (meta) kernels registered."""
from .hardswish import hardsigmoid, hardswish

__all__ = ["hardswish", "hardsigmoid"]
