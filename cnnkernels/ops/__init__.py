"""The ops: one Python front per op, picking the implementation for the tensor's device and the
active backend (cnnkernels.backend), with autograd and fake (meta) kernels registered."""
from .affine_act import affine_act
from .batch_norm_act import batch_norm_act
from .depthwise_conv2d import depthwise_conv2d
from .hardswish import hardsigmoid, hardswish
from .layout import contiguous_from_channels_last
from .pointwise_conv2d import pointwise_conv2d, pointwise_conv2d_stats
from .squeeze_excite import squeeze_excite

__all__ = ["hardswish", "hardsigmoid", "depthwise_conv2d", "affine_act", "batch_norm_act",
           "squeeze_excite", "pointwise_conv2d", "pointwise_conv2d_stats",
           "contiguous_from_channels_last"]
