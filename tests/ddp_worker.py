"""One rank of the 2-process DDP test (tests/test_distributed.py runs two of these).

Usage: python ddp_worker.py RANK WORLD INIT_FILE OUT. Each rank builds torchvision's
mobilenet_v3_small and its cnnkernels.convert'ed copy (float64, same weights), wraps both in
DistributedDataParallel (gloo, CPU), trains each for three SGD steps on this rank's batches and
saves both state_dicts."""
import sys

import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel

import cnnkernels

STEPS = 3


def batches(rank):
    g = torch.Generator().manual_seed(1000 + rank)
    return [(torch.randn(3, 3, 48, 48, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (3,), generator=g)) for _ in range(STEPS)]


def train(model, rank):
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for x, target in batches(rank):
        optimizer.zero_grad()
        torch.manual_seed(7)  # the same dropout mask in both models
        torch.nn.functional.cross_entropy(ddp(x), target).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        plain = torchvision.models.mobilenet_v3_small(num_classes=10).double()
        converted = cnnkernels.convert(plain)
        torch.save({"plain": train(plain, rank), "converted": train(converted, rank)}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
