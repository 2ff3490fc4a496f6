"""A cnnkernels.convert'ed model under DistributedDataParallel (2 gloo processes on the CPU) trains
exactly as the unconverted one: after three SGD steps every parameter and buffer matches (float64)
on each rank, and both ranks hold the same parameters (running statistics are per rank after the
last step: DDP broadcasts rank 0's buffers at the start of each forward, as with plain BatchNorm)."""
import pytest
import torch


def test_ddp_training_stays_in_sync_with_the_unconverted_model(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    import ddp_worker

    from conftest import run_ranks

    ranks = run_ranks(ddp_worker.__file__, 2, tmp_path)
    plain, converted = ranks[0]["plain"], ranks[0]["converted"]
    assert list(plain) == list(converted)  # same keys
    initial = torchvision.models.mobilenet_v3_small(num_classes=10)
    moved = 0
    for key, value in plain.items():
        is_buffer = key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        for rank in ranks:
            torch.testing.assert_close(rank["converted"][key], rank["plain"][key], rtol=1e-9,
                                       atol=1e-10, msg=key)
            if not is_buffer:  # DDP keeps the parameters identical across ranks
                assert torch.equal(rank["plain"][key], value), key
                assert torch.equal(rank["converted"][key], converted[key]), key
        moved += not torch.equal(value.to(initial.state_dict()[key].dtype), initial.state_dict()[key])
    assert moved > len(plain) // 2  # training changed the model (the check is not vacuous)
