"""One rank of the 2-process SyncBN test (tests/test_batch_norm_act.py runs two of these).

Usage: python syncbn_worker.py RANK WORLD INIT_FILE OUT. Each rank trains BatchNormAct2d with
process_group=WORLD on its half of a fixed batch for two steps and saves what it computed."""
import sys

import torch
import torch.distributed as dist

from cnnkernels.nn import BatchNormAct2d
from cnnkernels.ops.batch_norm_act import WORLD


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 5, 6, 7, generator=g) * 2 + 1
    return x, torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)


def make_module(process_group=None, layout=torch.contiguous_format):
    torch.manual_seed(0)
    module = BatchNormAct2d(5, activation="hardswish", process_group=process_group)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-1, 1)
    return module


def run(module, rank, world, layout):
    results = []
    for step in range(2):
        x, residual, grad = (t.chunk(world)[rank].contiguous(memory_format=layout) for t in batch(step))
        x.requires_grad_()
        residual.requires_grad_()
        module.zero_grad()
        y = module(x, residual)
        y.backward(grad)
        results.append({"y": y.detach(), "x.grad": x.grad, "residual.grad": residual.grad,
                        "weight.grad": module.weight.grad.clone(),
                        "bias.grad": module.bias.grad.clone(),
                        "running_mean": module.running_mean.clone(),
                        "running_var": module.running_var.clone()})
    return results


def main(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layouts = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
        torch.save({name: run(make_module(WORLD), rank, world, layout)
                    for name, layout in layouts.items()}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
