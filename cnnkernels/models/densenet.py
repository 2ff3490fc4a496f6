"""DenseNets (Huang et al., 2017): torchvision's ImageNet models and DenseNet-BC for CIFAR.

Each builds with ``memory="naive" | "checkpoint" | "shared"`` (see cnnkernels.nn.densenet). The
ImageNet models have torchvision's module names, so their state_dicts load in both directions.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.densenet import DenseBlock, check_memory_mode

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
           "densenet_bc"]


class Transition(nn.Sequential):
    """BN-ReLU-conv1×1 (compression) - avgpool2×2, named as torchvision's ``_Transition``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


def _check_fused(fused: bool) -> None:
    if fused:
        raise NotImplementedError(
            "cnnkernels: fused=True needs the fused BatchNorm+ReLU and pointwise-prologue kernels, "
            "which DenseNet does not use yet; build with fused=False")


class DenseNet(nn.Module):
    """DenseNet-BC. ``stem="imagenet"``: conv7×7/2, BN, ReLU, maxpool (torchvision's layout);
    ``stem="cifar"``: one conv3×3 to ``num_init_features`` channels. ``recompute_bottleneck``
    (shared mode): recompute each layer's 4k-channel bottleneck in backward (least memory) or keep
    it (less time); see cnnkernels.nn.DenseBlock."""

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 1000, memory: str = "shared", fused: bool = False,
                 stem: str = "imagenet", compression: float = 0.5,
                 recompute_bottleneck: bool = True) -> None:
        super().__init__()
        check_memory_mode(memory)
        _check_fused(fused)
        if stem == "imagenet":
            layers: list[tuple[str, nn.Module]] = [
                ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3,
                                    bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        elif stem == "cifar":
            layers = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, padding=1, bias=False))]
        else:
            raise ValueError(f"cnnkernels: stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.features = nn.Sequential(OrderedDict(layers))
        channels = num_init_features
        for index, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bn_size, drop_rate, memory=memory,
                               recompute_bottleneck=recompute_bottleneck)
            self.features.add_module(f"denseblock{index + 1}", block)
            channels = block.out_channels
            if index != len(block_config) - 1:
                out_channels = int(channels * compression)
                self.features.add_module(f"transition{index + 1}", Transition(channels, out_channels))
                channels = out_channels
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        self.memory = memory
        self._init_weights()

    def _init_weights(self) -> None:  # torchvision's
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
            elif isinstance(module, nn.Linear):
                nn.init.constant_(module.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def _imagenet(growth_rate: int, block_config: Sequence[int], num_init_features: int,
              **kwargs) -> DenseNet:
    return DenseNet(growth_rate, block_config, num_init_features, **kwargs)


def densenet121(**kwargs) -> DenseNet:
    """DenseNet-121: 7,978,856 parameters, 2.83 GMACs at 224² (torchvision's numbers)."""
    return _imagenet(32, (6, 12, 24, 16), 64, **kwargs)


def densenet161(**kwargs) -> DenseNet:
    """DenseNet-161 (k=48): 28,681,000 parameters, 7.73 GMACs at 224²."""
    return _imagenet(48, (6, 12, 36, 24), 96, **kwargs)


def densenet169(**kwargs) -> DenseNet:
    """DenseNet-169: 14,149,480 parameters, 3.36 GMACs at 224²."""
    return _imagenet(32, (6, 12, 32, 32), 64, **kwargs)


def densenet201(**kwargs) -> DenseNet:
    """DenseNet-201: 20,013,928 parameters, 4.29 GMACs at 224²."""
    return _imagenet(32, (6, 12, 48, 32), 64, **kwargs)


def densenet264(**kwargs) -> DenseNet:
    """DenseNet-264 (blocks 6-12-64-48, from the DenseNet paper; not in torchvision)."""
    return _imagenet(32, (6, 12, 64, 48), 64, **kwargs)


def densenet_bc(depth: int = 100, growth_rate: int = 12, num_classes: int = 10,
                memory: str = "shared", drop_rate: float = 0.0, fused: bool = False) -> DenseNet:
    """DenseNet-BC for 32×32 inputs: 3 blocks of (depth − 4) / 6 bottleneck layers, 2k initial
    channels, compression 0.5. L=100, k=12 has 0.8 M parameters (the paper's Table 2)."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"cnnkernels: DenseNet-BC depth must be 6n + 4 with n >= 1 (e.g. 40, 100, "
                         f"160, 250), got {depth!r}")
    layers_per_block = (depth - 4) // 6
    return DenseNet(growth_rate, (layers_per_block,) * 3, 2 * growth_rate, bn_size=4,
                    drop_rate=drop_rate, num_classes=num_classes, memory=memory, fused=fused,
                    stem="cifar")
