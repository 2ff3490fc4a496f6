"""SE-ResNet-50 (Hu et al., 2018): ResNet-50 whose every bottleneck scales its residual branch
by a squeeze-and-excitation gate (reduction 16) before the addition.

Built on torchvision's ResNet (stride on the 3×3, "v1.5"), so every key outside the SE modules is
torchvision's resnet50's, and the SE modules are torchvision ``SqueezeExcitation``s (fc1, fc2 as
1×1 convs with biases). 28,088,024 parameters (the paper: 28.09M; 25,557,032 of them are
ResNet-50's) and 4.09 GMACs at 224² (the paper counts 3.87 GFLOPs against 3.86 for its own
ResNet-50 with the stride on the 1×1; SE adds ~0.01).
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SEBottleneck", "se_resnet50"]


class SEBottleneck(nn.Module):
    """torchvision's Bottleneck (same attribute names) with ``se`` on the residual branch."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None, reduction: int = 16) -> None:
        super().__init__()
        from torchvision.ops import SqueezeExcitation

        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, groups=groups, bias=False,
                               dilation=dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = norm_layer(out)
        self.se = SqueezeExcitation(out, out // reduction)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


def se_resnet50(*, fused: bool = False, **kwargs) -> nn.Module:
    """SE-ResNet-50: 28,088,024 parameters, 4.09 GMACs at 224² (see the module docstring).
    fused=True: the SE gates run on cnnkernels' fused squeeze-excite (same keys)."""
    from torchvision.models.resnet import ResNet

    model = ResNet(SEBottleneck, [3, 4, 6, 3], **kwargs)
    if fused:
        from ..conversion import convert

        model = convert(model, inplace=True)
    return model
