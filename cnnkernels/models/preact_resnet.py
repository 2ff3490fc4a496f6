"""Pre-activation ResNets (He et al., "Identity Mappings in Deep Residual Networks", 2016): each
block computes BN → ReLU → conv (→ BN → ReLU → conv ...) and adds its input unchanged, so the
identity path carries no BatchNorm or ReLU; projection shortcuts take the pre-activated input.
A final BN → ReLU precedes the pooling.

The convolutions are ResNet's (torchvision's v1.5 layout: stride on the 3×3), so the MACs equal
torchvision's resnet18/34/50/101/152 (tests/test_models.py checks 1.81, 3.66, 4.09, 7.80, 11.51
GMACs at 224²); parameters differ only by where the BatchNorms sit (the counts in each
constructor's docstring are this definition's, checked by the tests; the paper gives none for
these depths). Every BN → ReLU pair is an
``nn.Sequential`` (``preact``, ``bn_relu2``, ...), so ``fused=True`` (cnnkernels.convert) runs each
pair as one BatchNormAct2d.
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PreActResNet", "preact_resnet18", "preact_resnet34", "preact_resnet50",
           "preact_resnet101", "preact_resnet152"]


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.preact = _bn_relu(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn_relu2 = _bn_relu(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and inplanes == planes else \
            nn.Conv2d(inplanes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.preact(x)
        shortcut = x if self.shortcut is None else self.shortcut(out)
        return self.conv2(self.bn_relu2(self.conv1(out))) + shortcut


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.preact = _bn_relu(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn_relu2 = _bn_relu(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn_relu3 = _bn_relu(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut = None if stride == 1 and inplanes == out_planes else \
            nn.Conv2d(inplanes, out_planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.preact(x)
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.bn_relu2(self.conv1(out)))
        return self.conv3(self.bn_relu3(out)) + shortcut


class PreActResNet(nn.Module):
    def __init__(self, block, layers: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        inplanes, stages = 64, []
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if index == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(block(inplanes, planes, stride if b == 0 else 1))
                inplanes = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.post = _bn_relu(inplanes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(self.post(x)).flatten(1))


def _build(block, layers, fused: bool, **kwargs) -> nn.Module:
    model = PreActResNet(block, layers, **kwargs)
    if fused:
        from ..conversion import convert

        model = convert(model, inplace=True)
    return model


def preact_resnet18(*, fused: bool = False, **kwargs) -> nn.Module:
    """Pre-activation ResNet-18: 11,687,848 parameters, 1.81 GMACs at 224² (ResNet-18's convs)."""
    return _build(PreActBasicBlock, [2, 2, 2, 2], fused, **kwargs)


def preact_resnet34(*, fused: bool = False, **kwargs) -> nn.Module:
    """Pre-activation ResNet-34: 21,796,008 parameters, 3.66 GMACs at 224²."""
    return _build(PreActBasicBlock, [3, 4, 6, 3], fused, **kwargs)


def preact_resnet50(*, fused: bool = False, **kwargs) -> nn.Module:
    """Pre-activation ResNet-50: 25,549,480 parameters, 4.09 GMACs at 224²."""
    return _build(PreActBottleneck, [3, 4, 6, 3], fused, **kwargs)


def preact_resnet101(*, fused: bool = False, **kwargs) -> nn.Module:
    """Pre-activation ResNet-101: 44,541,608 parameters, 7.80 GMACs at 224²."""
    return _build(PreActBottleneck, [3, 4, 23, 3], fused, **kwargs)


def preact_resnet152(*, fused: bool = False, **kwargs) -> nn.Module:
    """Pre-activation ResNet-152: 60,185,256 parameters, 11.51 GMACs at 224²."""
    return _build(PreActBottleneck, [3, 8, 36, 3], fused, **kwargs)
