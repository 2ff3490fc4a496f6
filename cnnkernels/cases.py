"""Benchmark cases: shapes taken from real models' layers, shared by bench/ and the command line
(so the pytest-benchmark suites and `cnnkernels bench` measure the same things)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    shape: tuple[int, ...]
    source: str  # the layer the shape comes from

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))


# h-swish / h-sigmoid: where MobileNetV3-Large applies them (batch 32, 224x224 input), and the
# 32x96x56x56 tensor the foundation issue asks about.
_ACTIVATION_SHAPES = [
    ((32, 16, 112, 112), "MobileNetV3-L stem"),
    ((32, 96, 56, 56), "reference size"),
    ((32, 240, 28, 28), "MobileNetV3-L block 7 expand"),
    ((32, 480, 14, 14), "MobileNetV3-L block 8 expand"),
    ((32, 960, 7, 7), "MobileNetV3-L last conv"),
]
_QUICK_ACTIVATION_SHAPES = [((32, 96, 56, 56), "reference size"),
                            ((8, 480, 14, 14), "MobileNetV3-L block 8 expand, batch 8")]
# h-sigmoid gates squeeze-and-excitation: [N, C, 1, 1] in the model; measured on feature-map sizes
# too, since it is also used as an elementwise activation.
_OPS = ("hardswish", "hardsigmoid")


def cases(ops: tuple[str, ...] = _OPS, quick: bool = False) -> list[Case]:
    shapes = _QUICK_ACTIVATION_SHAPES if quick else _ACTIVATION_SHAPES
    unknown = set(ops) - set(_OPS)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; known: {', '.join(_OPS)}")
    return [Case(op, shape, source) for op in ops for shape, source in shapes]


def known_ops() -> tuple[str, ...]:
    return _OPS
