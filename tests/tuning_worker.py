"""One rank of the 2-process tuning test (tests/test_tuning.py): each rank's timing is made to
disagree (rank 0: PyTorch faster, rank 1: ours), and a converted MobileNetV3-Small trains two SGD
steps under DistributedDataParallel; saves the choices and the state_dict.

Usage: python tuning_worker.py RANK WORLD INIT_FILE OUT."""
import os
import sys

import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel

import cnnkernels
from cnnkernels import tuning


def main(rank, world, init_file, out):
    os.environ["CNNKERNELS_CACHE_DIR"] = os.path.join(os.path.dirname(out), f"cache{rank}")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tuning.set_tuning("auto")
        faster = {"ours": 1.0, "torch": 0.5} if rank == 0 else {"ours": 0.5, "torch": 1.0}
        tuning.time_candidates = lambda layer, x, grad: dict(faster)
        torch.manual_seed(0)
        model = cnnkernels.convert(torchvision.models.mobilenet_v3_small(num_classes=10)).double()
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(1000 + rank)
        for _ in range(2):
            x = torch.randn(2, 3, 48, 48, generator=g, dtype=torch.float64)
            optimizer.zero_grad()
            torch.manual_seed(7)
            ddp(x).square().mean().backward()
            optimizer.step()
        choices = [row["choice"] for row in tuning.decisions_of(model)]
        torch.save({"choices": choices, "state": model.state_dict()}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
