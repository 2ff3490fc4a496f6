"""`cnnkernels memory models`: saved activations of converted torchvision models against the
originals (exact and device-independent), the largest-batch estimate, the command line."""
from __future__ import annotations

import json

import pytest
import torch

from cnnkernels import memory_models, profile
from cnnkernels.cli import main
from cnnkernels.models_bench import build

pytest.importorskip("torchvision")

# converted / plain saved bytes at 224x224, float32; bytes per sample do not depend on the batch
# (the per-channel vectors aside), so batch 1 stands for batch 8. A ResNet block must still keep
# its three BN inputs (BatchNorm's backward needs the normalised input everywhere, and a ReLU
# output cannot give it back where it clipped) and its output (the next block's conv input).
SAVED_RATIO_AT_MOST = {"mobilenet_v2": 0.60, "mobilenet_v3_large": 0.60, "resnet50": 0.85,
                       "densenet121": 0.30}


def _saved_ratio(name: str, image: int = 224) -> float:
    plain, converted, _ = build(name, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 3, image, image)
    return profile.saved_activation_bytes(converted.train(), x) / \
        profile.saved_activation_bytes(plain.train(), x)


@pytest.mark.parametrize("name", SAVED_RATIO_AT_MOST)
def test_converted_models_keep_less_activation_memory(name):
    assert _saved_ratio(name) <= SAVED_RATIO_AT_MOST[name]


def test_parse_bytes():
    assert memory_models.parse_bytes("16GiB") == 16 * 2**30
    assert memory_models.parse_bytes("512 MiB") == 512 * 2**20
    assert memory_models.parse_bytes("8GB") == 8 * 10**9
    assert memory_models.parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="16GiB"):
        memory_models.parse_bytes("lots")


def test_largest_batch_leaves_room_for_weights_and_optimizer_state():
    assert memory_models.largest_batch(100.0, 10, 1040) == 10  # (1040 - 4 * 10) / 100
    assert memory_models.largest_batch(100.0, 1000, 1040) == 0


def test_memory_models_command_writes_rows_and_plot(tmp_path, capsys):
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    assert main(["memory", "models", "--models", "mobilenet_v3_small", "--batch-size", "2",
                 "--image-size", "64", "--device", "cpu", "--budget", "1GiB", "--json", str(out),
                 "--plot", str(png)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "mobilenet_v3_small" and row["batch"] == 2
    assert 0 < row["saved_ratio"] < 1
    assert row["peak_mib_plain"] > 0 and row["peak_mib_converted"] > 0
    assert row["largest_batch_converted"] > row["largest_batch_plain"] > 0
    assert png.stat().st_size > 0
    assert "mobilenet_v3_small" in capsys.readouterr().out


def test_memory_models_refuses_a_bad_budget_and_an_unknown_model(capsys):
    with pytest.raises(SystemExit):
        main(["memory", "models", "--budget", "lots"])
    assert "--budget" in capsys.readouterr().err
    assert main(["memory", "models", "--models", "no_such_net", "--device", "cpu"]) == 2
    assert "no_such_net" in capsys.readouterr().err
