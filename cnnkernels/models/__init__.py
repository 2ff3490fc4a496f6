"""Reference CNNs, buildable with plain torch layers or with cnnkernels' layers (``fused=True``).

torchvision's classics come from torchvision itself (identical parameters, keys and outputs);
LeNet-5, MobileNet V1, SE-ResNet-50, the pre-activation ResNets and the DenseNets are defined
here. Each constructor's
docstring gives its source numbers (parameters, multiply-accumulates), which tests/test_models.py
checks with torch.utils.flop_counter.
"""
from .densenet import (DenseNet, densenet121, densenet161, densenet169, densenet201, densenet264,
                       densenet_bc)
from .lenet import LeNet5, lenet5
from .mobilenet_v1 import MobileNetV1, mobilenet_v1
from .preact_resnet import (PreActResNet, preact_resnet18, preact_resnet34, preact_resnet50,
                            preact_resnet101, preact_resnet152)
from .se_resnet import se_resnet50
from .torchvision_models import (alexnet, googlenet, mobilenet_v2, mobilenet_v3_large,
                                 mobilenet_v3_small, resnet18, resnet34, resnet50, resnet101,
                                 resnet152, resnext50_32x4d, shufflenet_v2_x1_0, squeezenet1_0,
                                 squeezenet1_1, vgg11, vgg11_bn, vgg13, vgg16, vgg16_bn, vgg19)

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
           "densenet_bc", "LeNet5", "lenet5", "MobileNetV1", "mobilenet_v1", "se_resnet50",
           "alexnet", "googlenet", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
           "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "shufflenet_v2_x1_0", "squeezenet1_0", "squeezenet1_1", "vgg11", "vgg11_bn", "vgg13",
           "vgg16", "vgg16_bn", "vgg19", "PreActResNet", "preact_resnet18", "preact_resnet34",
           "preact_resnet50", "preact_resnet101", "preact_resnet152"]
