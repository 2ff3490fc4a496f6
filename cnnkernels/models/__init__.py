"""Reference CNNs, buildable with plain torch layers or with cnnkernels' layers."""
from .densenet import (DenseNet, densenet121, densenet161, densenet169, densenet201, densenet264,
                       densenet_bc)

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
           "densenet_bc"]
