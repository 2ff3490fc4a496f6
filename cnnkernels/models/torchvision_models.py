"""The classic CNNs that torchvision defines, built by torchvision itself (so parameter count,
state_dict keys and outputs are torchvision's by construction), with ``fused=True`` running
``cnnkernels.convert`` on them: the same parameters and keys, our fused layers inside.

Each constructor documents its source numbers: parameters (exact, torchvision's documentation)
and multiply-accumulates of one 224×224 image (torchvision's "GFLOPS" column, which counts
multiply-adds); tests/test_models.py checks both.
"""
from __future__ import annotations

from torch import nn

__all__ = ["alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg16_bn", "googlenet",
           "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "squeezenet1_0", "squeezenet1_1", "mobilenet_v2", "mobilenet_v3_large",
           "mobilenet_v3_small", "shufflenet_v2_x1_0", "SOURCE_NUMBERS"]

# name: (parameters, GMACs at 224², source)
SOURCE_NUMBERS: dict[str, tuple[int, float, str]] = {
    "alexnet": (61_100_840, 0.71, "torchvision docs; Krizhevsky et al. 2012"),
    "vgg11": (132_863_336, 7.61, "torchvision docs; Simonyan & Zisserman 2015"),
    "vgg13": (133_047_848, 11.31, "torchvision docs"),
    "vgg16": (138_357_544, 15.47, "torchvision docs"),
    "vgg19": (143_667_240, 19.63, "torchvision docs"),
    "vgg11_bn": (132_868_840, 7.61, "torchvision docs"),
    "vgg16_bn": (138_365_992, 15.47, "torchvision docs"),
    "googlenet": (6_624_904, 1.50, "torchvision docs; Szegedy et al. 2015 (with aux heads off)"),
    "resnet18": (11_689_512, 1.81, "torchvision docs; He et al. 2016"),
    "resnet34": (21_797_672, 3.66, "torchvision docs"),
    "resnet50": (25_557_032, 4.09, "torchvision docs (v1.5: stride on the 3x3)"),
    "resnet101": (44_549_160, 7.80, "torchvision docs"),
    "resnet152": (60_192_808, 11.51, "torchvision docs"),
    "resnext50_32x4d": (25_028_904, 4.23, "torchvision docs; Xie et al. 2017"),
    "squeezenet1_0": (1_248_424, 0.82, "torchvision docs; Iandola et al. 2016"),
    "squeezenet1_1": (1_235_496, 0.35, "torchvision docs"),
    "mobilenet_v2": (3_504_872, 0.30, "torchvision docs; Sandler et al. 2018"),
    "mobilenet_v3_large": (5_483_032, 0.22, "torchvision docs; Howard et al. 2019"),
    "mobilenet_v3_small": (2_542_856, 0.06, "torchvision docs"),
    "shufflenet_v2_x1_0": (2_278_604, 0.14, "torchvision docs; Ma et al. 2018"),
}


def _build(name: str, fused: bool, **kwargs) -> nn.Module:
    import torchvision

    kwargs.setdefault("weights", None)
    if name == "googlenet":  # torchvision adds aux heads and random init only when asked
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    model = getattr(torchvision.models, name)(**kwargs)
    if fused:
        from ..conversion import convert

        model = convert(model, inplace=True)
    return model


def _constructor(name: str):
    params, gmacs, source = SOURCE_NUMBERS[name]

    def build(*, fused: bool = False, **kwargs) -> nn.Module:
        return _build(name, fused, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"torchvision's {name}: {params:,} parameters, {gmacs} GMACs at 224² "
                     f"({source}). fused=True: cnnkernels.convert'ed (same parameters and keys); "
                     f"other keyword arguments go to torchvision.models.{name}.")
    return build


alexnet = _constructor("alexnet")
vgg11 = _constructor("vgg11")
vgg13 = _constructor("vgg13")
vgg16 = _constructor("vgg16")
vgg19 = _constructor("vgg19")
vgg11_bn = _constructor("vgg11_bn")
vgg16_bn = _constructor("vgg16_bn")
googlenet = _constructor("googlenet")
resnet18 = _constructor("resnet18")
resnet34 = _constructor("resnet34")
resnet50 = _constructor("resnet50")
resnet101 = _constructor("resnet101")
resnet152 = _constructor("resnet152")
resnext50_32x4d = _constructor("resnext50_32x4d")
squeezenet1_0 = _constructor("squeezenet1_0")
squeezenet1_1 = _constructor("squeezenet1_1")
mobilenet_v2 = _constructor("mobilenet_v2")
mobilenet_v3_large = _constructor("mobilenet_v3_large")
mobilenet_v3_small = _constructor("mobilenet_v3_small")
shufflenet_v2_x1_0 = _constructor("shufflenet_v2_x1_0")
