"""MaxPool2d: nn.MaxPool2d (same arguments, no state) that pools NCHW CPU tensors in
channels_last.

ATen's CPU max pool is vectorised along the channels of channels_last tensors; on NCHW ones it
walks one plane at a time, several times slower on the stem pool of ResNet and DenseNet than
converting the input and pooling in channels_last. So on the CPU an NCHW input is converted, pooled in channels_last and the (4x smaller) output
converted back with ops.contiguous_from_channels_last; the gradient takes the same way back.
Values are the same (a max is exact), and so are the gradients: both kernels scan each window in
the same order and keep the first maximum, so ties (zeros after a ReLU) go to the same input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.layout import contiguous_from_channels_last, to_channels_last
from ..tuning import runs_torch
from .recompute import ChannelsLastCopy, kept_as_recipe, rebuilding_applies


def pools_faster_in_channels_last(x: torch.Tensor) -> bool:
    """CPU NCHW 4-D tensors with more than one channel (one channel: both layouts are one)."""
    return x.device.type == "cpu" and x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous() \
        and x.is_floating_point()


class MaxPool2d(nn.MaxPool2d):
    @classmethod
    def from_torch(cls, pool: nn.MaxPool2d) -> "MaxPool2d":
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices,
                   pool.ceil_mode).train(pool.training)

    def to_torch(self) -> nn.MaxPool2d:
        return nn.MaxPool2d(self.kernel_size, self.stride, self.padding, self.dilation,
                            self.return_indices, self.ceil_mode).train(self.training)

    def forward(self, x: torch.Tensor):
        if self.return_indices or not pools_faster_in_channels_last(x) or \
                torch.compiler.is_compiling() or runs_torch(self, x):
            return super().forward(x)
        return self.forward_ours(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def forward_ours(self, x: torch.Tensor) -> torch.Tensor:
        pooled_input = to_channels_last(x)
        # autograd keeps x (its producer's output: a ReLU keeps it) and makes the copy again in
        # backward, instead of keeping a second, channels_last, copy of the stem's largest map
        copy = ChannelsLastCopy(x) if rebuilding_applies(x) else None
        with kept_as_recipe(pooled_input, copy):
            y = F.max_pool2d(pooled_input, self.kernel_size, self.stride, self.padding,
                             self.dilation, ceil_mode=self.ceil_mode)
        return contiguous_from_channels_last(y)
