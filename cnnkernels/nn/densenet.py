"""DenseNet layers and blocks with three memory strategies (seed 004 §8.4; Pleiss et al., 2017).

A dense block of L layers feeds layer l the concatenation of the block input and all l earlier
outputs. Written naively, every layer's concatenation and its BatchNorm output are fresh tensors
that autograd keeps for backward, so memory grows with the square of depth. `DenseBlock(memory=...)`:

* ``"naive"``: the textbook layer, ``cat → BN → ReLU → conv1×1 → BN → ReLU → conv3×3``.
* ``"checkpoint"``: what torchvision's ``memory_efficient=True`` does, ``cat → BN → ReLU → conv1×1``
  under ``torch.utils.checkpoint``, but with running statistics updated once per step (torchvision
  updates them again when the checkpoint recomputes: pytorch issue 96136).
* ``"shared"``: the block's output ``[N, C0 + L·k, H, W]`` is allocated once and each layer writes its
  k new channels into its slice, so there are no concatenation copies to keep. The concatenation a
  1×1 conv reads and the BN+ReLU outputs live in two scratch storages shared by all layers of the
  block, overwritten layer after layer, and recomputed in backward. Per layer autograd keeps only the
  bottleneck (the 1×1 conv's 4k-channel output; not even that with ``recompute_bottleneck``) and the
  dropout mask: memory is linear in depth. BatchNorm+ReLU runs on cnnkernels' batch_norm_act
  kernels: each channel's batch statistics are computed once, when the channel is written (they are
  the same in every later layer), the folded scale and shift are saved, and backward recomputes
  BN+ReLU from them with the forward's kernel (bit-identical) and goes back through it in two
  passes, ReLU's derivative recomputed from the input. Running statistics are updated exactly once,
  in forward. On the CPU the block computes in channels_last whatever its input's layout (see
  _works_in_channels_last) and hands its output back in the input's, unless convert() linked it
  with the DenseTransitions around it (link_channels_last_hand_offs): inside such a run outputs
  are passed on in channels_last, and the run's last module gives back the run's input layout.

All three compute the same outputs, gradients and running statistics, to float rounding ("shared"
normalises with cnnkernels' kernels, the others with ATen's). Parameter names (and hence
state_dict keys) are torchvision's: ``denselayer{i}.norm1/conv1/norm2/conv2``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import _extension, activations
from .batchnorm import BatchNormAct2d
from ..ops.layout import contiguous_from_channels_last, copy_to_channels_last_, to_channels_last
from .conv import has_hooks
from .pool import pools_faster_in_channels_last

MEMORY_MODES = ("naive", "checkpoint", "shared")


def check_memory_mode(memory: str) -> str:
    if memory not in MEMORY_MODES:
        raise ValueError(f"cnnkernels: memory must be one of {', '.join(MEMORY_MODES)}; got {memory!r}")
    return memory


class DenseLayer(nn.Module):
    """One DenseNet-B layer: BN-ReLU-conv1×1 (to bn_size·k channels), BN-ReLU-conv3×3 (to k).

    Called with a list of feature maps (or one tensor), it returns its k new channels, computed
    from their concatenation. Stand-alone it runs ``"naive"`` (or ``"checkpoint"``); the shared
    storage of ``"shared"`` is a property of the block that owns the layer."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int = 4, drop_rate: float = 0.0,
                 memory: str = "naive") -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("growth_rate", growth_rate),
                            ("bn_size", bn_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"cnnkernels: DenseLayer {name} must be a positive int, got {value!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"cnnkernels: DenseLayer drop_rate must be in [0, 1), got {drop_rate!r}")
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1,
                               bias=False)
        self.drop_rate = float(drop_rate)
        self.memory = check_memory_mode(memory)

    def bottleneck(self, features: Sequence[Tensor]) -> Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(list(features), 1))))

    def checkpointed_bottleneck(self, features: Sequence[Tensor]) -> Tensor:
        norm = self.norm1
        calls = [0]

        def run(*inputs: Tensor) -> Tensor:
            calls[0] += 1
            concat = torch.cat(inputs, 1)
            if calls[0] > 1 and norm.training:
                # The recomputation in backward: the same batch statistics (same input, same
                # kernel), but the running statistics must not move a second time. Momentum 0
                # leaves them bit for bit (running·1 + batch·0); passing them keeps the saved
                # tensors the same as in forward, which checkpoint verifies.
                normed = F.batch_norm(concat, norm.running_mean, norm.running_var, norm.weight,
                                      norm.bias, True, 0.0, norm.eps)
            else:
                normed = norm(concat)
            return self.conv1(self.relu1(normed))

        return checkpoint(run, *features, use_reentrant=False)

    def forward(self, features: Tensor | Sequence[Tensor]) -> Tensor:
        if isinstance(features, Tensor):
            features = [features]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in features)
        if self.memory == "checkpoint" and needs_grad:
            bottleneck = self.checkpointed_bottleneck(features)
        else:
            bottleneck = self.bottleneck(features)
        new = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0 and self.training:
            new, _ = dropout_with_mask(new, self.drop_rate)
        return new


def dropout_with_mask(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """Training dropout that also returns its keep-mask, drawing the same random numbers as
    F.dropout on the same device, so every memory mode gets the same masks from the same seed."""
    if x.is_cuda:  # ATen's fused CUDA dropout
        return torch.ops.aten.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p)  # ATen's CPU dropout, step by step
    mask = noise.bool()
    noise.div_(1 - p)
    return x * noise, mask


def _dropout_scale(mask: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    return mask.to(dtype).div_(1 - p)


def _momentum_and_count(norm: nn.BatchNorm2d) -> float:
    """What nn.BatchNorm2d.forward does to its buffers before normalising a training batch."""
    if norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            return 1.0 / float(norm.num_batches_tracked)
    return 0.0 if norm.momentum is None else float(norm.momentum)


def _scratch(storage: Tensor, like_shape: Sequence[int], channels_last: bool) -> Tensor:
    """A dense [N, C, H, W] view at the start of a flat shared storage."""
    n, c, h, w = like_shape
    numel = n * c * h * w
    if channels_last:
        return storage[:numel].as_strided((n, c, h, w), (h * w * c, 1, w * c, c))
    return storage[:numel].view(n, c, h, w)


def is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _format_of(x: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def _in_format(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """x in `memory_format` (itself when it already is), through our CPU transposing copies
    (ops.layout: faster than ATen's generic strided copy both ways)."""
    if memory_format == torch.contiguous_format:
        return contiguous_from_channels_last(x)
    return to_channels_last(x)


class _HandOffChain:
    """What the modules of one linked run share (see link_channels_last_hand_offs): the layout the
    run's first module was given, which its last module gives back."""

    __slots__ = ("input_format",)

    def __init__(self) -> None:
        self.input_format: torch.memory_format | None = None


def _note_chain_input(module: nn.Module, x: Tensor) -> None:
    """At the start of a linked run, remember the layout its first module is given."""
    if getattr(module, "hand_off_role", None) == "first":
        module.hand_off_chain.input_format = _format_of(x)


def _output_format(module: nn.Module, x: Tensor, computed_channels_last: bool
                   ) -> torch.memory_format:
    """The layout a block or transition hands its output on in. Unlinked: x's. Inside a linked run
    (not its last module) channels_last when the output was computed in it anyway: the next
    module reads it in place, and two layout copies are saved. The run's last module gives back
    the layout the run was given, so nothing outside the run sees a different layout."""
    role = getattr(module, "hand_off_role", None)
    if role in ("first", "middle") and computed_channels_last:
        return torch.channels_last
    if role == "last" and module.hand_off_chain.input_format is not None:
        return module.hand_off_chain.input_format
    return _format_of(x)


def _hands_off_to(first: nn.Module, second: nn.Module | None) -> bool:
    return (isinstance(first, DenseBlock) and isinstance(second, DenseTransition)) or \
        (isinstance(first, DenseTransition) and isinstance(second, DenseBlock))


def link_channels_last_hand_offs(root: nn.Module) -> None:
    """Links each run of alternating DenseBlocks and DenseTransitions that follow each other in an
    nn.Sequential (DenseNet's features: block, transition, block, ...): inside the run they pass
    their outputs on in channels_last, where the CPU computes both, and the run's last module gives
    back the layout the run was given. The values are the same; only the tensors passed inside the
    run change layout. Only plain nn.Sequentials and BNActSequentials (their children run in
    order); earlier links under root are cleared."""
    for module in root.modules():
        if isinstance(module, (DenseBlock, DenseTransition)):
            module.hand_off_role, module.hand_off_chain = None, None
    from .sequential import BNActSequential

    for module in root.modules():
        if type(module) not in (nn.Sequential, BNActSequential):
            continue
        run: list[nn.Module] = []
        for child in [*module.children(), None]:
            if run and _hands_off_to(run[-1], child):
                run.append(child)
                continue
            if len(run) >= 2:
                _link(run)
            run = [child] if isinstance(child, (DenseBlock, DenseTransition)) else []


def _link(run: Sequence[nn.Module]) -> None:
    chain = _HandOffChain()
    for index, module in enumerate(run):
        module.hand_off_chain = chain
        module.hand_off_role = "first" if index == 0 else "last" if index == len(run) - 1 \
            else "middle"


def _copy_in_format(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """A new tensor in `memory_format` with x's values (never x itself)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format)
    if memory_format == torch.channels_last:
        return copy_to_channels_last_(out, x)
    return out.copy_(x)


def _works_in_channels_last(x: Tensor) -> bool:
    """Whether a block computes in channels_last whatever x's layout. On the CPU, yes: oneDNN's
    NCHW convolutions reorder their operands to blocked layouts on every call, and their backward
    on large planes runs at a fraction of the channels_last speed. The block's output goes back
    to x's layout, one copy per block instead of layer after layer."""
    return x.device.type == "cpu" or is_channels_last(x)


class _BlockPlan:
    """Shapes and scratch storages of one pass over a block."""

    def __init__(self, block: "DenseBlock", like: Tensor, batch: int, height: int, width: int,
                 channels_last: bool) -> None:
        self.n, self.c0, self.h, self.w = batch, block.in_channels, height, width
        self.k = block.growth_rate
        self.num_layers = block.num_layers
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.widest_input = self.c0 + (self.num_layers - 1) * self.k
        bottleneck = block.bn_size * self.k
        self.concat_storage: Tensor | None = None  # off the CPU, in backward (see _layer_input)
        self.norm1_storage = like.new_empty(self.n * self.widest_input * self.h * self.w)
        self.norm2_storage = like.new_empty(self.n * bottleneck * self.h * self.w)

    def layer_input_channels(self, index: int) -> int:
        return self.c0 + index * self.k

    def concat(self, out: Tensor, index: int) -> Tensor:
        """Layer `index`'s input, copied from the block output into the shared concat storage
        (backward: its BatchNorm kernels read a dense input)."""
        if self.concat_storage is None:
            self.concat_storage = out.new_empty(self.n * self.widest_input * self.h * self.w)
        channels = self.layer_input_channels(index)
        view = _scratch(self.concat_storage, (self.n, channels, self.h, self.w), self.channels_last)
        return view.copy_(out[:, :channels])

    def norm1_output(self, like: Tensor) -> Tensor:
        return _scratch(self.norm1_storage, like.shape, self.channels_last)

    def norm2_output(self, like: Tensor) -> Tensor:
        return _scratch(self.norm2_storage, like.shape, self.channels_last)


def _bn_kernels(x: Tensor):
    """batch_norm_act's kernels (statistics, fold, backward passes) for x's device and backend."""
    from ..ops.batch_norm_act import _kernels

    return _kernels(x)


def _fold_batch(kernels, norm: nn.BatchNorm2d, mean: Tensor, var: Tensor, weight: Tensor | None,
                bias: Tensor | None, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """(scale, shift, invstd) of `norm` in training mode for a batch with these statistics, and
    its running statistics moved once, as nn.BatchNorm2d.forward moves them."""
    if norm.track_running_stats and norm.running_mean is not None:
        momentum = _momentum_and_count(norm)
        return kernels.fold(mean, var, weight, bias, norm.running_mean, norm.running_var,
                            momentum, norm.eps, count)
    return kernels.fold(mean, var, weight, bias, None, None, 0.0, norm.eps, count)


def _relu_affine_into(out: Tensor, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """relu(x·scale + shift) per channel, written into `out`: BatchNorm+ReLU with folded batch
    statistics, one pass (the same kernel and the same scale/shift in forward and in backward's
    recomputation, so the two agree to the bit)."""
    from ..ops.affine_act import affine_act

    return affine_act(x, scale, shift, "relu", out=out)


_RELU = activations.CODES["relu"]


def _bn_relu_backward(kernels, grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                      scale: Tensor, shift: Tensor, count: int, param_dtype: torch.dtype,
                      add_to: Tensor | None = None) -> tuple[Tensor | None, Tensor, Tensor]:
    """Gradients of relu(batch_norm(x)) (training statistics) given the gradient of its output:
    (grad of x, of the BN weight, of the BN bias). ReLU's derivative is recomputed from x, so the
    BN+ReLU output is not needed: one reduction pass and one elementwise pass (batch_norm_act's).
    With `add_to`, x's gradient is added into it instead (and None returned). (On the CPU the
    block's BN1 takes _DeferredCorrections' single pass instead.)"""
    sum_dz, sum_dz_xmu = kernels.backward_reduce(grad, x, scale, shift, mean, None, _RELU, 0.01)
    dz_xhat, coef_xmu, coef_1 = kernels.backward_coefs(sum_dz, sum_dz_xmu, scale, invstd, count)
    param_grads = dz_xhat.to(param_dtype), sum_dz.to(param_dtype)
    grad_x, _ = kernels.backward_elemt(grad, x, scale, shift, mean, scale, coef_xmu, coef_1, None,
                                       _RELU, 0.01, False)
    if add_to is not None:
        add_to += grad_x
        return (None, *param_grads)
    return (grad_x, *param_grads)


def _adds_in_place(kernels, x: Tensor, target: Tensor) -> bool:
    """Whether batch_norm_act_backward_reduce_add_ (CPU, channels_last rows) can add scale·dz,
    the first term of x's gradient, into `target`."""
    from ..ops.batch_norm_act import _strided_rows

    return x.device.type == "cpu" and _extension.cpu_ext and \
        kernels.backward_elemt is torch.ops.cnnkernels.batch_norm_act_backward_elemt.default and \
        all(_strided_rows(t) or is_channels_last(t) for t in (x, target))


def _conv_backward(grad: Tensor, x: Tensor, weight: Tensor, padding: int) -> tuple[Tensor, Tensor]:
    """(grad of x, grad of weight) of a stride-1, bias-free F.conv2d(x, weight, padding=padding)."""
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
        [True, True, False])
    return grad_x, grad_weight


def _layer_input(plan: _BlockPlan, out: Tensor, index: int) -> Tensor:
    """Layer `index`'s input for backward: on the CPU the channel slice of the block's
    channels_last output, which batch_norm_act's CPU kernels read in place; elsewhere a dense copy
    in the concat scratch storage."""
    if out.device.type == "cpu" and plan.channels_last:
        return out[:, :plan.layer_input_channels(index)]
    return plan.concat(out, index)


def _layer_params(layer: DenseLayer) -> list[Tensor]:
    return [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight,
            layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]


_PARAMS_PER_LAYER = 6
_STATS_PER_LAYER = 8  # (mean, invstd, scale, shift) of norm1, then of norm2


def _forward_shared(block: "DenseBlock", x: Tensor, params: Sequence[Tensor], save: bool
                    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """The block's forward into one preallocated output; returns it and what backward needs
    besides it: the bottlenecks (when `save` and the block does not recompute them), the dropout
    masks, and each BatchNorm's batch mean, inverse std and folded scale and shift. Runs without
    autograd.

    A channel's batch statistics are the same in every layer that normalises it (the same values
    of the same batch), so each is computed once, when its channels are written (the block input
    first, then each layer's new channels): norm1 of layer l reads them instead of a statistics
    pass over its whole input, which is the square of depth in all."""
    plan = _BlockPlan(block, x, x.shape[0], x.shape[2], x.shape[3], _works_in_channels_last(x))
    out = torch.empty((plan.n, plan.c0 + plan.num_layers * plan.k, plan.h, plan.w), dtype=x.dtype,
                      device=x.device, memory_format=plan.memory_format)
    if plan.channels_last:
        copy_to_channels_last_(out[:, :plan.c0], x)
    else:
        out[:, :plan.c0].copy_(x)
    kernels = _bn_kernels(x)
    count = plan.n * plan.h * plan.w
    input_mean, input_var = kernels.stats(x)
    means, variances = [input_mean], [input_var]  # per chunk of channels of `out`
    bottlenecks: list[Tensor] = []
    masks: list[Tensor] = []
    stats: list[Tensor] = []
    for index, layer in enumerate(block.layers):
        w1, b1, conv1, w2, b2, conv2 = params[index * _PARAMS_PER_LAYER:(index + 1) * _PARAMS_PER_LAYER]
        channels = plan.layer_input_channels(index)
        concat = out[:, :channels]  # read in place: no copy
        mean1, var1 = torch.cat(means), torch.cat(variances)
        scale1, shift1, invstd1 = _fold_batch(kernels, layer.norm1, mean1, var1, w1, b1, count)
        normed1 = _relu_affine_into(plan.norm1_output(concat), concat, scale1, shift1)
        bottleneck = F.conv2d(normed1, conv1)
        mean2, var2 = kernels.stats(bottleneck)
        scale2, shift2, invstd2 = _fold_batch(kernels, layer.norm2, mean2, var2, w2, b2, count)
        normed2 = _relu_affine_into(plan.norm2_output(bottleneck), bottleneck, scale2, shift2)
        new = F.conv2d(normed2, conv2, padding=1)
        if layer.drop_rate > 0:  # in x's layout: the same random numbers as the other modes
            new, mask = dropout_with_mask(new.contiguous(memory_format=_format_of(x)),
                                          layer.drop_rate)
            masks.append(mask)
        out[:, channels:channels + plan.k].copy_(new)
        if index + 1 < plan.num_layers:
            new_mean, new_var = kernels.stats(new)
            means.append(new_mean)
            variances.append(new_var)
        stats += [mean1, invstd1, scale1, shift1, mean2, invstd2, scale2, shift2]
        if save and not block.recompute_bottleneck:
            bottlenecks.append(bottleneck)
    return _in_format(out, _output_format(block, x, plan.channels_last)), bottlenecks, masks, stats


def _backward_shared(block: "DenseBlock", out: Tensor, grad_out: Tensor, input_format,
                     params: Sequence[Tensor], bottlenecks: Sequence[Tensor],
                     masks: Sequence[Tensor], stats: Sequence[Tensor]
                     ) -> tuple[Tensor, list[Tensor]]:
    """Gradients of the block input (in `input_format`, the input's layout) and of every
    parameter, last layer first, recomputing the overwritten concatenation and BN+ReLU outputs
    (and the bottleneck, unless it was saved)."""
    plan = _BlockPlan(block, out, out.shape[0], out.shape[2], out.shape[3],
                      _works_in_channels_last(out))
    out = _in_format(out, plan.memory_format)
    grad = _copy_in_format(grad_out, plan.memory_format)  # accumulates every layer's input gradient
    kernels = _bn_kernels(out)
    count = plan.n * plan.h * plan.w
    param_grads: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    mask_iter = iter(reversed(masks))
    deferred = _DeferredCorrections.of(kernels, plan, out, grad, stats)
    for index in reversed(range(block.num_layers)):
        layer = block.layers[index]
        w1, b1, conv1, w2, b2, conv2 = params[index * _PARAMS_PER_LAYER:(index + 1) * _PARAMS_PER_LAYER]
        channels = plan.layer_input_channels(index)
        if deferred is not None:  # every later layer has added its share to these channels
            deferred.apply(channels, channels + plan.k)
        grad_new = grad[:, channels:channels + plan.k]
        if layer.drop_rate > 0:
            grad_new = grad_new * _dropout_scale(next(mask_iter), layer.drop_rate, grad.dtype)
        # Recompute the layer's overwritten tensors from its input and the saved statistics.
        mean1, invstd1, scale1, shift1, mean2, invstd2, scale2, shift2 = \
            stats[_STATS_PER_LAYER * index:_STATS_PER_LAYER * (index + 1)]
        concat = _layer_input(plan, out, index)
        normed1 = _relu_affine_into(plan.norm1_output(concat), concat, scale1, shift1)
        bottleneck = F.conv2d(normed1, conv1) if block.recompute_bottleneck else bottlenecks[index]
        normed2 = _relu_affine_into(plan.norm2_output(bottleneck), bottleneck, scale2, shift2)
        # Then back through it: conv2, BN2+ReLU, conv1, BN1+ReLU.
        grad_normed2, grad_conv2 = _conv_backward(grad_new, normed2, conv2, padding=1)
        del grad_new
        grad_bottleneck, grad_w2, grad_b2 = _bn_relu_backward(
            kernels, grad_normed2, bottleneck, mean2, invstd2, scale2, shift2, count, w2.dtype)
        del grad_normed2, bottleneck
        grad_normed1, grad_conv1 = _conv_backward(grad_bottleneck, normed1, conv1, padding=0)
        del grad_bottleneck
        if deferred is not None:
            grad_w1, grad_b1 = deferred.bn_relu_backward(grad_normed1, concat, mean1, invstd1,
                                                         scale1, shift1, count, w1.dtype)
        else:
            _, grad_w1, grad_b1 = _bn_relu_backward(
                kernels, grad_normed1, concat, mean1, invstd1, scale1, shift1, count, w1.dtype,
                add_to=grad[:, :channels])
        del grad_normed1
        param_grads[index * _PARAMS_PER_LAYER:(index + 1) * _PARAMS_PER_LAYER] = [
            grad_w1, grad_b1, grad_conv1, grad_w2, grad_b2, grad_conv2]
    if deferred is not None:
        deferred.apply(0, plan.c0)
    return _in_format(grad[:, :plan.c0], input_format), param_grads


class _DeferredCorrections:
    """The block's BN1 input gradients with one pass per layer instead of two (CPU, channels_last).

    Layer l's BN1+ReLU gives its input, channel c, dx = scale_lc·dz + k_xmu_lc·(x_c − mean_c) +
    k_1_lc, where k_xmu and k_1 need the layer's per-channel sums of dz and dz·(x − mean). x_c and
    mean_c are the same in every layer that reads channel c (the same values, statistics computed
    once), so the sum over layers is Σ scale·dz + (Σ k_xmu)·(x_c − mean_c) + Σ k_1. Per layer,
    batch_norm_act_backward_reduce_add_ computes the sums and adds scale·dz into the block's
    gradient in one read of x and dz; the two per-channel sums of coefficients are accumulated
    here, and applied once per channel (one pass over that channel) when no layer is left to add
    to it: before the layer that wrote it reads its gradient, and for the block input at the end.
    Per layer, one pass over the layer's whole input (the elementwise one) is gone; the corrections
    cost one pass per channel in all."""

    def __init__(self, kernels, plan, out, grad, stats):
        self.kernels, self.plan, self.out, self.grad, self.stats = kernels, plan, out, grad, stats
        compute = stats[0].dtype
        channels = out.shape[1]
        self.k_xmu = torch.zeros(channels, dtype=compute, device=out.device)
        self.k_1 = torch.zeros(channels, dtype=compute, device=out.device)

    @classmethod
    def of(cls, kernels, plan, out, grad, stats) -> "_DeferredCorrections | None":
        """The corrections, where the CPU kernel can run on this block (else None)."""
        if plan.num_layers == 0:
            return None
        widest = plan.layer_input_channels(plan.num_layers - 1)  # the last layer's input
        if not _adds_in_place(kernels, out[:, :widest], grad[:, :widest]):
            return None
        return cls(kernels, plan, out, grad, stats)

    def bn_relu_backward(self, grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                         scale: Tensor, shift: Tensor, count: int, param_dtype: torch.dtype
                         ) -> tuple[Tensor, Tensor]:
        """Adds scale·dz into the block's gradient and accumulates the layer's coefficients;
        returns the BN weight's and bias's gradients."""
        channels = x.shape[1]
        sum_dz, sum_dz_xmu = torch.ops.cnnkernels.batch_norm_act_backward_reduce_add_(
            self.grad[:, :channels], grad, x, scale, shift, mean, scale, _RELU, 0.01)
        dz_xhat, coef_xmu, coef_1 = self.kernels.backward_coefs(sum_dz, sum_dz_xmu, scale, invstd,
                                                                count)
        self.k_xmu[:channels] += coef_xmu
        self.k_1[:channels] += coef_1
        return dz_xhat.to(param_dtype), sum_dz.to(param_dtype)

    def apply(self, start: int, stop: int) -> None:
        """grad[:, start:stop] += k_xmu·(x − mean) + k_1, for channels no later layer reads."""
        first_reader = self._first_reader(stop)
        if first_reader is None:  # the last layer's channels: no layer reads them
            return
        mean = self.stats[_STATS_PER_LAYER * first_reader][start:stop]  # its norm1's batch mean
        k_xmu, k_1 = self.k_xmu[start:stop], self.k_1[start:stop]
        target = self.grad[:, start:stop]
        from ..ops.affine_act import affine_act

        affine_act(self.out[:, start:stop], k_xmu, torch.addcmul(k_1, k_xmu, mean, value=-1),
                   "identity", residual=target, out=target)

    def _first_reader(self, stop: int) -> int | None:
        """The first layer whose input ends at channel `stop` (the block input's c0, or a layer's
        last new channel): layer i reads c0 + i·k channels. None past the last layer."""
        index = (stop - self.plan.c0) // self.plan.k
        return index if index < self.plan.num_layers else None


class _SharedDenseBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block: "DenseBlock", x: Tensor, *params: Tensor) -> Tensor:  # type: ignore[override]
        out, bottlenecks, masks, stats = _forward_shared(block, x, params, save=True)
        ctx.block = block
        ctx.input_format = _format_of(x)
        ctx.counts = (len(params), len(bottlenecks), len(masks), len(stats))
        ctx.save_for_backward(out, *params, *bottlenecks, *masks, *stats)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: our backward kernels have no autograd
            raise RuntimeError(
                "cnnkernels.nn.DenseBlock(memory='shared'): double backward (create_graph=True, "
                "e.g. a gradient penalty) is not supported; build the block with "
                "memory='naive' or memory='checkpoint' for it")
        out, *rest = ctx.saved_tensors
        groups = []
        for count in ctx.counts:  # params, bottlenecks, masks, stats
            groups.append(rest[:count])
            rest = rest[count:]
        grad_x, param_grads = _backward_shared(ctx.block, out, grad_out, ctx.input_format, *groups)
        return (None, grad_x, *param_grads)


class DenseBlock(nn.Module):
    """A dense block: ``num_layers`` DenseLayers, output = input ⧺ every layer's k new channels.

    ``memory`` picks how the concatenations are stored (see the module docstring). In shared mode,
    ``recompute_bottleneck=True`` also recomputes each layer's 1×1 conv output in backward instead of
    keeping it (DenseNet-BC-100 on CPU: 0.19x instead of 0.29x the naive peak memory, for one more
    1×1 conv per layer). Children are named ``denselayer1…denselayerL`` like torchvision's
    ``_DenseBlock``, so state_dicts are interchangeable."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int = 4,
                 drop_rate: float = 0.0, memory: str = "shared", recompute_bottleneck: bool = True
                 ) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"cnnkernels: DenseBlock num_layers must be a positive int, got {num_layers!r}")
        self.num_layers = num_layers
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.bn_size = bn_size
        self.memory = check_memory_mode(memory)
        self.recompute_bottleneck = bool(recompute_bottleneck)
        self.hand_off_role = self.hand_off_chain = None  # set by convert(): link_channels_last_hand_offs
        for index in range(num_layers):
            layer = DenseLayer(in_channels + index * growth_rate, growth_rate, bn_size, drop_rate,
                               memory="checkpoint" if memory == "checkpoint" else "naive")
            self.add_module(f"denselayer{index + 1}", layer)

    @property
    def layers(self) -> list[DenseLayer]:
        return list(self.children())  # type: ignore[return-value]

    @property
    def out_channels(self) -> int:
        return self.in_channels + self.num_layers * self.growth_rate

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, in_channels={self.in_channels}, "
                f"growth_rate={self.growth_rate}, memory={self.memory!r}")

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError("cnnkernels: DenseBlock expects a 4-D [N, C, H, W] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"cnnkernels: DenseBlock expects {self.in_channels} input channels, "
                             f"got {x.shape[1]}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        _note_chain_input(self, x)
        if self.memory != "shared" or not self._layers_as_built() or \
                (self.training and torch.compiler.is_compiling()):
            # torch.compile traces the layers as plain ops (and plans their memory itself): the
            # shared path's autograd.Function holds the block, which Dynamo cannot trace
            return self._forward_naive(x)
        params = [p for layer in self.layers for p in _layer_params(layer)]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if not self.training:
            if needs_grad:  # gradients in eval mode (rare): autograd through the plain layers
                return self._forward_naive(x)
            return self._forward_eval(x)
        F._verify_batch_size(x.size())  # the error nn.BatchNorm2d raises for one value per channel
        kind = x.device.type
        if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
            # as autocast runs F.conv2d: x and the conv weights in its dtype (the casts are
            # autograd ops, so the float32 weights get float32 gradients), the BatchNorms' own
            # parameters as they are; then the block without autocast, whose backward would
            # otherwise meet bf16 activations and float32 weights
            dtype = torch.get_autocast_dtype(kind)
            x = x.to(dtype)
            params = [p.to(dtype) if p.dim() == 4 else p for p in params]  # the conv weights
            with torch.autocast(kind, enabled=False):
                return self._forward_shared_training(x, params, needs_grad)
        return self._forward_shared_training(x, params, needs_grad)

    def _layers_as_built(self) -> bool:
        """Whether every layer is still what the shared path computes, in the block's mode (a
        BatchNorm frozen after convert, a swapped activation, a hook: the layers then run one by
        one, as they are)."""
        if any(has_hooks(m) for m in self.modules() if m is not self):
            return False
        if any(m.training != self.training for m in self.modules()):
            return False
        for index, layer in enumerate(self.children()):
            if type(layer) is not DenseLayer or type(layer.relu1) is not nn.ReLU or \
                    type(layer.relu2) is not nn.ReLU or _dense_layer_problem(
                        layer, self.in_channels + index * self.growth_rate, self.growth_rate,
                        self.bn_size, layer.drop_rate) is not None:
                return False
        return True

    def _forward_shared_training(self, x: Tensor, params: list[Tensor], needs_grad: bool) -> Tensor:
        if not needs_grad:  # e.g. recalibrating BN statistics: update them, save nothing
            with torch.no_grad():
                return _forward_shared(self, x, params, save=False)[0]
        return _SharedDenseBlock.apply(self, x, *params)

    def _forward_naive(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        out = torch.cat(features, 1)
        return out.contiguous(memory_format=_output_format(self, x, is_channels_last(out)))

    def _forward_eval(self, x: Tensor) -> Tensor:
        """Inference: each layer writes its new channels into the preallocated output."""
        n, c0, h, w = x.shape
        memory_format = torch.channels_last if _works_in_channels_last(x) else torch.contiguous_format
        out = torch.empty((n, self.out_channels, h, w), dtype=x.dtype, device=x.device,
                          memory_format=memory_format)
        out[:, :c0].copy_(x)
        for index, layer in enumerate(self.layers):
            channels = c0 + index * self.growth_rate
            out[:, channels:channels + self.growth_rate].copy_(layer([out[:, :channels]]))
        output_format = _output_format(self, x, memory_format == torch.channels_last)
        return out.contiguous(memory_format=output_format)


def _is_torchvision_dense_block(module: nn.Module) -> bool:
    return type(module).__name__ == "_DenseBlock" and type(module).__module__.startswith(
        "torchvision.models.densenet")


def is_timm_dense_block(module: nn.Module) -> bool:
    return type(module).__name__ == "DenseBlock" and type(module).__module__.startswith(
        "timm.models.densenet")


def dense_block_mode_problem(block: nn.Module) -> str | None:
    """Why a DenseNet block cannot run as one shared-memory block: the shared block runs all its
    layers in its own train/eval mode, so layers or BatchNorms set apart (BatchNorms frozen for
    fine-tuning in a training model) would silently train again."""
    if any(m.training != block.training for m in block.modules()):
        return "its layers are not all in the block's train/eval mode (frozen BatchNorms?)"
    return None


def _dense_layer_problem(layer: nn.Module, in_channels: int, growth_rate: int,
                         bn_size: int, drop_rate: float) -> str | None:
    """Why one layer of a DenseNet block is not BN → ReLU → conv1×1 → BN → ReLU → conv3×3 with
    the block's shapes, as the shared path computes it (None if it is)."""
    for name in ("norm1", "norm2"):
        norm = getattr(layer, name, None)
        if not isinstance(norm, nn.BatchNorm2d) or type(norm).__name__ not in (
                "BatchNorm2d", "BatchNormAct2d"):
            return f"its {name} is {type(norm).__name__}, not a BatchNorm2d"
        if not norm.affine or not norm.track_running_stats:
            return f"its {name} has affine=False or track_running_stats=False"
        if not norm.eps > 0:
            return f"its {name} has eps={norm.eps} (not positive)"
    for name in ("relu1", "relu2"):
        if name in layer._modules and type(layer._modules[name]) is not nn.ReLU:
            return f"its {name} is {type(layer._modules[name]).__name__}, not nn.ReLU"
    for name, kernel, padding, channels in (("conv1", 1, 0, in_channels),
                                            ("conv2", 3, 1, bn_size * growth_rate)):
        conv = getattr(layer, name, None)
        if type(conv) is not nn.Conv2d or conv.kernel_size != (kernel, kernel) or \
                conv.stride != (1, 1) or conv.padding != (padding, padding) or \
                conv.dilation != (1, 1) or conv.groups != 1 or conv.bias is not None or \
                conv.padding_mode != "zeros" or conv.in_channels != channels:
            return f"its {name} is not a plain {kernel}x{kernel} convolution without bias"
    if layer.conv2.out_channels != growth_rate or layer.norm1.num_features != in_channels:
        return "its channels do not grow by the block's growth rate"
    if float(getattr(layer, "drop_rate", 0.0)) != drop_rate:
        return "its layers have different drop rates"
    return None


def dense_block_layers_problem(block: nn.Module) -> str | None:
    """Why a DenseNet block's layers are not what the shared block computes (None if they are):
    a swapped activation, a conv with a bias or another shape, a BatchNorm without affine
    parameters or running statistics, hooks inside, or a forward of its own."""
    layers = list(block.children())
    if not layers or not all(hasattr(layer, "conv2") and hasattr(layer, "conv1")
                             for layer in layers):
        return "its children are not DenseNet layers"
    first = layers[0]
    growth_rate = first.conv2.out_channels
    bn_size, remainder = divmod(first.conv1.out_channels, growth_rate)
    if remainder:
        return "its bottleneck width is not a multiple of the growth rate"
    in_channels = first.norm1.num_features if hasattr(first, "norm1") else 0
    drop_rate = float(getattr(first, "drop_rate", 0.0))
    for index, layer in enumerate(layers):
        problem = _dense_layer_problem(layer, in_channels + index * growth_rate, growth_rate,
                                       bn_size, drop_rate)
        if problem:
            return f"denselayer{index + 1}: {problem}"
        if any(has_hooks(m) for m in layer.modules()):
            return f"denselayer{index + 1} has hooks"
    return None


def timm_dense_block_problem(block: nn.Module) -> str | None:
    """Why a timm DenseBlock is not torchvision's in disguise (None if it is): its layers' norms
    must be BatchNorm + ReLU with no drop layer, and no gradient checkpointing of its own."""
    for layer in block.children():
        if getattr(layer, "grad_checkpointing", False):
            return "its layers use gradient checkpointing (memory='shared' replaces it; turn it off)"
        for name in ("norm1", "norm2"):
            norm = getattr(layer, name, None)
            if not isinstance(norm, nn.BatchNorm2d):
                return f"{name} is {type(norm).__name__}, not a BatchNorm"
            if type(getattr(norm, "act", None)) is not nn.ReLU:
                return f"{name}'s activation is {type(getattr(norm, 'act', None)).__name__}, not ReLU"
            if type(getattr(norm, "drop", nn.Identity())) is not nn.Identity:
                return f"{name} has a drop layer"
    return None


def dense_block_from(block: nn.Module, memory: str = "shared",
                     recompute_bottleneck: bool = False) -> DenseBlock:
    """Ours, holding copies of the parameters and buffers of a torchvision ``_DenseBlock``, a timm
    ``DenseBlock`` (see timm_dense_block_problem) or another DenseBlock, with the same state_dict
    keys, mode, device and dtype. The bottlenecks are kept by default (what convert() builds): one
    1x1 conv less per layer in backward for 4k channels per layer of memory, still linear in
    depth."""
    layers = list(block.children())
    if not layers or not all(hasattr(layer, name) for layer in layers
                             for name in ("norm1", "conv1", "norm2", "conv2")):
        raise TypeError(f"cnnkernels: expected a DenseNet block of layers with norm1/conv1/norm2/"
                        f"conv2, got {type(block).__name__}")
    first = layers[0]
    growth_rate = first.conv2.out_channels
    ours = DenseBlock(len(layers), first.norm1.num_features, growth_rate,
                      first.conv1.out_channels // growth_rate, float(getattr(first, "drop_rate", 0.0)),
                      memory=memory, recompute_bottleneck=recompute_bottleneck)
    for layer, source in zip(ours.layers, layers):
        for norm, source_norm in ((layer.norm1, source.norm1), (layer.norm2, source.norm2)):
            norm.eps, norm.momentum = source_norm.eps, source_norm.momentum
    parameter = first.conv1.weight
    ours.to(device=parameter.device, dtype=parameter.dtype)  # first: the block may be on meta
    ours.load_state_dict(block.state_dict())
    return ours.train(block.training)


def dense_block_to_torchvision(block: DenseBlock) -> nn.Module:
    """torchvision's ``_DenseBlock`` with our parameters (for export)."""
    from torchvision.models.densenet import _DenseBlock

    first = block.layers[0]
    theirs = _DenseBlock(block.num_layers, block.in_channels, block.bn_size, block.growth_rate,
                         first.drop_rate)
    theirs.load_state_dict(block.state_dict())
    parameter = first.conv1.weight
    return theirs.to(device=parameter.device, dtype=parameter.dtype).train(block.training)


class DenseTransition(nn.Module):
    """DenseNet's transition between blocks, BN → ReLU → conv1×1 → 2×2 average pool, with the keys
    of torchvision's ``_Transition`` (``norm.*``, ``conv.*``; the ReLU and the pool hold nothing).

    The pool runs before the conv: a 1×1 convolution acts on each pixel alone and an average pool
    is a linear map of pixels, so the two commute (exactly in real arithmetic; to float rounding
    here), and pooling first leaves the conv a quarter of the pixels. BN+ReLU is one
    BatchNormAct2d."""

    def __init__(self, in_channels: int, out_channels: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm = BatchNormAct2d(in_channels, activation="relu", **factory)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False, **factory)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.hand_off_role = self.hand_off_chain = None  # set by convert(): link_channels_last_hand_offs

    @classmethod
    def from_transition(cls, transition: nn.Module) -> "DenseTransition":
        """Ours holding copies of a transition's parameters and buffers (see transition_problem)."""
        problem = transition_problem(transition)
        if problem:
            raise ValueError(f"cnnkernels: DenseTransition.from_transition: {problem}")
        norm = BatchNormAct2d.from_modules(transition.norm, transition.relu)
        ours = cls.from_parts(norm, transition.conv)
        ours.training = transition.training  # not .train(): its BatchNorm keeps its own mode
        return ours

    @classmethod
    def from_parts(cls, norm: BatchNormAct2d, conv: nn.Conv2d) -> "DenseTransition":
        """Ours from its fused BN+ReLU (kept) and a copy of the plain 1x1 conv (for timm's
        transition, whose norm is timm's own BatchNormAct2d: cnnkernels.convert fuses it first)."""
        if norm.activation != "relu":
            raise ValueError(f"cnnkernels: DenseTransition needs BN → ReLU, got {norm.activation!r}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.norm = norm
        module.conv = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None,
                                device=conv.weight.device, dtype=conv.weight.dtype)
        module.conv.load_state_dict(conv.state_dict())
        module.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        module.training = norm.training
        return module

    def forward(self, x: Tensor) -> Tensor:
        _note_chain_input(self, x)
        normed = self.norm(x)
        if pools_faster_in_channels_last(normed) and not torch.compiler.is_compiling():
            # ATen's CPU average pool (and its backward) is several times faster in channels_last
            # than in NCHW, which more than pays for the two layout copies
            pooled = self.pool(to_channels_last(normed))
            return _in_format(self.conv(pooled), _output_format(self, x, True))
        out = self.conv(self.pool(normed))
        return out.contiguous(memory_format=_output_format(self, x, is_channels_last(out)))


def is_dense_transition(module: nn.Module) -> bool:
    """torchvision's ``_Transition`` or cnnkernels.models' ``Transition``."""
    kind = type(module)
    return (kind.__name__ == "_Transition" and kind.__module__.startswith("torchvision.models")) \
        or (kind.__name__ == "Transition" and kind.__module__ == "cnnkernels.models.densenet")


def is_timm_dense_transition(module: nn.Module) -> bool:
    """timm's ``DenseTransition``: norm (timm's BatchNormAct2d), conv, pool."""
    kind = type(module)
    return kind.__name__ == "DenseTransition" and kind.__module__.startswith("timm.")


def timm_transition_problem(transition: nn.Module) -> str | None:
    """Why timm's transition is not BN+ReLU → conv1×1 → 2×2/2 average pool (None if it is): an
    anti-aliasing pool (aa_layer) does not commute with the conv. Its norm's own checks (timm's
    BatchNormAct2d: drop layer, activation) are cnnkernels.conversion's."""
    names = ("norm", "conv", "pool")
    if list(transition._modules) != list(names):
        return "its children are not norm, conv, pool"
    if type(getattr(transition.norm, "act", None)) is not nn.ReLU:
        return "its norm's activation is not ReLU"
    return _conv_and_pool_problem(transition.conv, transition.pool)


def transition_problem(transition: nn.Module) -> str | None:
    """Why a transition is not BN → ReLU → conv1×1 (stride 1, no padding) → 2×2/2 average pool
    (None if it is): only then do the pool and the conv commute."""
    parts = {name: getattr(transition, name, None) for name in ("norm", "relu", "conv", "pool")}
    if list(transition._modules) != list(parts) or any(p is None for p in parts.values()):
        return "its children are not norm, relu, conv, pool"
    norm, relu, conv, pool = parts.values()
    if type(norm) is not nn.BatchNorm2d or type(relu) is not nn.ReLU:
        return "its norm is not BatchNorm2d followed by ReLU"
    return _conv_and_pool_problem(conv, pool)


def _conv_and_pool_problem(conv: nn.Module, pool: nn.Module) -> str | None:
    if type(conv) is not nn.Conv2d or conv.kernel_size != (1, 1) or conv.stride != (1, 1) or \
            conv.padding != (0, 0) or conv.groups != 1 or conv.padding_mode != "zeros":
        return "its conv is not a plain 1x1 convolution"
    if type(pool) is not nn.AvgPool2d or pool.kernel_size not in (2, (2, 2)) or \
            pool.stride not in (2, (2, 2)) or pool.padding not in (0, (0, 0)) or pool.ceil_mode or \
            pool.divisor_override is not None:
        return "its pool is not a 2x2 average pool of stride 2"
    return None

