"""Benchmark cases: shapes taken from real models' layers, shared by bench/ and the command line
(so the pytest-benchmark suites and `cnnkernels bench` measure the same things), and the functions
that run each case on PyTorch and on cnnkernels."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    shape: tuple[int, ...]  # the input [N, C, H, W]
    source: str  # the layer the shape comes from
    kernel: int = 0  # convolutions: kernel size; squeeze_excite: squeeze channels;
    # pointwise_conv2d: output channels
    stride: int = 1
    residual: bool = False  # pointwise_conv2d: the projection adds the block's residual

    @property
    def label(self) -> str:
        text = "x".join(map(str, self.shape))
        if self.kernel and self.op == "squeeze_excite":
            text += f" s{self.kernel}"
        elif self.op == "pointwise_conv2d":
            text += f" o{self.kernel}" + ("" if self.stride == 1 else f"s{self.stride}")
        elif self.kernel:
            text += f" k{self.kernel}s{self.stride}"
        return text


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

# depthwise convolutions: (channels, spatial size, kernel, stride, source)
_DEPTHWISE_LAYERS = [
    (32, 112, 3, 1, "MobileNetV2 block 1"),
    (96, 112, 3, 2, "MobileNetV2 block 2 (stride 2)"),
    (144, 56, 3, 1, "MobileNetV2 block 3"),
    (144, 56, 3, 2, "MobileNetV2 block 4 (stride 2)"),
    (192, 28, 3, 1, "MobileNetV2 block 5"),
    (384, 14, 3, 1, "MobileNetV2 block 8"),
    (576, 14, 3, 1, "MobileNetV2 block 12"),
    (576, 14, 3, 2, "MobileNetV2 block 14 (stride 2)"),
    (960, 7, 3, 1, "MobileNetV2 block 15"),
    (72, 28, 5, 1, "MobileNetV3-L block 4"),
    (120, 28, 5, 1, "MobileNetV3-L block 5"),
    (672, 14, 5, 1, "MobileNetV3-L block 12"),
    (960, 7, 5, 1, "MobileNetV3-L block 14"),
    (96, 56, 7, 1, "ConvNeXt-T stage 1"),
    (192, 28, 7, 1, "ConvNeXt-T stage 2"),
    (384, 14, 7, 1, "ConvNeXt-T stage 3"),
    (768, 7, 7, 1, "ConvNeXt-T stage 4"),
]
_QUICK_DEPTHWISE = [(144, 56, 3, 1, "MobileNetV2 block 3"), (672, 14, 5, 1, "MobileNetV3-L block 12"),
                    (96, 56, 7, 1, "ConvNeXt-T stage 1")]

# BatchNorm + ReLU: MobileNetV2 / ResNet-50 / DenseNet-121 activations (the BN+act issue's list).
# "fwd" is evaluation (running statistics), "fwd+bwd" a training step (batch statistics).
_BATCH_NORM_SHAPES = [
    ((32, 96, 56, 56), "MobileNetV2 block 2 expand"),
    ((32, 144, 56, 56), "MobileNetV2 block 3 expand"),
    ((32, 256, 56, 56), "ResNet-50 layer1 output"),
    ((32, 384, 14, 14), "MobileNetV2 block 8 expand"),
    ((32, 1024, 14, 14), "ResNet-50 layer3 output"),
]
_QUICK_BATCH_NORM_SHAPES = [((32, 96, 56, 56), "MobileNetV2 block 2 expand"),
                            ((8, 384, 14, 14), "MobileNetV2 block 8 expand, batch 8")]

# Squeeze-and-excitation: MobileNetV3-Large's SE blocks (channels, size, squeeze channels), batch 32.
_SE_SHAPES = [
    ((32, 72, 28, 28), 24, "MobileNetV3-L block 4 SE"),
    ((32, 120, 28, 28), 32, "MobileNetV3-L block 5 SE"),
    ((32, 480, 14, 14), 120, "MobileNetV3-L block 11 SE"),
    ((32, 672, 14, 14), 168, "MobileNetV3-L block 12 SE"),
    ((32, 960, 7, 7), 240, "MobileNetV3-L block 14 SE"),
]
_QUICK_SE_SHAPES = [((32, 120, 28, 28), 32, "MobileNetV3-L block 5 SE"),
                    ((8, 672, 14, 14), 168, "MobileNetV3-L block 12 SE, batch 8")]

# Conv1x1 → BN(eval) → act (issue 5's list): (in channels, out channels, size, source); the
# projections (no activation) add the block's residual, as MobileNetV2's inverted residuals do.
_POINTWISE_LAYERS = [  # (in, out, size, source); "+ residual": the case adds a residual
    (24, 144, 56, "MobileNetV2 block 3 expand"),
    (144, 24, 56, "MobileNetV2 block 3 project + residual"),
    (32, 192, 28, "MobileNetV2 block 5 expand"),
    (96, 576, 14, "MobileNetV2 block 12 expand"),
    (160, 960, 7, "MobileNetV2 block 15 expand"),
    (256, 64, 56, "ResNet-50 layer1 conv1"),
    (64, 256, 56, "ResNet-50 layer1 conv3"),
    (1024, 256, 14, "ResNet-50 layer3 conv1"),
    (256, 128, 56, "DenseNet-121 block 1 bottleneck"),
    (512, 128, 28, "DenseNet-121 block 2 bottleneck"),
    (1024, 128, 7, "DenseNet-121 block 4 bottleneck"),
]
_QUICK_POINTWISE = [_POINTWISE_LAYERS[0], _POINTWISE_LAYERS[1], _POINTWISE_LAYERS[3]]

_OPS = ("hardswish", "hardsigmoid", "depthwise_conv2d", "batch_norm_act", "squeeze_excite",
        "affine_act", "pointwise_conv2d")

# Ops timed forward only: passes without autograd (affine_act). pointwise_conv2d's "fwd" is the
# inference Conv1x1-BN-Act (BatchNorm folded into the epilogue), its "fwd+bwd" the training step
# of Conv1x1-BN-Act as ConvBNAct2d runs it (its conv, then our batch_norm_act).
_FORWARD_ONLY = frozenset({"affine_act"})


def directions(op: str) -> tuple[str, ...]:
    """The passes timed for `op`: "fwd", and "fwd+bwd" where it has autograd."""
    return ("fwd",) if op in _FORWARD_ONLY else ("fwd", "fwd+bwd")


def known_ops() -> tuple[str, ...]:
    return _OPS


def cases(ops: tuple[str, ...] = _OPS, quick: bool = False, batch: int | None = None) -> list[Case]:
    """The cases of `ops`; `batch` overrides the batch size (default 32, quick 8 for convs)."""
    unknown = set(ops) - set(_OPS)
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(sorted(unknown))}; known: {', '.join(_OPS)}")
    result = []
    for op in ops:
        if op == "affine_act":  # BatchNorm's elementwise pass: on the BatchNorm shapes
            for shape, source in (_QUICK_BATCH_NORM_SHAPES if quick else _BATCH_NORM_SHAPES):
                shape = (batch, *shape[1:]) if batch else shape
                result.append(Case(op, shape, source))
        elif op == "squeeze_excite":
            for shape, squeeze, source in (_QUICK_SE_SHAPES if quick else _SE_SHAPES):
                shape = (batch, *shape[1:]) if batch else shape
                result.append(Case(op, shape, source, kernel=squeeze))
        elif op == "batch_norm_act":
            for shape, source in (_QUICK_BATCH_NORM_SHAPES if quick else _BATCH_NORM_SHAPES):
                shape = (batch, *shape[1:]) if batch else shape
                result.append(Case(op, shape, source))
        elif op == "pointwise_conv2d":
            n = batch or (8 if quick else 32)
            for cin, cout, size, source in (_QUICK_POINTWISE if quick else _POINTWISE_LAYERS):
                result.append(Case(op, (n, cin, size, size), source, kernel=cout,
                                   residual=source.endswith("+ residual")))
        elif op == "depthwise_conv2d":
            n = batch or (8 if quick else 32)
            for c, size, k, s, source in (_QUICK_DEPTHWISE if quick else _DEPTHWISE_LAYERS):
                result.append(Case(op, (n, c, size, size), source, kernel=k, stride=s))
        else:
            for shape, source in (_QUICK_ACTIVATION_SHAPES if quick else _ACTIVATION_SHAPES):
                shape = (batch, *shape[1:]) if batch else shape
                result.append(Case(op, shape, source))
    return result


# The fewest input-sized tensor passes (reads + writes) each op and direction needs: what a
# memory-bound kernel's achieved bandwidth is counted against. Weights and per-channel vectors are
# left out (small); depthwise counts the input and output once each way, halos aside.
_MIN_PASSES = {
    ("hardswish", "fwd"): 2, ("hardswish", "fwd+bwd"): 5,  # x→y; then grad, x → dx
    ("hardsigmoid", "fwd"): 2, ("hardsigmoid", "fwd+bwd"): 5,
    ("depthwise_conv2d", "fwd"): 2,  # x → y
    ("depthwise_conv2d", "fwd+bwd"): 7,  # + grad, x → dx and grad, x → dweight
    ("batch_norm_act", "fwd"): 2,  # eval: x → y
    ("batch_norm_act", "fwd+bwd"): 8,  # x (stats), x → y; x, grad (sums); x, grad → dx
    ("squeeze_excite", "fwd"): 3,  # x (mean), x → y
    ("squeeze_excite", "fwd+bwd"): 8,  # + grad, x → dx (and sums), dx += pooled gradient
    ("affine_act", "fwd"): 2,  # x → y
}


def min_bytes(case: Case, direction: str, element_size: int) -> int:
    """Bytes a kernel must move at least for `case` (input-sized tensors only, see _MIN_PASSES;
    strided convolutions count their smaller output as a full pass, an overestimate)."""
    numel = 1
    for size in case.shape:
        numel *= size
    if case.op == "pointwise_conv2d":
        out = numel // case.shape[1] * case.kernel // case.stride ** 2
        if direction == "fwd":  # x read, y written (and the residual read)
            return (numel + out * (2 if case.residual else 1)) * element_size
        # + backward: grad read, x read again (weight gradient), dx written (and dresidual)
        return (3 * numel + out * (4 if case.residual else 2)) * element_size
    return _MIN_PASSES[(case.op, direction)] * numel * element_size


@dataclasses.dataclass
class Prepared:
    """One case made runnable: `leaves` get gradients; `torch_fn`/`ours_fn` compute the output."""
    leaves: list[torch.Tensor]
    torch_fn: Callable[[], torch.Tensor]
    ours_fn: Callable[[], torch.Tensor]


def prepare(case: Case, device, dtype: torch.dtype, requires_grad: bool,
            channels_last: bool = False) -> Prepared:
    from . import ops  # late: cases are importable without the ops

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(case.shape, generator=gen) * 4).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(requires_grad)
    if case.op in ("hardswish", "hardsigmoid"):
        reference = getattr(F, case.op)
        ours = getattr(ops, case.op)
        return Prepared([x], lambda: reference(x), lambda: ours(x))
    if case.op == "depthwise_conv2d":
        c, k, s = case.shape[1], case.kernel, case.stride
        weight = (torch.randn(c, 1, k, k, generator=gen) / k).to(device=device, dtype=dtype)
        bias = torch.randn(c, generator=gen).to(device=device, dtype=dtype)
        weight.requires_grad_(requires_grad)
        return Prepared(
            [x, weight],
            lambda: F.conv2d(x, weight, bias, s, k // 2, 1, c),
            lambda: ops.depthwise_conv2d(x, weight, bias, s, k // 2))
    if case.op == "batch_norm_act":
        return _prepare_batch_norm_act(case, x, gen, requires_grad)
    if case.op == "squeeze_excite":
        return _prepare_squeeze_excite(case, x, gen, requires_grad)
    if case.op == "affine_act":
        return _prepare_affine_act(case, x, gen)
    if case.op == "pointwise_conv2d":
        if requires_grad:
            return _prepare_conv_bn_act_training(case, x, gen)
        return _prepare_pointwise_conv2d(case, x, gen)
    raise ValueError(f"unknown op {case.op!r}")


def _prepare_batch_norm_act(case: Case, x: torch.Tensor, gen: torch.Generator,
                            training: bool) -> Prepared:
    """BatchNorm → ReLU as torchvision writes it (nn.ReLU(inplace=True)) vs ours; float32
    parameters and statistics whatever x's dtype (as under autocast). Each side updates its own
    running statistics in training."""
    from . import ops

    c = case.shape[1]
    weight = (torch.rand(c, generator=gen) + 0.5).to(x.device).requires_grad_(training)
    bias = torch.randn(c, generator=gen).to(x.device).requires_grad_(training)
    torch_stats = [torch.zeros(c, device=x.device), torch.ones(c, device=x.device)]
    our_stats = [t.clone() for t in torch_stats]
    return Prepared(
        [x, weight, bias] if training else [x],
        lambda: F.relu(F.batch_norm(x, *torch_stats, weight, bias, training, 0.1, 1e-5),
                       inplace=True),
        lambda: ops.batch_norm_act(x, weight, bias, *our_stats, training, 0.1, 1e-5, "relu"))


def _prepare_squeeze_excite(case: Case, x: torch.Tensor, gen: torch.Generator,
                            requires_grad: bool) -> Prepared:
    """torchvision's SqueezeExcitation as it computes (avgpool, 1x1 convs, ReLU, Hardsigmoid,
    multiply) vs ours, with the same weights."""
    from . import ops

    c, s = case.shape[1], case.kernel
    w1 = (torch.randn(s, c, 1, 1, generator=gen) / c ** 0.5).to(x.device, x.dtype).requires_grad_(requires_grad)
    b1 = torch.randn(s, generator=gen).to(x.device, x.dtype).requires_grad_(requires_grad)
    w2 = (torch.randn(c, s, 1, 1, generator=gen) / s ** 0.5).to(x.device, x.dtype).requires_grad_(requires_grad)
    b2 = torch.randn(c, generator=gen).to(x.device, x.dtype).requires_grad_(requires_grad)

    def torchvision_se():
        scale = F.conv2d(F.relu(F.conv2d(F.adaptive_avg_pool2d(x, 1), w1, b1)), w2, b2)
        return F.hardsigmoid(scale) * x
    return Prepared([x, w1, b1, w2, b2], torchvision_se,
                    lambda: ops.squeeze_excite(x, w1, b1, w2, b2, "relu", "hardsigmoid"))


def _prepare_affine_act(case: Case, x: torch.Tensor, gen: torch.Generator) -> Prepared:
    """relu(x · scale[c] + shift[c]) as torch ops (multiply, add, in-place ReLU) vs our one pass."""
    from . import ops

    c = case.shape[1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = (torch.rand(c, generator=gen) + 0.5).to(x.device, compute)
    shift = torch.randn(c, generator=gen).to(x.device, compute)
    view = [1, -1] + [1] * (x.dim() - 2)
    return Prepared([x], lambda: F.relu(x * scale.view(view).to(x.dtype) + shift.view(view).to(x.dtype),
                                        inplace=True),
                    lambda: ops.affine_act(x, scale, shift, "relu"))


def _prepare_pointwise_conv2d(case: Case, x: torch.Tensor, gen: torch.Generator) -> Prepared:
    """Inference Conv1x1 → BatchNorm → ReLU as torchvision runs it (conv, batch_norm, in-place
    ReLU; projections: BN then + residual, no activation) vs ours with BN folded into the epilogue
    (folded once, as ConvBNAct2d does at eval)."""
    from . import ops

    cin, cout = case.shape[1], case.kernel
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = (torch.randn(cout, cin, 1, 1, generator=gen) / cin ** 0.5).to(x.device, x.dtype)
    gamma = (torch.rand(cout, generator=gen) + 0.5).to(x.device, compute)
    beta = torch.randn(cout, generator=gen).to(x.device, compute)
    mean = torch.randn(cout, generator=gen).to(x.device, compute)
    var = (torch.rand(cout, generator=gen) + 0.5).to(x.device, compute)
    scale = gamma / torch.sqrt(var + 1e-5)
    shift = beta - mean * scale
    out_shape = (case.shape[0], cout, case.shape[2] // case.stride, case.shape[3] // case.stride)
    residual = torch.randn(out_shape, generator=gen).to(x.device, x.dtype).contiguous(
        memory_format=torch.channels_last if not x.is_contiguous() else torch.contiguous_format) \
        if case.residual else None

    def torch_fn():
        y = F.batch_norm(F.conv2d(x, weight, None, case.stride), mean, var, gamma, beta, False)
        return y + residual if residual is not None else F.relu(y, inplace=True)

    activation = "identity" if residual is not None else "relu"
    return Prepared([x], torch_fn, lambda: ops.pointwise_conv2d(
        x, weight, stride=case.stride, scale=scale, shift=shift, activation=activation,
        residual=residual))


def _prepare_conv_bn_act_training(case: Case, x: torch.Tensor, gen: torch.Generator) -> Prepared:
    """A training step of Conv1x1 → BatchNorm → ReLU (projections: BN then + residual) as
    torchvision runs it vs as ConvBNAct2d runs it (on NCHW CPU input our pointwise op, whose GEMMs
    are BLAS matmuls, else torch's conv; then our batch_norm_act with the residual fused),
    sharing x, the conv weight and the BN affine parameters (the leaves); each side updates its
    own running statistics."""
    from . import ops
    from .nn.conv import pointwise_matmul_runs

    cin, cout = case.shape[1], case.kernel
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = (torch.randn(cout, cin, 1, 1, generator=gen) / cin ** 0.5).to(x.device, x.dtype)
    gamma = (torch.rand(cout, generator=gen) + 0.5).to(x.device, compute)
    beta = torch.randn(cout, generator=gen).to(x.device, compute)
    for t in (weight, gamma, beta):
        t.requires_grad_()
    torch_stats = [torch.zeros(cout, device=x.device, dtype=compute),
                   torch.ones(cout, device=x.device, dtype=compute)]
    our_stats = [t.clone() for t in torch_stats]
    out_shape = (case.shape[0], cout, case.shape[2] // case.stride, case.shape[3] // case.stride)
    residual = torch.randn(out_shape, generator=gen).to(x.device, x.dtype).contiguous(
        memory_format=torch.channels_last if not x.is_contiguous() else torch.contiguous_format) \
        if case.residual else None

    def torch_fn():
        y = F.batch_norm(F.conv2d(x, weight, None, case.stride), *torch_stats, gamma, beta, True)
        return y + residual if residual is not None else F.relu(y, inplace=True)

    def conv():  # as ConvBNAct2d's run_conv chooses: BLAS matmuls for NCHW CPU 1x1 convs
        if pointwise_matmul_runs(x, weight, case.stride, 1):
            return ops.pointwise_conv2d(x, weight, stride=case.stride)
        return F.conv2d(x, weight, None, case.stride)

    def ours_fn():
        return ops.batch_norm_act(conv(), gamma, beta, *our_stats,
                                  True, 0.1, 1e-5, "identity" if residual is not None else "relu",
                                  residual=residual)

    return Prepared([x, weight, gamma, beta], torch_fn, ours_fn)
