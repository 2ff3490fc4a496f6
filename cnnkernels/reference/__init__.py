"""Pure-torch references of every op: what the tests compare against, and what the ops fall back
to when no compiled kernel is available. They import nothing compiled from cnnkernels."""
from . import activation, affine_act, batch_norm_act, depthwise_conv2d, hardswish, squeeze_excite  # noqa: F401
