"""Depthwise convolution: every implementation against F.conv2d(groups=C), values and all three
gradients, over kernel sizes, strides, paddings, dilations, multipliers, layouts and dtypes."""
import platform

import pytest
import torch
import torch.nn.functional as F

import cnnkernels
from cnnkernels import ops
from cnnkernels.ops.depthwise_conv2d import KERNELS


def needs_kernel(impl):
    if impl[0] not in KERNELS and impl[0] != "torch":
        pytest.skip(f"depthwise_conv2d has no {impl[0]} kernel yet (Triton serves CUDA tensors)")


# (N, C, H, W, multiplier, kernel, stride, padding, dilation)
CONFIGS = [
    (2, 3, 9, 7, 1, 3, 1, 1, 1),
    (2, 3, 9, 7, 1, 3, 2, 1, 1),
    (1, 5, 13, 11, 1, 5, 1, 2, 1),
    (1, 5, 13, 11, 1, 5, 2, 2, 1),
    (3, 2, 12, 10, 1, 7, 1, 3, 1),
    (1, 4, 9, 9, 1, 1, 1, 0, 1),
    (2, 3, 11, 9, 2, 3, 1, 1, 1),
    (1, 3, 11, 9, 2, 3, (2, 1), 0, 1),
    (1, 2, 15, 14, 1, 3, 1, 2, 2),
    (1, 2, 15, 14, 1, (3, 5), 1, (1, 2), 1),
    (1, 3, 10, 10, 1, 9, 3, 4, 1),
    (2, 1, 6, 5, 3, 3, 1, 0, 1),
    # 17..64 output columns at stride 1: the CPU kernels' wide-plane path (<= 16: channel blocks)
    (1, 3, 6, 24, 1, 3, 1, 1, 1),
    # wider than 64 columns: the CPU kernels' per-row path at stride 1
    (1, 2, 7, 70, 1, 3, 1, 1, 1),
    (1, 2, 5, 67, 2, 5, 1, 2, 2),
    # more than 16 channels (float32 on AVX-512 CPUs: two channel blocks, the second partial)
    (2, 20, 9, 7, 1, 3, 1, 1, 1),
    (1, 17, 8, 8, 1, 3, 2, 1, 1),
    # planes tall and wide enough that the channel-blocked CPU kernels cut them into row strips
    (1, 2, 80, 300, 1, 3, 1, 1, 1),
    (1, 2, 81, 300, 1, 5, 2, 2, 1),
]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def make(config, dtype, layout, device, seed=0):
    n, c, h, w, m, k, s, p, d = config
    kh, kw = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    if layout == "strided":
        x = torch.randn(n, c, h, 2 * w, generator=g)[..., ::2]
    weight = torch.randn(c * m, 1, kh, kw, generator=g) / (kh * kw) ** 0.5
    bias = torch.randn(c * m, generator=g)
    x, weight, bias = (t.to(device=device, dtype=dtype) for t in (x, weight, bias))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, weight, bias, s, p, d


def tolerances(dtype):
    return {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5),
            torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 2e-2)}[dtype]


def reference_result(x, weight, bias, s, p, d, grad):
    """F.conv2d in float64 on the same inputs, rounded to the input dtype at the end."""
    tensors = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y = F.conv2d(*tensors, s, p, d, groups=x.shape[1])
    grads = torch.autograd.grad(y, tensors, grad.double())
    return [t.to(x.dtype) for t in (y, *grads)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_matches_conv2d(impl, config, layout, dtype):
    needs_kernel(impl)
    if impl[0] == "triton" and impl[1] == "cpu" and dtype in (torch.bfloat16, torch.float16):
        pytest.skip("the Triton interpreter is tested in float32/float64")
    x, weight, bias, s, p, d = make(config, dtype, layout, impl[1])
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    y = ops.depthwise_conv2d(x, weight, bias, s, p, d)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
    got = [y, *torch.autograd.grad(y, (x, weight, bias), grad)]
    want = reference_result(x, weight, bias, s, p, d, grad)
    rtol, atol = tolerances(dtype)
    for name, a, b in zip(("out", "grad_x", "grad_weight", "grad_bias"), got, want):
        scale = max(1.0, b.abs().max().item()) if name != "out" else 1.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")
    expect_cl = layout == "channels_last" and x.shape[1] > 1
    assert y.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)
    if layout == "channels_last" and x.shape[1] > 1:
        assert got[1].is_contiguous(memory_format=torch.channels_last), "grad_x keeps the format"


def test_padding_same_and_valid(impl):
    needs_kernel(impl)
    x, weight, bias, *_ = make((1, 3, 9, 8, 1, 5, 1, 0, 1), torch.float32, "contiguous", impl[1])
    for padding, expected in (("same", 2), ("valid", 0)):
        y = ops.depthwise_conv2d(x, weight, bias, 1, padding, 1)
        torch.testing.assert_close(y, F.conv2d(x, weight, bias, 1, expected, 1, groups=3),
                                   rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        ops.depthwise_conv2d(x, weight, bias, 2, "same")
    w4 = torch.randn(3, 1, 4, 4, device=impl[1])
    with pytest.raises(ValueError, match="needs asymmetric padding"):
        ops.depthwise_conv2d(x, w4, None, 1, "same")


ACTS = ["identity", "relu", "relu6", "leaky_relu", "hardswish", "hardsigmoid"]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inference_epilogue(impl, activation, layout):
    """act(scale * (conv + bias) + shift): Conv-BN(eval)-Act in one pass."""
    needs_kernel(impl)
    x, weight, bias, s, p, d = make((2, 4, 9, 7, 1, 3, 1, 1, 1), torch.float32, layout, impl[1])
    scale = torch.rand(4, device=impl[1]) + 0.5
    shift = torch.randn(4, device=impl[1])
    with torch.no_grad():
        y = ops.depthwise_conv2d(x, weight, bias, s, p, d, scale=scale, shift=shift,
                                 activation=activation, negative_slope=0.2)
        conv = F.conv2d(x, weight, bias, s, p, d, groups=4)
        pre = conv * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        want = {"identity": pre, "relu": F.relu(pre), "relu6": F.relu6(pre),
                "leaky_relu": F.leaky_relu(pre, 0.2), "hardswish": F.hardswish(pre),
                "hardsigmoid": F.hardsigmoid(pre)}[activation]
    torch.testing.assert_close(y, want, rtol=2e-5, atol=2e-5)


def test_epilogue_refuses_autograd():
    x, weight, bias, *_ = make((1, 2, 5, 5, 1, 3, 1, 1, 1), torch.float32, "contiguous", "cpu")
    with pytest.raises(RuntimeError, match="epilogue is for inference"):
        ops.depthwise_conv2d(x, weight.requires_grad_(), bias, 1, 1, activation="relu")


def test_gradcheck_float64(impl):
    needs_kernel(impl)
    x, weight, bias, s, p, d = make((2, 2, 6, 5, 2, 3, 2, 1, 1), torch.float64, "contiguous",
                                    impl[1])
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.depthwise_conv2d(a, b, c, s, p, d), inputs)


def test_empty_batch_gives_empty_output_and_zero_gradients(impl):
    needs_kernel(impl)
    x, weight, bias, s, p, d = make((0, 3, 7, 7, 1, 3, 1, 1, 1), torch.float32, "contiguous",
                                    impl[1])
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    y = ops.depthwise_conv2d(x, weight, bias, s, p, d)
    assert y.shape == (0, 3, 7, 7)
    gx, gw, gb = torch.autograd.grad(y, (x, weight, bias), torch.empty_like(y))
    assert gx.shape == x.shape and torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0


OPCHECK_CASES = [((2, 3, 9, 7, 1, 3, 1, 1, 1), "contiguous"),
                 ((1, 3, 11, 9, 2, 5, 2, 2, 1), "channels_last"),
                 ((1, 2, 8, 9, 1, 3, 1, 2, 2), "strided")]


@pytest.mark.parametrize("case", range(len(OPCHECK_CASES)))
def test_opcheck(kernel_impl, case):
    needs_kernel(kernel_impl)
    backend_name, device = kernel_impl
    config, layout = OPCHECK_CASES[case]
    x, weight, bias, s, p, d = make(config, torch.float32, layout, device)
    s, p, d = ([v, v] if isinstance(v, int) else list(v) for v in (s, p, d))
    suffix = "_triton" if backend_name == "triton" else ""
    if suffix:
        from cnnkernels.ops.depthwise_conv2d import _load_triton_ops
        _load_triton_ops()
    ns = torch.ops.cnnkernels
    y = getattr(ns, f"depthwise_conv2d{suffix}")(x, weight, bias, s, p, d)
    grad = torch.randn_like(y)
    calls = [
        (getattr(ns, f"depthwise_conv2d{suffix}"),
         (x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_(),
          s, p, d)),
        (getattr(ns, f"depthwise_conv2d_backward_input{suffix}"),
         (grad, weight, list(x.shape), s, p, d)),
        (getattr(ns, f"depthwise_conv2d_backward_weight{suffix}"),
         (grad, x, list(weight.shape), s, p, d)),
    ]
    utils = ("test_schema", "test_autograd_registration") if suffix and device == "cpu" else None
    for op, args in calls:
        if utils:
            torch.library.opcheck(op, args, test_utils=utils)
        else:
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("bad, message", [
    (dict(weight_shape=(4, 1, 3, 3)), "not a positive multiple|expected 'weight' of shape"),
    (dict(weight_shape=(3, 2, 3, 3)), "expected 'weight' of shape"),
    (dict(stride=0), "'stride' must be >= 1"),
    (dict(padding=-1), "'padding' must be >= 0"),
    (dict(kernel=9), "larger than the padded input"),
    (dict(dtype=torch.int64), "float32, float16, bfloat16 or float64"),
    (dict(weight_dtype=torch.float64), "must have the dtype and device of 'x'"),
    (dict(activation="gelu"), "unknown activation 'gelu'"),
])
def test_bad_input_is_refused_with_a_clear_message(bad, message):
    x = torch.randn(1, 3, 5, 5).to(bad.get("dtype", torch.float32))
    k = bad.get("kernel", 3)
    weight = torch.randn(*bad.get("weight_shape", (3, 1, k, k))).to(
        bad.get("weight_dtype", torch.float32 if x.is_floating_point() else x.dtype))
    with pytest.raises((ValueError, TypeError), match=message):
        with torch.no_grad():
            ops.depthwise_conv2d(x, weight, None, bad.get("stride", 1), bad.get("padding", 0),
                                 activation=bad.get("activation", "identity"))


def test_compiled_op_checks_arguments_too():
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(RuntimeError, match="not a positive multiple of the 3 input channels"):
        torch.ops.cnnkernels.depthwise_conv2d(x, torch.randn(4, 1, 3, 3), None, [1, 1], [1, 1],
                                              [1, 1])
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        torch.ops.cnnkernels.depthwise_conv2d(x, torch.randn(3, 1, 7, 7), None, [1, 1], [0, 0],
                                              [1, 1])


# --- the layer -----------------------------------------------------------------------------------

@pytest.mark.parametrize("multiplier, bias", [(1, True), (2, False)])
def test_layer_is_a_drop_in_for_grouped_conv2d(impl, multiplier, bias):
    needs_kernel(impl)
    conv = torch.nn.Conv2d(4, 4 * multiplier, 3, stride=2, padding=1, groups=4, bias=bias,
                           device=impl[1])
    ours = cnnkernels.nn.DepthwiseConv2d.from_conv(conv)
    assert ours.state_dict().keys() == conv.state_dict().keys()
    fresh = cnnkernels.nn.DepthwiseConv2d(4, 3, stride=2, padding=1, bias=bias,
                                          channel_multiplier=multiplier, device=impl[1])
    fresh.load_state_dict(conv.state_dict())  # checkpoints load both ways
    conv.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 9, 9, device=impl[1])
    torch.testing.assert_close(ours(x), conv(x), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(fresh(x), conv(x), rtol=2e-5, atol=2e-5)
    back = ours.to_conv()
    assert isinstance(back, torch.nn.Conv2d) and back.groups == 4
    torch.testing.assert_close(back(x), conv(x))


def test_layer_from_conv_rejects_dense_convolutions():
    with pytest.raises(TypeError, match="groups == in_channels"):
        cnnkernels.nn.DepthwiseConv2d.from_conv(torch.nn.Conv2d(4, 4, 3))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = torch.nn.Sequential(cnnkernels.nn.DepthwiseConv2d(4, 3, padding=1),
                                cnnkernels.nn.HardSwish(),
                                cnnkernels.nn.DepthwiseConv2d(4, 5, stride=2, padding=2))
    x = torch.randn(2, 4, 11, 11, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    out, ref = compiled(x), model(x)
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out.sum(), [x, *model.parameters()]),
                         torch.autograd.grad(ref.sum(), [x, *model.parameters()])):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
def test_cpu_instruction_set_copies_agree(tmp_path):
    """The channel-blocked float32 kernels are compiled for AVX-512 and for AVX2, over portable
    kernels for CPUs with neither; ATEN_CPU_CAPABILITY caps ours as it caps ATen's. The AVX2 copy
    must give bit for bit what the best copy gives (the same sums in the same order; on an AVX2
    CPU both runs take it), and the portable kernels the same values within rounding (they
    multiply and add where the blocked kernels fuse, so some bits must differ)."""
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    from cpu_isa_worker import run_capped
    best, avx2, portable = (run_capped("depthwise", cap, tmp_path) for cap in (None, "avx2", "default"))
    assert portable["cpu_isa"] == "default"
    assert avx2["cpu_isa"] == ("avx2" if best["cpu_isa"] != "default" else "default")
    for case, want in best["results"].items():
        assert len(want) == len(portable["results"][case]) == len(avx2["results"][case])
        for index, (fast, slow) in enumerate(zip(want, portable["results"][case])):
            torch.testing.assert_close(fast, slow, rtol=2e-5, atol=2e-5, msg=f"{case} #{index}")
        for index, (a, b) in enumerate(zip(want, avx2["results"][case])):
            assert torch.equal(a, b), f"{case} result #{index}: AVX2 differs from {best['cpu_isa']}"
    if best["cpu_isa"] != "default":
        assert any(not torch.equal(a, b) for case, want in best["results"].items()
                   for a, b in zip(want, portable["results"][case])), \
            "the capped process ran the same kernels (ATEN_CPU_CAPABILITY ignored?)"


def test_eager_calls_record_the_cpp_autograd_node():
    """The compiled op's autograd is C++ (csrc/autograd/depthwise_conv2d.cpp): no Python frame per
    call, forward or backward."""
    if not cnnkernels.info()["cpu_ext"]:
        pytest.skip("the C++ extension is not built")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y = cnnkernels.ops.depthwise_conv2d(x, torch.randn(3, 1, 3, 3), None, 1, 1)
    assert "DepthwiseFunction" in y.grad_fn.name()
