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

import copy

import torch
from torch import nn

from .. import activations, backend, ops
from ..ops.affine_act import _compute_dtype
from ..ops.pointwise_conv2d import KERNELS as POINTWISE_KERNELS
from .conv import _has_forward_hooks, is_plain_1x1, run_conv
from .batchnorm import (_TORCH_ACTIVATIONS, NORMS, FoldCache, activation_of, bn_act,
                        check_eps_and_momentum)
from ..tuning import runs_torch
from .recompute import Recipe, bn_act_recipe, kept_as_recipe


class ConvBNAct2d(nn.Sequential):
    """nn.Sequential(Conv2d, BatchNorm2d[, activation]) whose call runs the three fused.

    Its children are the plain modules, so indexing, ``len``, iteration and a parent that calls
    them one by one see what they saw before convert(); only calling the whole runs the fused path
    (see the module docstring). When a child stops being what the fused path computes (another
    type, a hook, a changed padding mode) the call runs the children one by one instead."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1, activation: str = "relu",
                 negative_slope: float = 0.01, dilation: int = 1, bias: bool = False,
                 eps: float = 1e-5, momentum: float | None = 0.1, device=None,
                 dtype=None) -> None:
        check_eps_and_momentum("ConvBNAct2d", eps, momentum)
        if padding is None:  # torchvision's default: "same" for odd kernels
            padding = (kernel_size - 1) // 2 * dilation
        factory = {"device": device, "dtype": dtype}
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, **factory)
        bn = nn.BatchNorm2d(out_channels, eps, momentum, **factory)
        act = _activation_module(activation, negative_slope)
        super().__init__(conv, bn, *([] if act is None else [act]))
        self._fold_cache = FoldCache()

    @property
    def conv(self) -> nn.Conv2d:
        return self._modules["0"]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self._modules["1"]

    @property
    def act(self) -> nn.Module | None:
        return self._modules.get("2")

    @property
    def activation(self) -> str:
        """The fused activation's name ("identity" without one)."""
        found = activation_of(self.act)
        return found[0] if found is not None else type(self.act).__name__

    @classmethod
    def wrapping(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                 act: nn.Module | None = None) -> "ConvBNAct2d":
        """Ours holding these very modules: their parameters, modes and sharing stay theirs."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"ConvBNAct2d expects an nn.Conv2d, got {type(conv).__name__}")
        problem = unsupported_conv(conv)
        if problem:
            raise ValueError(f"ConvBNAct2d: {problem}")
        if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
            raise TypeError(f"ConvBNAct2d expects an nn.BatchNorm2d, got {type(bn).__name__}")
        if act is not None and activation_of(act) is None:
            raise TypeError(f"ConvBNAct2d: unsupported activation {type(act).__name__}; "
                            f"supported: {', '.join(t.__name__ for t in _TORCH_ACTIVATIONS)}")
        module = cls.__new__(cls)
        nn.Sequential.__init__(module, conv, bn, *([] if act is None else [act]))
        module._fold_cache = FoldCache()
        module.training = bn.training  # its children keep their own modes
        return module

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                     act: nn.Module | None = None) -> "ConvBNAct2d":
        """Ours holding copies of the three modules."""
        return cls.wrapping(*(copy.deepcopy(m) for m in (conv, bn, act)))

    def to_modules(self) -> nn.Sequential:
        """nn.Sequential(Conv2d, BatchNorm2d[, activation]) holding the same modules (same keys)."""
        return nn.Sequential(*self.children()).train(self.training)

    # --- forward --------------------------------------------------------------------------------

    def fusable(self) -> bool:
        """Whether the children are still what the fused path computes (checked on every call,
        so written for speed: attribute reads only)."""
        modules = self._modules
        conv, bn, act = modules.get("0"), modules.get("1"), modules.get("2")
        if len(modules) > 3 or type(conv) is not nn.Conv2d or type(bn) not in NORMS or \
                (act is not None and type(act) not in _TORCH_ACTIVATIONS):
            return False
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return False
        return not (_has_forward_hooks(conv) or bn._forward_hooks or bn._forward_pre_hooks or
                    (act is not None and (act._forward_hooks or act._forward_pre_hooks)))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """act(BN(conv(x)) (+ residual))."""
        if not self.fusable():
            return _children_one_by_one(self, x, residual)
        if residual is None and runs_torch(self, x):
            return self.forward_torch(x)
        activation, slope = activation_of(self.act)
        return conv_bn_act(self.conv, self.bn, x, residual, activation, slope, self._fold_cache)

    keeps_less_memory = True  # training keeps the conv output, not the BN output too

    def forward_ours(self, x: torch.Tensor) -> torch.Tensor:
        activation, slope = activation_of(self.act)
        return conv_bn_act(self.conv, self.bn, x, None, activation, slope, self._fold_cache)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """What the Sequential of the three modules computes."""
        return _children_one_by_one(self, x, None)

    def forward_recipe(self, x: torch.Tensor, x_recipe: Recipe | None,
                       residual: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, Recipe | None]:
        """The call inside a block: x kept as `x_recipe`, and the output's Recipe returned (see
        recompute.py). The caller checks fusable() and the module's own hooks first."""
        activation, slope = activation_of(self.act)
        if _fused_inference(self.conv, self.bn, x, residual):
            return conv_bn_act(self.conv, self.bn, x, residual, activation, slope,
                               self._fold_cache), None
        return conv_bn_act_recipe(self.conv, self.bn, x, x_recipe, residual, activation, slope,
                                  self._fold_cache)


def _activation_module(name: str, negative_slope: float) -> nn.Module | None:
    """torch's activation module for one of our names (None for the identity)."""
    activations.activation_code(name)  # clear error for unknown names
    if name == "identity":
        return None
    torch_type = {n: t for t, n in _TORCH_ACTIVATIONS.items()}[name]
    return torch_type(negative_slope) if name == "leaky_relu" else torch_type()


def _children_one_by_one(seq: nn.Sequential, x: torch.Tensor,
                         residual: torch.Tensor | None) -> torch.Tensor:
    """What the Sequential computes, with the residual added before its activation."""
    conv, bn, *act = seq.children()
    out = bn(conv(x))
    if residual is not None:
        out = out + residual
    return act[0](out) if act else out


def conv_bn_act(conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor,
                residual: torch.Tensor | None = None, activation: str = "identity",
                negative_slope: float = 0.01, fold_cache: FoldCache | None = None
                ) -> torch.Tensor:
    """act(bn(conv(x)) (+ residual)) with BN folded into the conv's epilogue where it can be
    (see the module docstring); ConvBNAct2d's forward, and MobileNetV2's projection + residual in
    InvertedResidual. `bn`: an nn.BatchNorm2d (or BatchNormAct2d, whose own activation is then
    ignored for `activation`)."""
    if _fused_inference(conv, bn, x, residual):
        scale, shift = (fold_cache or FoldCache()).get(bn, _compute_dtype(x.dtype))
        # the depthwise op's epilogue, act(scale·(conv + bias) + shift), has no residual input
        if _is_depthwise(conv) and residual is None:
            return ops.depthwise_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                        conv.dilation, scale=scale, shift=shift,
                                        activation=activation, negative_slope=negative_slope)
        if conv.bias is not None:  # BN(z + b) = scale·z + (shift + scale·b)
            shift = shift + scale * conv.bias.to(scale.dtype)
        return ops.pointwise_conv2d(x, conv.weight, stride=conv.stride[0], groups=conv.groups,
                                    scale=scale, shift=shift, residual=residual,
                                    activation=activation, negative_slope=negative_slope)
    z, stats = _conv_and_statistics(conv, bn, x)
    return bn_act(bn, z, activation, negative_slope, residual, stats, fold_cache)


def conv_bn_act_recipe(conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor, x_recipe: Recipe | None,
                       residual: torch.Tensor | None = None, activation: str = "identity",
                       negative_slope: float = 0.01, fold_cache: FoldCache | None = None
                       ) -> tuple[torch.Tensor, Recipe | None]:
    """conv_bn_act's unfused path, where x is kept as `x_recipe` (an earlier BN+act's output in
    the same block; None: x itself), and the output's Recipe (see recompute.py) for the next conv."""
    with kept_as_recipe(x, x_recipe):
        z, stats = _conv_and_statistics(conv, bn, x)
    return bn_act_recipe(bn, z, activation, negative_slope, residual, stats, fold_cache)


def _conv_and_statistics(conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor):
    """conv(x), and its batch statistics where the conv's kernel computes them (else None)."""
    if _is_depthwise(conv):
        return ops.depthwise_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                    conv.dilation), None
    if _statistics_in_epilogue(conv, bn, x):
        # the Triton GEMM computes BN's batch statistics from its output tiles in registers
        z, mean, var = ops.pointwise_conv2d_stats(x, conv.weight, conv.bias,
                                                  stride=conv.stride[0], groups=conv.groups)
        return z, (mean, var)
    return run_conv(conv, x), None  # 1x1 NCHW on the CPU: our pointwise op's BLAS matmuls


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels and conv.groups > 1 and \
        conv.out_channels % conv.in_channels == 0


def _fused_inference(conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor,
                     residual: torch.Tensor | None) -> bool:
    """Eval without autograd, a 1x1 or depthwise conv (the depthwise op's epilogue has no
    residual input)."""
    return not bn.training and bn.running_mean is not None and \
        not torch.compiler.is_compiling() and \
        not (torch.is_grad_enabled() and _any_requires_grad(
            (x, residual, conv.weight, conv.bias, bn.weight, bn.bias))) and \
        (is_plain_1x1(conv) or (_is_depthwise(conv) and residual is None))


def _any_requires_grad(tensors) -> bool:
    """Attribute reads only (a module's parameters() generator costs microseconds per call)."""
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _statistics_in_epilogue(conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor) -> bool:
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


def runs_as_sequential(module: nn.Module) -> bool:
    """An nn.Sequential whose call runs its children in order: neither its class nor the
    instance has a forward of its own (then fusing neighbours would change what it computes)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward \
        and "forward" not in vars(module)


def conv_bn_act_parts(seq: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module | None] | None:
    """(conv, bn, act or None) when `seq` is an nn.Sequential of exactly Conv2d → BatchNorm2d
    (→ one of our activations), as torchvision's Conv2dNormActivation builds it; else None."""
    if not runs_as_sequential(seq) or isinstance(seq, ConvBNAct2d) or len(seq) not in (2, 3):
        return None
    parts = list(seq)
    if type(parts[0]) is not nn.Conv2d or type(parts[1]) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return None
    if list(seq._modules) != [str(i) for i in range(len(parts))]:
        return None  # named children: keys would not be "0.*", "1.*"
    act = parts[2] if len(parts) == 3 else None
    if act is not None and activation_of(act) is None:
        return None
    return parts[0], parts[1], act
