"""Runs CPU kernels on fixed inputs and saves every result, in a process whose instruction sets
ATEN_CPU_CAPABILITY caps (our kernels honour it as ATen's do): the tests start it with and without
the cap and compare, so one machine checks every compiled copy of a kernel.

Usage: python cpu_isa_worker.py KIND OUT, KIND one of KINDS. Saves {"capability": what torch
reports, "cpu_isa": the copy of our kernels that ran, "results": {case: [tensors]}}."""
import os
import subprocess
import sys

import torch

import cnnkernels
from cnnkernels import ops

ACTS = ["identity", "relu", "relu6", "leaky_relu", "hardswish", "hardsigmoid"]
# (N, C, H, W, kernel, stride, padding, dilation): channels past one block of 16 with a partial
# second (and third) block, both halves of an AVX2 block; 14x14 and 7x7 planes; a row long enough
# for several register runs of output pixels; strides and dilation that take the scatter backward.
CASES = [(2, 20, 14, 14, 3, 1, 1, 1), (1, 35, 7, 7, 5, 1, 2, 1), (2, 9, 15, 13, 3, 2, 1, 1),
         (1, 24, 12, 29, 7, 1, 3, 1), (1, 17, 11, 10, 3, 1, 2, 2), (1, 33, 9, 9, 3, 2, 0, 1)]


def values(*shape, generator):
    """Random float32 values that every process draws alike: torch.randn's CPU kernels are
    compiled per instruction set, and round differently under a cap."""
    return torch.randint(-2048, 2048, shape, generator=generator).float() / 1024


def results(case, channels_last):
    n, c, h, w, k, s, p, d = case
    g = torch.Generator().manual_seed(sum(case))
    x = values(n, c, h, w, generator=g)
    weight = values(c, 1, k, k, generator=g) / k
    bias, shift = values(c, generator=g), values(c, generator=g)
    scale = values(c, generator=g).abs() + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = [ops.depthwise_conv2d(x, weight, bias, s, p, d, scale=scale, shift=shift,
                                    activation=act, negative_slope=0.2) for act in ACTS]
    x.requires_grad_(), weight.requires_grad_()
    y = ops.depthwise_conv2d(x, weight, None, s, p, d)
    out += torch.autograd.grad(y, (x, weight), values(*y.shape, generator=g).to(y))
    return out


def depthwise():
    """{case: [forward with each activation's epilogue, grad_input, grad_weight]}."""
    return {f"{case}-{'cl' if cl else 'nchw'}": results(case, cl)
            for case in CASES for cl in (False, True)}


def layout():
    """{shape: [contiguous_from_channels_last of a channel slice, copy_to_channels_last_ into
    one]}: channel counts with partial 8- and 16-channel blocks, pixel counts with partial tiles."""
    from cnnkernels.ops.layout import copy_to_channels_last_
    saved = {}
    for shape in [(2, 37, 5, 7), (1, 20, 9, 9), (3, 5, 4, 3), (1, 64, 23, 23)]:
        n, c, h, w = shape
        g = torch.Generator().manual_seed(c)
        base = values(n, c + 6, h, w, generator=g).contiguous(memory_format=torch.channels_last)
        out = torch.zeros_like(base)
        copy_to_channels_last_(out[:, 3:3 + c], values(n, c, h, w, generator=g))
        saved[str(shape)] = [ops.contiguous_from_channels_last(base[:, 3:3 + c]), out]
    # whole aligned 16-channel rows, and more than 32 MiB moved: the streaming stores
    big = values(1, 64, 256, 264, generator=torch.Generator().manual_seed(1))
    out = torch.empty_like(big, memory_format=torch.channels_last)
    saved["streamed"] = [copy_to_channels_last_(out, big)]
    return saved


KINDS = {"depthwise": depthwise, "layout": layout}


def run_capped(kind, capability, tmp_path):
    """The results of KINDS[kind] in a process capped at `capability` (None: uncapped)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = tmp_path / f"{kind}-{capability}.pt"
    subprocess.run([sys.executable, __file__, kind, str(out)], env=env, check=True, timeout=300)
    return torch.load(out)


def main(kind, path):
    torch.set_num_threads(2)
    saved = {name: [t.contiguous() for t in tensors] for name, tensors in KINDS[kind]().items()}
    torch.save({"capability": torch.backends.cpu.get_cpu_capability(),
                "cpu_isa": cnnkernels.info()["cpu_isa"], "results": saved}, path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
