"""Hostile inputs: no silent wrong answer. Double backward (create_graph=True) through every op
against PyTorch's, NaN / inf / -0.0 propagated as torch propagates them on every path, integer
inputs and bad arguments refused by name, meta tensors through the fake kernels, and a seeded
randomised comparison of every op with PyTorch over shapes, layouts, dtypes and special values."""
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnkernels
from cnnkernels import activations, ops
from cnnkernels.nn import DepthwiseConv2d, HardSwish, MaxPool2d
from cnnkernels.ops import layout
from cnnkernels.reference.activation import apply_activation

ACTS = list(activations.CODES)
NAN, INF = float("nan"), float("inf")


def needs_ext():
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("needs the compiled CPU extension")


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def act(t, name, slope=0.01):
    return apply_activation(t, activations.CODES[name], slope)


def act_twice(t, name):
    """act for torch's side of a double backward: torch has no derivative for
    aten::hardsigmoid_backward, relu6(t + 3) / 6 is the same function with one."""
    return F.relu6(t + 3) / 6 if name == "hardsigmoid" else act(t, name)


def assert_same(actual, expected, **tolerances):
    """Values close, NaN exactly where torch has NaN, infinities equal."""
    assert torch.equal(actual.isnan(), expected.isnan()), (actual, expected)
    torch.testing.assert_close(actual, expected.to(actual.dtype), equal_nan=True, **tolerances)


def with_specials(t):
    """t with NaN, +inf, -inf and -0.0 written into its first channel (one each)."""
    t = t.clone()
    flat = t[0, 0].reshape(-1)
    flat[:4] = torch.tensor([NAN, INF, -INF, -0.0], dtype=t.dtype)
    t[0, 0] = flat.view(t[0, 0].shape)
    return t


# --- 1. double backward (create_graph=True) --------------------------------------------------------

def gradient_penalty_grads(fn, inputs, seed=0):
    """d/d(inputs) of Σ (dL/d inputs)² with L = Σ v·fn(inputs): a double backward, as WGAN-GP's."""
    out = fn(*inputs)
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    first = torch.autograd.grad((out * v).sum(), inputs, create_graph=True, allow_unused=True)
    penalty = sum((g ** 2).sum() for g in first if g is not None)
    second = torch.autograd.grad(penalty, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, second)]


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def depthwise_pair(stride=1, padding=1):
    def ours(x, w, b):
        return ops.depthwise_conv2d(x, w, b, stride, padding)

    def theirs(x, w, b):
        return F.conv2d(x, w, b, stride, padding, 1, x.shape[1])
    return ours, theirs


def batch_norm_pair(training, activation, residual):
    def ours(x, w, b, r):
        rm, rv = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
        rm += 0.1
        rv += 0.5
        return ops.batch_norm_act(x, w, b, rm, rv, training, 0.1, 1e-5, activation,
                                  residual=r if residual else None)

    def theirs(x, w, b, r):
        rm, rv = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
        rm += 0.1
        rv += 0.5
        y = F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
        return act_twice(y + r if residual else y, activation)
    return ours, theirs


def squeeze_excite_pair(gate):
    def ours(x, w1, b1, w2, b2):
        return ops.squeeze_excite(x, w1, b1, w2, b2, "relu", gate)

    def theirs(x, w1, b1, w2, b2):
        s = F.relu(F.linear(x.mean((2, 3)), w1, b1))
        s = F.linear(s, w2, b2)
        # relu6(s + 3) / 6: torch has no double backward for F.hardsigmoid
        s = torch.sigmoid(s) if gate == "sigmoid" else F.relu6(s + 3) / 6
        return x * s[:, :, None, None]
    return ours, theirs


def pointwise_pair(stride, activation, prologue, residual):
    def ours(x, w, s, t, r, in_s, in_t):
        extra = dict(input_scale=in_s, input_shift=in_t, input_activation="relu") if prologue \
            else {}
        return ops.pointwise_conv2d(x, w, stride=stride, scale=s, shift=t, activation=activation,
                                    residual=r if residual else None, **extra)

    def theirs(x, w, s, t, r, in_s, in_t):
        if prologue:
            x = F.relu(x * in_s.view(1, -1, 1, 1) + in_t.view(1, -1, 1, 1))
        z = F.conv2d(x, w, None, stride) * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)
        return act_twice(z + r if residual else z, activation)
    return ours, theirs


def double_backward_cases():
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x4 = rnd(2, 3, 3, 4)  # small: gradgradcheck perturbs every element of every input
    cases = {
        "depthwise": (depthwise_pair(), (x4, rnd(3, 1, 3, 3), rnd(3))),
        "depthwise_stride2": (depthwise_pair(2, 0), (x4, rnd(6, 1, 2, 2), rnd(6))),
        "squeeze_excite_sigmoid": (squeeze_excite_pair("sigmoid"),
                                   (x4, rnd(2, 3), rnd(2), rnd(3, 2), rnd(3))),
        "squeeze_excite_hardsigmoid": (squeeze_excite_pair("hardsigmoid"),
                                       (x4 * 2, rnd(2, 3), rnd(2), rnd(3, 2), rnd(3))),
        "hardswish": ((lambda x: ops.hardswish(x), F.hardswish), (x4 * 3,)),
    }
    for training in (True, False):
        for activation, residual in (("identity", False), ("relu", True), ("hardswish", False),
                                     ("leaky_relu", True), ("hardsigmoid", False)):
            cases[f"batch_norm_{'train' if training else 'eval'}_{activation}_{residual}"] = (
                batch_norm_pair(training, activation, residual),
                (x4, rnd(3).abs() + 0.5, rnd(3), rnd(2, 3, 3, 4)))
    for stride, activation, prologue, residual in ((1, "identity", False, False),
                                                   (2, "relu", False, True),
                                                   (1, "hardswish", True, False),
                                                   (2, "relu6", True, False),
                                                   (1, "leaky_relu", False, True),
                                                   (1, "hardsigmoid", False, False)):
        out = (3 - 1) // stride + 1, (4 - 1) // stride + 1
        cases[f"pointwise_s{stride}_{activation}_{'prologue' if prologue else 'plain'}"] = (
            pointwise_pair(stride, activation, prologue, residual),
            (x4, rnd(4, 3, 1, 1), rnd(4), rnd(4), rnd(2, 4, *out), rnd(3).abs() + 0.5, rnd(3)))
    return cases


DOUBLE_BACKWARD = double_backward_cases()


@pytest.mark.parametrize("name", DOUBLE_BACKWARD)
def test_double_backward_matches_torch(impl, name):
    """The gradient penalty's gradient equals torch's (never the zeros of an op whose backward
    autograd cannot see), and gradgradcheck passes in float64."""
    backend_name, _ = impl
    (ours, theirs), tensors = DOUBLE_BACKWARD[name]
    if backend_name == "triton":
        # float32: the Triton GEMMs take no float64, and gradgradcheck under the interpreter
        # would take minutes
        tensors = tuple(t.float() for t in tensors)
    expected = gradient_penalty_grads(theirs, leaves(*tensors))
    if backend_name == "torch" and name.startswith("pointwise") and "hardsigmoid" in name:
        # the pure-torch reference is F.hardsigmoid, whose double backward torch refuses
        with pytest.raises(RuntimeError, match="derivative for aten::hardsigmoid_backward"):
            gradient_penalty_grads(ours, leaves(*tensors))
        return
    actual = gradient_penalty_grads(ours, leaves(*tensors))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3)
    if tensors[0].dtype == torch.float64:
        assert torch.autograd.gradgradcheck(ours, leaves(*tensors), eps=1e-6, atol=1e-4,
                                            nondet_tol=1e-7)


def test_double_backward_of_the_inference_only_ops_is_refused_by_name():
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="affine_act: has no autograd"):
        ops.affine_act(x, torch.ones(3), torch.zeros(3), "relu")
    with pytest.raises(RuntimeError, match="depthwise_conv2d: the fused scale/shift/activation"):
        ops.depthwise_conv2d(x, torch.randn(3, 1, 3, 3), scale=torch.ones(3),
                             shift=torch.zeros(3))


# --- 2. NaN, inf and -0.0 propagate as in torch ------------------------------------------------------

POINTWISE_PATHS = ["auto", "onednn", "tiles", "conv"]


@pytest.mark.parametrize("path", POINTWISE_PATHS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("epilogue", ["plain", "bn", "bn_residual"])
def test_pointwise_epilogue_propagates_nan_like_torch(impl, monkeypatch, path, memory_format,
                                                     epilogue):
    """Every activation, every CPU GEMM path (CNNKERNELS_POINTWISE_GEMM), float32: the issue's
    x[0, 0, 0, 0] = NaN gave relu 0 through oneDNN's ReLU / clip post-ops."""
    backend_name, _ = impl
    if path != "auto" and backend_name != "cpu":
        pytest.skip("the GEMM paths are the CPU kernel's")
    monkeypatch.setenv("CNNKERNELS_POINTWISE_GEMM", path)
    g = torch.Generator().manual_seed(0)
    for size in ((1, 3, 5, 5), (1, 3, 28, 28)):  # a small plane, and one for the BLAS GEMM
        x = with_specials(torch.randn(*size, generator=g))
        x[0, 1, 2, 2] = NAN
        if memory_format == "channels_last":
            x = channels_last(x)
        w = torch.randn(4, 3, 1, 1, generator=g)
        args = {}
        if epilogue != "plain":
            args = dict(scale=torch.rand(4, generator=g) + 0.5, shift=torch.randn(4, generator=g),
                        bias=torch.randn(4, generator=g))
        if epilogue == "bn_residual":
            args["residual"] = with_specials(torch.randn(1, 4, *size[2:], generator=g))
        for activation in ACTS:
            with torch.no_grad():
                y = ops.pointwise_conv2d(x, w, activation=activation, **args)
            z = F.conv2d(x.double(), w.double())
            if args:
                z = z * args["scale"].double().view(1, -1, 1, 1) + \
                    (args["shift"] + args["bias"]).double().view(1, -1, 1, 1)
            if "residual" in args:
                z = z + args["residual"].double()
            assert_same(y, act(z, activation).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_pointwise_gradient_at_nan_is_torchs(impl, activation, memory_format):
    """torch passes the gradient through a NaN pre-activation for relu, relu6 and hardswish (1),
    leaky_relu (slope), hardsigmoid (0): so must we."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 5, 5, generator=g)
    x[0, 0, 1, 1] = NAN
    if memory_format == "channels_last":
        x = channels_last(x)
    w, s, t = torch.randn(4, 3, 1, 1, generator=g), torch.rand(4, generator=g) + 0.5, \
        torch.randn(4, generator=g)
    grad = torch.randn(1, 4, 5, 5, generator=g)
    ours = leaves(x, w, s, t)
    y = ops.pointwise_conv2d(ours[0], ours[1], scale=ours[2], shift=ours[3], activation=activation)
    y.backward(grad)
    theirs = leaves(x, w, s, t)
    z = F.conv2d(theirs[0], theirs[1]) * theirs[2].view(1, -1, 1, 1) + theirs[3].view(1, -1, 1, 1)
    act(z, activation).backward(grad)
    for a, e in zip(ours, theirs):
        assert_same(a.grad, e.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_fused_epilogues_propagate_nan_like_torch(impl, memory_format):
    """depthwise's, affine_act's and batch_norm_act's (eval) epilogues, hardswish / hardsigmoid:
    forward values (NaN, ±inf, -0.0) and the elementwise ops' gradients at them."""
    g = torch.Generator().manual_seed(3)
    x = with_specials(torch.randn(2, 3, 6, 5, generator=g) * 4)
    if memory_format == "channels_last":
        x = channels_last(x)
    scale, shift = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    w = torch.randn(3, 1, 3, 3, generator=g)
    residual = with_specials(torch.randn(2, 3, 6, 5, generator=g))
    rm, rv = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    view = (1, -1, 1, 1)
    for activation in ACTS:
        with torch.no_grad():
            dw = ops.depthwise_conv2d(x, w, None, 1, 1, scale=scale, shift=shift,
                                      activation=activation)
            aa = ops.affine_act(x, scale, shift, activation, residual=residual)
            bn = ops.batch_norm_act(x, None, None, rm, rv, False, 0.1, 1e-5, activation)
        conv = F.conv2d(x.double(), w.double(), None, 1, 1, 1, 3)
        assert_same(dw, act(conv * scale.double().view(view) + shift.double().view(view),
                            activation).float(), rtol=1e-4, atol=1e-4)
        expected = act(x.double() * scale.double().view(view) + shift.double().view(view)
                       + residual.double(), activation)
        assert_same(aa, expected.float(), rtol=1e-5, atol=1e-5)
        expected = act(F.batch_norm(x.double(), rm.double(), rv.double(), None, None, False),
                       activation)
        assert_same(bn, expected.float(), rtol=1e-5, atol=1e-5)
    for name in ("hardswish", "hardsigmoid"):
        ours, theirs = leaves(x, x)
        getattr(ops, name)(ours).backward(torch.ones_like(x))
        getattr(F, name)(theirs).backward(torch.ones_like(x))
        expected = theirs.grad
        if name == "hardswish" and impl[0] != "torch":  # the torch backend is torch's kernel
            # torch's CPU hardswish' at NaN is NaN in its vectorised loop but the upstream
            # gradient in its scalar tail (tensors under 16 floats) and on CUDA: ours is the
            # latter everywhere (the forward is NaN there already)
            expected = torch.where(x.isnan(), torch.ones_like(x), expected)
        assert_same(ours.grad, expected, rtol=0, atol=0)
        assert_same(getattr(ops, name)(x), getattr(F, name)(x), rtol=0, atol=0)


@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("special", ["inf_first", "inf_later", "-inf_first", "both_infs", "nan"])
def test_running_statistics_with_infinities_match_torch(impl, memory_format, special):
    """An inf in a channel: torch's running_mean becomes inf (not NaN), running_var NaN; the
    one-pass statistics' anchor (the channel's first value) must not turn inf into NaN."""
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(4))
    position = (0, 1, 0, 0) if special.endswith("first") or special == "nan" else (1, 1, 2, 3)
    x[position] = {"inf_first": INF, "inf_later": INF, "-inf_first": -INF, "both_infs": INF,
                   "nan": NAN}[special]
    if special == "both_infs":
        x[1, 1, 3, 3] = -INF
    if memory_format == "channels_last":
        x = channels_last(x)
    ours_rm, ours_rv = torch.zeros(3), torch.ones(3)
    theirs_rm, theirs_rv = torch.zeros(3), torch.ones(3)
    y = ops.batch_norm_act(x, None, None, ours_rm, ours_rv, True, 0.1, 1e-5, "identity")
    expected = F.batch_norm(x, theirs_rm, theirs_rv, None, None, True, 0.1, 1e-5)
    assert_same(ours_rm, theirs_rm)
    assert_same(ours_rv, theirs_rv)
    assert_same(y, expected, rtol=1e-5, atol=1e-5)


# --- 3. integer and bool inputs refused --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_squeeze_excite_refuses_integer_and_bool_inputs(dtype):
    x = torch.ones(1, 4, 3, 3).to(dtype)
    w1, w2 = torch.randn(2, 4), torch.randn(4, 2)
    with pytest.raises(TypeError, match="squeeze_excite: expected argument 'x' to be a float32"):
        ops.squeeze_excite(x, w1, None, w2, None)
    with pytest.raises(TypeError, match="expected argument 'fc2_weight' to be a float32"):
        ops.squeeze_excite(torch.ones(1, 4, 3, 3), w1, None, w2.to(dtype), None)
    with pytest.raises(TypeError, match="expected argument 'fc1_weight' to be a torch.Tensor"):
        ops.squeeze_excite(torch.ones(1, 4, 3, 3), [[1.0]], None, w2, None)


# --- 4. eps and momentum of batch_norm_act -------------------------------------------------------------

@pytest.mark.parametrize("eps, message", [(0.0, "'eps' to be a finite number > 0"),
                                          (-1e-5, "'eps' to be a finite number > 0"),
                                          (NAN, "'eps' to be a finite number > 0"),
                                          ("1e-5", "'eps' to be a real number")])
def test_batch_norm_act_refuses_bad_eps(eps, message):
    x = torch.ones(4, 3, 2, 2)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.batch_norm_act(x, None, None, torch.zeros(3), torch.ones(3), True, 0.1, eps)


@pytest.mark.parametrize("momentum, message", [(-0.1, "'momentum' to be in \\[0, 1\\] or None"),
                                               (1.5, "'momentum' to be in \\[0, 1\\] or None"),
                                               (True, "'momentum' to be a real number"),
                                               ("0.1", "'momentum' to be a real number")])
def test_batch_norm_act_refuses_bad_momentum(momentum, message):
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.batch_norm_act(x, None, None, torch.zeros(3), torch.ones(3), True, momentum)


def test_batch_norm_act_momentum_none_is_the_cumulative_average(impl):
    """momentum=None with num_batches_tracked: nn.BatchNorm2d(momentum=None)'s running statistics
    and counter, step by step; without a counter: refused by name."""
    torch.manual_seed(5)
    bn = nn.BatchNorm2d(3, momentum=None)
    rm, rv = torch.zeros(3), torch.ones(3)
    count = torch.tensor(0, dtype=torch.long)
    for step in range(3):
        x = torch.randn(4, 3, 5, 5) * (step + 1) + step
        expected = F.relu(bn(x))
        y = ops.batch_norm_act(x, None, None, rm, rv, True, None, 1e-5, "relu",
                               num_batches_tracked=count)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6)
        assert count.item() == bn.num_batches_tracked.item() == step + 1
    with pytest.raises(ValueError, match="momentum=None .* pass num_batches_tracked"):
        ops.batch_norm_act(x, None, None, rm, rv, True, None)
    # nothing to update: momentum=None needs no counter
    ops.batch_norm_act(x, None, None, None, None, True, None)
    ops.batch_norm_act(x, None, None, rm, rv, False, None)


# --- 5. copying out of a meta tensor ------------------------------------------------------------------

def test_copy_to_channels_last_out_of_a_meta_tensor_raises_like_copy():
    out = torch.empty(1, 3, 4, 4, memory_format=torch.channels_last)
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        torch.empty_like(out).copy_(torch.empty(1, 3, 4, 4, device="meta"))
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        layout.copy_to_channels_last_(out, torch.empty(1, 3, 4, 4, device="meta"))


# --- 7. meta tensors through the fake kernels ----------------------------------------------------------

def meta_calls():
    def t(*shape, fmt=torch.contiguous_format):
        return torch.randn(*shape).contiguous(memory_format=fmt)
    cl = torch.channels_last
    return {
        "depthwise": (ops.depthwise_conv2d, (t(2, 3, 7, 6, fmt=cl), t(6, 1, 3, 3), t(6)),
                      dict(stride=2, padding=1)),
        "pointwise": (ops.pointwise_conv2d, (t(2, 3, 7, 6, fmt=cl), t(5, 3, 1, 1)),
                      dict(stride=2, scale=t(5), shift=t(5), activation="relu")),
        "pointwise_prologue": (ops.pointwise_conv2d, (t(2, 3, 7, 6), t(5, 3, 1, 1)),
                               dict(input_scale=t(3), input_shift=t(3), input_activation="relu")),
        "squeeze_excite": (ops.squeeze_excite, (t(2, 4, 5, 5), t(2, 4), t(2), t(4, 2), t(4)), {}),
        "batch_norm_act_train": (ops.batch_norm_act,
                                 (t(2, 3, 4, 4, fmt=cl), t(3), t(3), t(3), t(3).abs(), True), {}),
        "batch_norm_act_eval": (ops.batch_norm_act,
                                (t(2, 3, 4, 4), None, None, t(3), t(3).abs(), False), {}),
        "affine_act": (ops.affine_act, (t(2, 3, 4, 4, fmt=cl), t(3), t(3), "hardswish"), {}),
        "hardswish": (ops.hardswish, (t(2, 3, 4, 4),), {}),
        "hardsigmoid": (ops.hardsigmoid, (t(2, 3, 4, 4, fmt=cl),), {}),
        "contiguous_from_channels_last": (ops.contiguous_from_channels_last,
                                          (t(2, 3, 4, 4, fmt=cl),), {}),
        "to_channels_last": (layout.to_channels_last, (t(2, 3, 4, 4),), {}),
    }


@pytest.mark.parametrize("name", meta_calls())
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_ops_run_on_meta_tensors(name, grad):
    """Shape, dtype and memory format of the CPU result, on meta tensors (shape inference and
    deferred initialisation), with and without autograd recording."""
    fn, args, kwargs = meta_calls()[name]
    with torch.no_grad():
        expected = fn(*args, **kwargs)

    def to_meta(a):
        if not isinstance(a, torch.Tensor):
            return a
        m = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
        return m.requires_grad_(grad and a.is_floating_point() and name != "affine_act")
    with torch.set_grad_enabled(grad):
        actual = fn(*[to_meta(a) for a in args], **{k: to_meta(v) for k, v in kwargs.items()})
    assert actual.device.type == "meta"
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert actual.stride() == expected.stride()
    if grad and actual.requires_grad:
        actual.sum().backward()


def test_layers_run_on_meta_and_initialise_after_to_empty():
    x = torch.randn(2, 4, 9, 9)
    conv = DepthwiseConv2d(4, 3, stride=2, padding=1, device="meta")
    assert conv(x.to("meta")).shape == (2, 4, 5, 5)
    assert HardSwish()(x.to("meta")).shape == x.shape
    assert MaxPool2d(3, 2, 1)(x.to("meta")).shape == (2, 4, 5, 5)
    conv = conv.to_empty(device="cpu")
    conv.reset_parameters()
    assert torch.isfinite(conv.weight).all() and torch.isfinite(conv.bias).all()
    y = conv(x)
    torch.testing.assert_close(y, conv.to_conv()(x), rtol=1e-5, atol=1e-5)


# --- 8. errors that name the argument ------------------------------------------------------------------

def test_depthwise_refuses_a_list_weight_by_name():
    with pytest.raises(TypeError, match="depthwise_conv2d: expected argument 'weight' to be a "
                                        "torch.Tensor, got list"):
        ops.depthwise_conv2d(torch.randn(1, 1, 3, 3), [[1.0]])


INTEGER_LIKE = [2, np.int64(2), np.int32(2), torch.tensor(2), torch.tensor(2, dtype=torch.int32)]
NOT_INTEGERS = [2.0, np.float32(2.0), torch.tensor(2.0), True, "2", None,
                torch.tensor([[2, 2]])]


@pytest.mark.parametrize("stride", INTEGER_LIKE, ids=repr)
def test_integer_like_strides_are_accepted(stride):
    x = torch.randn(1, 3, 7, 7)
    w_dw, w_pw = torch.randn(3, 1, 3, 3), torch.randn(4, 3, 1, 1)
    torch.testing.assert_close(ops.depthwise_conv2d(x, w_dw, None, stride, 1, 1),
                               F.conv2d(x, w_dw, None, 2, 1, 1, 3))
    torch.testing.assert_close(ops.depthwise_conv2d(x, w_dw, None, (stride, 1), (1, 1), stride),
                               F.conv2d(x, w_dw, None, (2, 1), 1, 2, 3))
    torch.testing.assert_close(ops.pointwise_conv2d(x, w_pw, stride=stride),
                               F.conv2d(x, w_pw, None, 2))
    assert DepthwiseConv2d(3, stride + 1, stride).kernel_size == (3, 3)


@pytest.mark.parametrize("value", NOT_INTEGERS, ids=repr)
@pytest.mark.parametrize("argument", ["stride", "padding", "dilation"])
def test_non_integer_geometry_is_refused_by_name(value, argument):
    x = torch.randn(1, 3, 7, 7)
    call = dict(stride=1, padding=1, dilation=1)
    call[argument] = value
    with pytest.raises((TypeError, ValueError),
                       match=f"depthwise_conv2d: expected argument '{argument}' to be an int"):
        ops.depthwise_conv2d(x, torch.randn(3, 1, 3, 3), None, **call)
    with pytest.raises((TypeError, ValueError),
                       match=f"DepthwiseConv2d: expected argument '{argument}' to be an int"):
        DepthwiseConv2d(3, 3, **call)
    if argument == "stride":
        with pytest.raises(TypeError, match="pointwise_conv2d: expected argument 'stride' to be "
                                            "an int"):
            ops.pointwise_conv2d(x, torch.randn(4, 3, 1, 1), stride=value)
        with pytest.raises(TypeError, match="pointwise_conv2d: expected argument 'groups' to be "
                                            "an int"):
            ops.pointwise_conv2d(x, torch.randn(4, 3, 1, 1), groups=value)


@pytest.mark.parametrize("kernel_size", [0, (3, 0), -1])
def test_depthwise_layer_refuses_empty_kernels_by_name(kernel_size):
    with pytest.raises(ValueError, match="DepthwiseConv2d: kernel_size must be >= 1"):
        DepthwiseConv2d(4, kernel_size)


@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("size", [(3, 3), (30, 30)])
def test_pointwise_with_no_input_channels_gives_atens_result(impl, memory_format, size):
    """C_in = 0: the convolution is zeros (+ bias), then the epilogue (oneDNN refused it with
    "could not create a primitive descriptor"); gradients of the right shapes."""
    x = torch.randn(2, 0, *size)
    if memory_format == "channels_last":
        x = channels_last(x)
    w, b = torch.randn(4, 0, 1, 1, requires_grad=True), torch.randn(4, requires_grad=True)
    s, t = torch.rand(4) + 0.5, torch.randn(4)
    for activation in ("identity", "relu", "hardswish"):
        y = ops.pointwise_conv2d(x, w, b, scale=s, shift=t, activation=activation)
        # (F.conv2d itself returns [N, 0, H, W] here: no output channels at all)
        expected = act(torch.zeros(2, 4, *size) * s.view(1, -1, 1, 1)
                       + (t + b.detach()).view(1, -1, 1, 1), activation)
        torch.testing.assert_close(y, expected)
        y.sum().backward()
        assert w.grad.shape == w.shape and b.grad.shape == b.shape


def test_batch_norm_act_momentum_none_message_names_the_argument():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="batch_norm_act: momentum=None"):
        ops.batch_norm_act(x, None, None, torch.zeros(3), torch.ones(3), True, None)


# --- 10. seeded randomised comparison with PyTorch ------------------------------------------------------

# huge: 1e15, whose squares (a variance) and sums of products (a convolution) stay finite in float32,
# so that where we and a float64 reference overflow is not a question of summation order
SPECIALS = [NAN, INF, -INF, -0.0, 1e15, -1e15, 1e-40]


def random_input(g, shape, dtype, memory_format, specials):
    """A random tensor, maybe sprinkled with special values, in one of three layouts (NCHW,
    channels_last, a non-contiguous slice of a wider tensor)."""
    n, c, h, w = shape
    base = torch.randn(n, c + 2, h, w + 1, generator=g) if memory_format == "sliced" else \
        torch.randn(n, c, h, w, generator=g)
    if specials:
        count = max(1, base.numel() // 16)
        picks = torch.randint(0, base.numel(), (count,), generator=g)
        base.view(-1)[picks] = torch.tensor(SPECIALS)[
            torch.randint(0, len(SPECIALS), (count,), generator=g)]
    base = base.to(dtype)
    x = base[:, 1:-1, :, 1:] if memory_format == "sliced" else base
    return channels_last(x) if memory_format == "channels_last" else x


def tolerance(dtype):
    return {torch.float64: dict(rtol=1e-7, atol=1e-7), torch.float32: dict(rtol=2e-4, atol=2e-4),
            torch.bfloat16: dict(rtol=5e-2, atol=5e-2), torch.float16: dict(rtol=1e-2, atol=1e-2)}[dtype]


CASES = 30


def random_config(op, index):
    g = torch.Generator().manual_seed(zlib.crc32(f"{op}-{index}".encode()))  # not hash(): salted
    dtype = [torch.float32, torch.float64, torch.float32, torch.bfloat16, torch.float16][
        int(torch.randint(0, 5, (1,), generator=g))]
    memory_format = ["nchw", "channels_last", "sliced"][int(torch.randint(0, 3, (1,), generator=g))]
    n, c = int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
    h, w = (int(v) for v in torch.randint(1, 9, (2,), generator=g))
    specials = bool(torch.randint(0, 3, (1,), generator=g) == 0)
    activation = ACTS[int(torch.randint(0, len(ACTS), (1,), generator=g))]
    return g, dtype, memory_format, (n, c, h, w), specials, activation


def compare(ours_fn, torch_fn, inputs, dtype, grad_inputs):
    """Forward and (without special values, float32/float64) gradients of ours against torch's
    on the same inputs in float64, rounded to our dtype: NaN where it has NaN. (torch's own
    bfloat16 channels_last depthwise convolution leaks a NaN into a neighbouring channel: not
    the reference.)"""
    ours_in = [t.detach().clone().requires_grad_(i in grad_inputs) if isinstance(t, torch.Tensor)
               else t for i, t in enumerate(inputs)]
    theirs_in = [t.detach().double().requires_grad_(i in grad_inputs)
                 if isinstance(t, torch.Tensor) else t for i, t in enumerate(inputs)]
    y = ours_fn(*ours_in)
    expected = torch_fn(*theirs_in)
    assert_same(y.double(), expected.detach().to(y.dtype).double(), **tolerance(dtype))
    finite = all(torch.isfinite(t).all() for t in inputs if isinstance(t, torch.Tensor))
    if grad_inputs and finite and dtype in (torch.float32, torch.float64):
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
        y.backward(grad)
        expected.backward(grad.double())
        for i in grad_inputs:
            assert_same(ours_in[i].grad.double(), theirs_in[i].grad.to(y.dtype).double(),
                        **tolerance(dtype))


@pytest.mark.parametrize("index", range(CASES))
def test_random_depthwise_against_torch(index):
    g, dtype, memory_format, (n, c, h, w), specials, _ = random_config("depthwise", index)
    k = int(torch.randint(1, 4, (1,), generator=g))
    stride, padding = int(torch.randint(1, 3, (1,), generator=g)), k // 2
    multiplier = int(torch.randint(1, 3, (1,), generator=g))
    h, w = max(h, k), max(w, k)
    x = random_input(g, (n, c, h, w), dtype, memory_format, specials)
    weight = torch.randn(c * multiplier, 1, k, k, generator=g).to(dtype)
    bias = torch.randn(c * multiplier, generator=g).to(dtype)
    compare(lambda x, w, b: ops.depthwise_conv2d(x, w, b, stride, padding),
            lambda x, w, b: F.conv2d(x, w, b, stride, padding, 1, c), (x, weight, bias), dtype,
            (0, 1, 2) if dtype != torch.float16 else ())


@pytest.mark.parametrize("index", range(CASES))
def test_random_pointwise_against_torch(index):
    g, dtype, memory_format, (n, c, h, w), specials, activation = random_config("pointwise", index)
    if dtype == torch.float16:
        dtype = torch.float32
    stride = int(torch.randint(1, 3, (1,), generator=g))
    out = int(torch.randint(1, 6, (1,), generator=g))
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x = random_input(g, (n, c, h, w), dtype, memory_format, specials)
    weight = torch.randn(out, c, 1, 1, generator=g).to(dtype)
    scale, shift = (torch.rand(out, generator=g) + 0.5).to(compute), \
        torch.randn(out, generator=g).to(compute)
    view = (1, -1, 1, 1)

    def theirs(x, w, s, t):
        z = F.conv2d(x, w, None, stride).to(s.dtype) * s.view(view) + t.view(view)
        return act(z, activation).to(x.dtype)
    compare(lambda x, w, s, t: ops.pointwise_conv2d(x, w, stride=stride, scale=s, shift=t,
                                                    activation=activation),
            theirs, (x, weight, scale, shift), dtype, (0, 1, 2, 3))


@pytest.mark.parametrize("index", range(CASES))
def test_random_batch_norm_act_against_torch(index):
    g, dtype, memory_format, (n, c, h, w), specials, activation = random_config("bn", index)
    if n * h * w == 1:
        n = 2
    x = random_input(g, (n, c, h, w), dtype, memory_format, specials)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = torch.randn(c, generator=g).to(compute), torch.randn(c, generator=g).to(compute)
    training = bool(torch.randint(0, 2, (1,), generator=g))
    stats = [torch.randn(c, generator=g).to(compute), (torch.rand(c, generator=g) + 0.5).to(compute)]
    ours_stats, theirs_stats = [t.clone() for t in stats], [t.double() for t in stats]

    def ours(x, w, b):
        return ops.batch_norm_act(x, w, b, *ours_stats, training, 0.1, 1e-5, activation)

    def theirs(x, w, b):
        y = F.batch_norm(x, *theirs_stats, w, b, training, 0.1, 1e-5)
        return act(y, activation).to(x.dtype)
    compare(ours, theirs, (x, weight, bias), dtype, (0, 1, 2))
    for a, e in zip(ours_stats, theirs_stats):
        assert_same(a, e.to(a.dtype), **tolerance(dtype if dtype == torch.float64 else torch.float32))


@pytest.mark.parametrize("index", range(CASES))
def test_random_elementwise_ops_against_torch(index):
    """hardswish, hardsigmoid and affine_act."""
    g, dtype, memory_format, shape, specials, activation = random_config("elementwise", index)
    x = random_input(g, shape, dtype, memory_format, specials) * 4
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scale, shift = torch.randn(shape[1], generator=g).to(compute), \
        torch.randn(shape[1], generator=g).to(compute)
    compare(ops.hardswish, F.hardswish, (x,), dtype, (0,))
    compare(ops.hardsigmoid, F.hardsigmoid, (x,), dtype, (0,))
    view = (1, -1, 1, 1)
    with torch.no_grad():
        compare(lambda x: ops.affine_act(x, scale, shift, activation),
                lambda x: act(x.to(compute) * scale.view(view) + shift.view(view),
                              activation).to(x.dtype), (x,), dtype, ())


@pytest.mark.parametrize("index", range(CASES))
def test_random_squeeze_excite_against_torch(index):
    g, dtype, memory_format, (n, c, h, w), specials, activation = random_config("se", index)
    x = random_input(g, (n, c, h, w), dtype, memory_format, specials)
    squeezed = int(torch.randint(1, 4, (1,), generator=g))
    gate = ["sigmoid", "hardsigmoid"][int(torch.randint(0, 2, (1,), generator=g))]
    params = [torch.randn(squeezed, c, generator=g), torch.randn(squeezed, generator=g),
              torch.randn(c, squeezed, generator=g), torch.randn(c, generator=g)]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    params = [p.to(compute) for p in params]

    def theirs(x, w1, b1, w2, b2):
        s = act(F.linear(x.to(w1.dtype).mean((2, 3)), w1, b1), activation)
        s = F.linear(s, w2, b2)
        s = torch.sigmoid(s) if gate == "sigmoid" else F.hardsigmoid(s)
        return x * s[:, :, None, None].to(x.dtype)
    compare(lambda *a: ops.squeeze_excite(*a, activation, gate), theirs, (x, *params), dtype,
            (0, 1, 2, 3, 4))


@pytest.mark.parametrize("gemm", ["auto", "onednn", "tiles", "conv"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_compiled_pointwise_op_with_no_input_channels(monkeypatch, gemm, memory_format):
    """The C++ op called directly with C_in = 0: zeros + bias through the epilogue, every path."""
    needs_ext()
    monkeypatch.setenv("CNNKERNELS_POINTWISE_GEMM", gemm)
    x = torch.randn(2, 0, 3, 3)
    if memory_format == "channels_last":
        x = channels_last(x)
    w, b = torch.randn(4, 0, 1, 1), torch.randn(4)
    y = torch.ops.cnnkernels.pointwise_conv2d(x, w, b, 1, 1, None, None, None,
                                              activations.RELU, 0.01)
    torch.testing.assert_close(y, F.relu(b.view(1, -1, 1, 1).expand(2, 4, 3, 3)))
