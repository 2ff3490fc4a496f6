"""What the host issues per call: the dispatcher ops (each at least one kernel launch on a GPU) of
our ops and layers against eager PyTorch's, counted without a GPU.

Forward: under FakeTensorMode, tensors made with device="cuda" dispatch on this CPU-only machine,
down to the ops a CUDA run would launch. Backward: the autograd engine needs a real device, so it
runs on CPU tensors, where our C++ backwards call the same ops as on CUDA. Ops that only describe
tensors (views, empty allocations, detach) launch nothing and are not counted.

These counts are what the host side of the op costs; how many kernels each CUDA op launches
inside is the CUDA source's business (csrc/cuda), checked on a GPU.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import cnnkernels
from cnnkernels import ops

pytestmark = pytest.mark.skipif(not cnnkernels.info()["cuda_ext"] or not cnnkernels.info()["cpu_ext"],
                                reason="counts the C++ ops: needs the extension built with CUDA")

_NO_LAUNCH = {"prim.device.default", "aten.detach.default", "aten.empty.memory_format",
              "aten.empty_like.default", "aten.empty_strided.default", "aten.view.default",
              "aten._unsafe_view.default", "aten.as_strided.default", "aten.t.default",
              "aten.alias.default", "aten.expand.default", "aten.unsqueeze.default",
              "aten.squeeze.dim", "aten.permute.default", "aten.lift_fresh.default"}


class _LaunchLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in _NO_LAUNCH:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _forward_ops(make_inputs, fn) -> list[str]:
    """The launching ops of fn(*inputs) on fake CUDA tensors."""
    with FakeTensorMode():
        inputs = make_inputs("cuda")
        with _LaunchLog() as log:
            fn(*inputs)
    return log.ops


def _backward_ops(make_inputs, fn) -> list[str]:
    """The launching ops of the backward of fn(*inputs), on CPU tensors."""
    inputs = make_inputs("cpu")
    y = fn(*inputs)
    grad = torch.randn_like(y)
    with _LaunchLog() as log:
        y.backward(grad)
    return log.ops


def _bn_inputs(device):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4, device=device, requires_grad=True)
    w = torch.rand(8, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    return x, w, b, torch.zeros(8, device=device), torch.ones(8, device=device)


def _ours_bn(training):
    return lambda x, w, b, rm, rv: ops.batch_norm_act(x, w, b, rm, rv, training)


def _eager_bn(training):
    return lambda x, w, b, rm, rv: F.relu(F.batch_norm(x, rm, rv, w, b, training))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_act_forward_ops(training):
    ours = _forward_ops(_bn_inputs, _ours_bn(training))
    eager = _forward_ops(_bn_inputs, _eager_bn(training))
    # eager: cudnn_batch_norm + relu. Ours: the statistics, the per-channel fold (with the running
    # statistics' update) and the elementwise pass; in eval a copy of the running mean too (the
    # backward's constant)
    assert eager == ["aten.cudnn_batch_norm.default", "aten.relu.default"]
    expected = ["cnnkernels.batch_norm_act_stats.default"] if training else ["aten.to.dtype"]
    assert ours == expected + ["cnnkernels.batch_norm_act_fold.default",
                               "cnnkernels.affine_act.default"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_act_backward_ops(training):
    ours = _backward_ops(_bn_inputs, _ours_bn(training))
    eager = _backward_ops(_bn_inputs, _eager_bn(training))
    assert eager == ["aten.threshold_backward.default", "aten.native_batch_norm_backward.default"]
    # the per-channel sums, their coefficients, then dx; eval's coefficients are zeros
    reduce, coefs, elemt = (f"cnnkernels.batch_norm_act_backward_{step}.default"
                            for step in ("reduce", "coefs", "elemt"))
    assert ours == ([reduce, coefs, elemt] if training else
                    [reduce, coefs, "aten.zeros_like.default", elemt])


def _act_inputs(device):
    torch.manual_seed(0)
    return (torch.randn(2, 8, 4, 4, device=device, requires_grad=True),)


@pytest.mark.parametrize("name", ["hardswish", "hardsigmoid"])
def test_activation_is_one_op_each_way(name):
    ours, eager = getattr(ops, name), getattr(F, name)
    assert _forward_ops(_act_inputs, ours) == [f"cnnkernels.{name}.default"]
    assert _forward_ops(_act_inputs, eager) == [f"aten.{name}.default"]
    assert _backward_ops(_act_inputs, ours) == [f"cnnkernels.{name}_backward.default"]
    assert _backward_ops(_act_inputs, eager) == [f"aten.{name}_backward.default"]


def _dw_inputs(device):
    torch.manual_seed(0)
    return (torch.randn(2, 8, 6, 6, device=device, requires_grad=True),
            torch.randn(8, 1, 3, 3, device=device, requires_grad=True))


def test_depthwise_one_op_forward_two_backward():
    ours = lambda x, w: ops.depthwise_conv2d(x, w, None, 1, 1)  # noqa: E731
    # backend "auto" keeps Triton on CUDA until a GPU run has passed the CUDA C++ kernels (and
    # set_backend("cuda") needs a device), so the forward is the op the front calls there
    op = torch.ops.cnnkernels.depthwise_conv2d.default
    cuda_path = lambda x, w: op(x, w, None, [1, 1], [1, 1], [1, 1])  # noqa: E731
    assert _forward_ops(_dw_inputs, cuda_path) == ["cnnkernels.depthwise_conv2d.default"]
    assert _backward_ops(_dw_inputs, ours) == [
        "cnnkernels.depthwise_conv2d_backward_input.default",
        "cnnkernels.depthwise_conv2d_backward_weight.default"]


# --- no host-device synchronisation --------------------------------------------------------------
# A fake CUDA tensor has no value to read: .item(), float(t), bool(t) and any data-dependent
# Python branch on one raise DataDependentOutputException, so a forward that runs under
# FakeTensorMode never synchronises with the device (CUDA graphs and "reduce-overhead" can
# capture it).

def _layers(device):
    from cnnkernels import nn as ours

    return {
        "BatchNormAct2d": lambda: ours.BatchNormAct2d(8, device=device),
        "ConvBNAct2d 1x1": lambda: ours.ConvBNAct2d(8, 16, 1, activation="relu6", device=device),
        "ConvBNAct2d depthwise": lambda: ours.ConvBNAct2d(8, 8, 3, groups=8, activation="hardswish",
                                                          device=device),
        "DepthwiseConv2d": lambda: ours.DepthwiseConv2d(8, 3, padding=1, device=device),
        "SqueezeExcite": lambda: ours.SqueezeExcite(8, 4, gate="hardsigmoid", device=device),
        "HardSwish": lambda: ours.HardSwish(),
    }


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(_layers("cpu")))
def test_layer_forward_never_synchronises(name, training, monkeypatch):
    # backend "auto" keeps Triton for depthwise on CUDA until a GPU run has passed the CUDA C++
    # kernels; the Triton interpreter here would run the kernel on the fake tensors
    module = importlib.import_module("cnnkernels.ops.depthwise_conv2d")
    monkeypatch.setattr(module, "AUTO_KERNELS", module.KERNELS)
    with FakeTensorMode():
        layer = _layers("cuda")[name]().train(training)
        x = torch.randn(2, 8, 6, 6, device="cuda", requires_grad=training)
        with torch.set_grad_enabled(training):
            layer(x)  # the first call fills caches (the eval fold): no sync there either
            y = layer(x)
    assert y.device.type == "cuda"


def test_momentum_none_reads_the_batch_count_as_nn_batchnorm_does():
    """momentum=None weighs a batch 1 / num_batches_tracked, read on the host: nn.BatchNorm2d
    synchronises there too (its float(self.num_batches_tracked)), so this one path does."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    from cnnkernels.nn import BatchNormAct2d

    for make in (lambda: nn.BatchNorm2d(8, momentum=None, device="cuda"),
                 lambda: BatchNormAct2d(8, momentum=None, device="cuda")):
        with FakeTensorMode():
            layer = make().train()
            with pytest.raises(DataDependentOutputException):
                layer(torch.randn(2, 8, 6, 6, device="cuda"))
