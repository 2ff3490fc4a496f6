"""LeNet-5 (LeCun et al., 1998), in its common dense form.

32×32 grey input; C1 conv5 → 6 maps, S2 2×2 average pooling, C3 conv5 → 16, S4, C5 conv5 → 120,
F6 120 → 84, output 84 → 10, tanh between. 61,706 parameters and 416,520 multiply-accumulates per
image. The paper's network has ~60,000 trainable parameters: its C3 connects each of the 16 maps
to only some of S2's 6 (a table that breaks symmetry), S2/S4 have trainable coefficients and the
output layer is made of RBF units; this form keeps the layer sizes and connects fully, as the
usual re-implementations do.
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LeNet5", "lenet5"]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 activation: str = "tanh") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"lenet5: unknown activation {activation!r}; choose from "
                             f"{', '.join(_ACTIVATIONS)}")
        act = _ACTIVATIONS[activation]
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5), act(), nn.AvgPool2d(2),  # C1, S2
            nn.Conv2d(6, 16, kernel_size=5), act(), nn.AvgPool2d(2),           # C3, S4
            nn.Conv2d(16, 120, kernel_size=5), act(),                          # C5
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(120, 84), act(),  # F6
                                        nn.Linear(84, num_classes))
        self.input_size = (in_channels, 32, 32)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def lenet5(*, fused: bool = False, **kwargs) -> LeNet5:
    """LeNet-5: 61,706 parameters, 0.42 MMACs at 32×32. It has nothing cnnkernels fuses (no
    BatchNorm, no depthwise conv): ``fused=True`` builds the same plain network."""
    return LeNet5(**kwargs)
