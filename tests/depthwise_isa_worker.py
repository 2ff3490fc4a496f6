"""Runs the CPU depthwise kernels on fixed inputs and saves every result (tests/test_depthwise_conv2d.py
starts it with and without ATEN_CPU_CAPABILITY, which caps the instruction set our kernels use).

Usage: python depthwise_isa_worker.py OUT. Saves {case: [forward with each activation's epilogue,
grad_input, grad_weight]} and the capability torch reports."""
import sys

import torch

from cnnkernels import ops

ACTS = ["identity", "relu", "relu6", "leaky_relu", "hardswish", "hardsigmoid"]
# (N, C, H, W, kernel, stride, padding, dilation): channels past one block of 16 with a partial
# second (and third) block, both halves of an AVX2 block; 14x14 and 7x7 planes; a row long enough
# for several register runs of output pixels; strides and dilation that take the scatter backward.
CASES = [(2, 20, 14, 14, 3, 1, 1, 1), (1, 35, 7, 7, 5, 1, 2, 1), (2, 9, 15, 13, 3, 2, 1, 1),
         (1, 24, 12, 29, 7, 1, 3, 1), (1, 17, 11, 10, 3, 1, 2, 2), (1, 33, 9, 9, 3, 2, 0, 1)]


def results(case, channels_last):
    n, c, h, w, k, s, p, d = case
    g = torch.Generator().manual_seed(sum(case))
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(c, 1, k, k, generator=g) / k
    bias, scale, shift = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = [ops.depthwise_conv2d(x, weight, bias, s, p, d, scale=scale, shift=shift,
                                    activation=act, negative_slope=0.2) for act in ACTS]
    x.requires_grad_(), weight.requires_grad_()
    y = ops.depthwise_conv2d(x, weight, None, s, p, d)
    out += torch.autograd.grad(y, (x, weight), torch.randn(y.shape, generator=g).to(y))
    return [t.contiguous() for t in out]


def main(path):
    torch.set_num_threads(2)
    saved = {f"{case}-{'cl' if cl else 'nchw'}": results(case, cl)
             for case in CASES for cl in (False, True)}
    torch.save({"capability": torch.backends.cpu.get_cpu_capability(), "results": saved}, path)


if __name__ == "__main__":
    main(sys.argv[1])
