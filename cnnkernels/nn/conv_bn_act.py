"""ConvBNAct2d: Conv2d → BatchNorm2d → activation as one module, with torchvision's
``Conv2dNormActivation`` state_dict keys (``0.weight`` for the conv, ``1.weight``, ``1.bias``,
``1.running_mean``, ... for the BatchNorm), so checkpoints load both ways.

Inference (eval, no autograd) folds the BatchNorm into the convolution's epilogue, so the output
is written once: a 1×1 conv runs as ``ops.pointwise_conv2d`` (one GEMM with act(scale·z + shift)
applied to its output tiles), a depthwise conv as ``ops.depthwise_conv2d`` with the same epilogue.
Other convs: torch's conv, then the fused BN+act pass. Training: the conv (our depthwise kernel
for depthwise convs; for 1×1 NCHW convs on the CPU our pointwise op, whose GEMMs are batched BLAS
matmuls forward and backward), then the fused BatchNormAct2d.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import backend, ops
from ..ops.affine_act import _compute_dtype
from ..ops.pointwise_conv2d import KERNELS as POINTWISE_KERNELS
from .conv import is_plain_1x1, run_conv
from .batchnorm import _TORCH_ACTIVATIONS, BatchNormAct2d


class ConvBNAct2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1, activation: str = "relu",
                 negative_slope: float = 0.01, dilation: int = 1, bias: bool = False,
                 eps: float = 1e-5, momentum: float | None = 0.1, device=None,
                 dtype=None) -> None:
        super().__init__()
        if padding is None:  # torchvision's default: "same" for odd kernels
            padding = (kernel_size - 1) // 2 * dilation
        factory = {"device": device, "dtype": dtype}
        self.add_module("0", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                       dilation, groups, bias, **factory))
        self.add_module("1", BatchNormAct2d(out_channels, eps, momentum, activation=activation,
                                            negative_slope=negative_slope, **factory))

    @property
    def conv(self) -> nn.Conv2d:
        return self._modules["0"]

    @property
    def bn(self) -> BatchNormAct2d:
        return self._modules["1"]

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                     act: nn.Module | None = None) -> "ConvBNAct2d":
        """Ours holding copies of the three modules' parameters and buffers."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"ConvBNAct2d.from_modules expects an nn.Conv2d, got {type(conv).__name__}")
        problem = unsupported_conv(conv)
        if problem:
            raise ValueError(f"ConvBNAct2d.from_modules: {problem}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        conv_copy = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                              conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                              device=conv.weight.device, dtype=conv.weight.dtype)
        conv_copy.load_state_dict(conv.state_dict())
        module.add_module("0", conv_copy.train(conv.training))
        module.add_module("1", BatchNormAct2d.from_modules(bn, act))
        return module.train(bn.training)

    def to_modules(self) -> nn.Sequential:
        """nn.Sequential(Conv2d, BatchNorm2d[, activation]) with the same keys ("0.*", "1.*")."""
        conv = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size,
                         self.conv.stride, self.conv.padding, self.conv.dilation, self.conv.groups,
                         self.conv.bias is not None, device=self.conv.weight.device,
                         dtype=self.conv.weight.dtype)
        conv.load_state_dict(self.conv.state_dict())
        bn_act = self.bn.to_modules()
        layers = [conv, bn_act[0]] + ([] if self.bn.activation == "identity" else [bn_act[1]])
        return nn.Sequential(*layers).train(self.training)

    # --- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """act(BN(conv(x)) (+ residual))."""
        return conv_bn_act(self.conv, self.bn, x, residual)


def conv_bn_act(conv: nn.Conv2d, bn: BatchNormAct2d, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(bn(conv(x)) (+ residual)) with BN folded into the conv's epilogue where it can be
    (see the module docstring); ConvBNAct2d's forward, and MobileNetV2's projection + residual in
    InvertedResidual."""
    if _fused_inference(conv, bn, x, residual):
        scale, shift = bn._running_fold(_compute_dtype(x.dtype))
        # the depthwise op's epilogue, act(scale·(conv + bias) + shift), has no residual input
        if _is_depthwise(conv) and residual is None:
            return ops.depthwise_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                        conv.dilation, scale=scale, shift=shift,
                                        activation=bn.activation,
                                        negative_slope=bn.negative_slope)
        if conv.bias is not None:  # BN(z + b) = scale·z + (shift + scale·b)
            shift = shift + scale * conv.bias.to(scale.dtype)
        return ops.pointwise_conv2d(x, conv.weight, stride=conv.stride[0], groups=conv.groups,
                                    scale=scale, shift=shift, residual=residual,
                                    activation=bn.activation, negative_slope=bn.negative_slope)
    if _is_depthwise(conv):
        z = ops.depthwise_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                 conv.dilation)
    elif _statistics_in_epilogue(conv, bn, x):
        # the Triton GEMM computes BN's batch statistics from its output tiles in registers
        z, mean, var = ops.pointwise_conv2d_stats(x, conv.weight, conv.bias,
                                                  stride=conv.stride[0], groups=conv.groups)
        return bn(z, residual, batch_stats=(mean, var))
    else:
        z = run_conv(conv, x)  # 1x1 NCHW on the CPU: our pointwise op's BLAS matmuls
    return bn(z, residual)


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels and conv.groups > 1 and \
        conv.out_channels % conv.in_channels == 0


def _fused_inference(conv: nn.Conv2d, bn: BatchNormAct2d, x: torch.Tensor,
                     residual: torch.Tensor | None) -> bool:
    """Eval without autograd, a 1x1 or depthwise conv (the depthwise op's epilogue has no
    residual input)."""
    return not bn.training and bn.running_mean is not None and \
        not torch.compiler.is_compiling() and \
        not (torch.is_grad_enabled() and (
            x.requires_grad or (residual is not None and residual.requires_grad) or
            any(p.requires_grad for p in conv.parameters()) or
            any(p.requires_grad for p in bn.parameters()))) and \
        (is_plain_1x1(conv) or (_is_depthwise(conv) and residual is None))


def _statistics_in_epilogue(conv: nn.Conv2d, bn: BatchNormAct2d, x: torch.Tensor) -> bool:
    """Training a 1x1 conv on the Triton backend (its GEMM has the statistics epilogue; the
    other backends would read the output again, as BatchNorm does anyway)."""
    return bn.training and x.dtype != torch.float64 and is_plain_1x1(conv) and \
        x.dim() == 4 and backend.select(x.device, POINTWISE_KERNELS, "pointwise_conv2d") == "triton"


def unsupported_conv(conv: nn.Conv2d) -> str | None:
    """Why a conv cannot be part of a ConvBNAct2d, or None."""
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros')"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (numbers only)"
    return None


def conv_bn_act_parts(seq: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module | None] | None:
    """(conv, bn, act or None) when `seq` is an nn.Sequential of exactly Conv2d → BatchNorm2d
    (→ one of our activations), as torchvision's Conv2dNormActivation builds it; else None."""
    if not isinstance(seq, nn.Sequential) or len(seq) not in (2, 3):
        return None
    parts = list(seq)
    if type(parts[0]) is not nn.Conv2d or type(parts[1]) is not nn.BatchNorm2d:
        return None
    if list(seq._modules) != [str(i) for i in range(len(parts))]:
        return None  # named children: keys would not be "0.*", "1.*"
    act = parts[2] if len(parts) == 3 else None
    if act is not None and type(act) not in _TORCH_ACTIVATIONS:
        return None
    return parts[0], parts[1], None if type(act) is nn.Identity else act
