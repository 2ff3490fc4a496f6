"""MobileNet V1 (Howard et al., 2017): a 3×3 conv then 13 depthwise-separable blocks
(depthwise 3×3 - BN - ReLU - pointwise 1×1 - BN - ReLU), global pooling and one classifier.

``width_mult`` (α) thins every layer; ``resolution`` (ρ) is the input size the model is meant for
(the network itself takes any size). Source numbers, Table 6/7 of the paper (ImageNet, 224²
unless said): α=1: 4.2M parameters, 569M multiply-adds; α=0.75: 2.6M, 325M; α=0.5: 1.3M, 149M;
α=0.25: 0.5M, 41M; α=1 at 192²: 418M, 160²: 290M, 128²: 186M. This definition (biases only in
the classifier) has 4,231,976 parameters at α=1.
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MobileNetV1", "mobilenet_v1", "SOURCE_NUMBERS"]

# (width_mult, resolution): (parameters in millions, MMACs), from the paper
SOURCE_NUMBERS = {
    (1.0, 224): (4.2, 569), (0.75, 224): (2.6, 325), (0.5, 224): (1.3, 149),
    (0.25, 224): (0.5, 41), (1.0, 192): (4.2, 418), (1.0, 160): (4.2, 290),
    (1.0, 128): (4.2, 186),
}

# (output channels, stride) of the 13 depthwise-separable blocks (Table 1)
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + \
    [(1024, 2), (1024, 1)]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int,
                  groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DepthwiseSeparable(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(_conv_bn_relu(in_channels, in_channels, 3, stride, groups=in_channels),
                         _conv_bn_relu(in_channels, out_channels, 1, 1))


class MobileNetV1(nn.Module):
    def __init__(self, width_mult: float = 1.0, resolution: int = 224, num_classes: int = 1000,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not 0 < width_mult <= 4:
            raise ValueError(f"mobilenet_v1: width_mult must be in (0, 4], got {width_mult}")
        if resolution < 32:
            raise ValueError(f"mobilenet_v1: resolution must be >= 32, got {resolution}")

        def width(c: int) -> int:
            return max(8, int(c * width_mult))

        channels = width(32)
        layers: list[nn.Module] = [_conv_bn_relu(3, channels, 3, 2)]
        for out, stride in _BLOCKS:
            layers.append(DepthwiseSeparable(channels, width(out), stride))
            channels = width(out)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                        nn.Linear(channels, num_classes))
        self.input_size = (3, resolution, resolution)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)))


def mobilenet_v1(width_mult: float = 1.0, resolution: int = 224, *, fused: bool = False,
                 **kwargs) -> nn.Module:
    """MobileNet V1 (α = width_mult, ρ = resolution; see the module docstring for the paper's
    numbers). fused=True: depthwise convs and every BN+ReLU run on cnnkernels' kernels (same
    parameters and state_dict keys)."""
    model = MobileNetV1(width_mult, resolution, **kwargs)
    if fused:
        from ..conversion import convert

        model = convert(model, inplace=True)
    return model
