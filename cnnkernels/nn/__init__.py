"""Drop-in nn.Module layers whose parameters, buffers and state_dict keys match PyTorch's."""
from .activation import HardSigmoid, HardSwish
from .batchnorm import BatchNormAct2d
from .conv import DepthwiseConv2d
from .conv_bn_act import ConvBNAct2d
from .densenet import DenseBlock, DenseLayer, DenseTransition
from .inverted_residual import InvertedResidual
from .pool import MaxPool2d
from .resnet import ResidualBlock
from .sequential import BNActSequential
from .squeeze_excite import SqueezeExcite

__all__ = ["HardSwish", "HardSigmoid", "DepthwiseConv2d", "DenseBlock", "DenseLayer",
           "DenseTransition", "BatchNormAct2d", "ResidualBlock", "SqueezeExcite", "ConvBNAct2d",
           "MaxPool2d", "InvertedResidual", "BNActSequential"]
