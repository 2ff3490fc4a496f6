"""The roofline model of `cnnkernels bench kernels`: exact bytes and FLOPs per op, the GPU table,
and the "% of roofline" column, exercised on the CPU with a GPU name faked."""
import json

import pytest
import torch

from cnnkernels import cli, roofline
from cnnkernels.cases import Case

H100_NAME = "NVIDIA H100 80GB HBM3"  # what torch.cuda.get_device_name() reads on an H100 SXM


def test_elementwise_ops_move_two_passes_forward_and_five_with_backward():
    case = Case("hardswish", (32, 96, 56, 56), "reference size")
    numel = 32 * 96 * 56 * 56
    assert roofline.work(case, "fwd", 4) == roofline.Work(2 * numel * 4, 0)
    assert roofline.work(case, "fwd+bwd", 4) == roofline.Work(192_675_840, 0)
    assert roofline.work(Case("batch_norm_act", (32, 96, 56, 56), ""), "fwd", 2).bytes == \
        2 * numel * 2


def test_depthwise_counts_input_output_weight_and_the_multiply_adds():
    case = Case("depthwise_conv2d", (32, 144, 56, 56), "MobileNetV2 block 3", kernel=3, stride=1)
    forward = roofline.work(case, "fwd", 4)
    # x and y 32x144x56x56 each, weight 144x3x3; 9 multiply-adds per output
    assert forward == roofline.Work(115_610_688, 260_112_384)
    # + grad, x, weight read; dx, dweight written; dx and dweight cost as much as y each
    assert roofline.work(case, "fwd+bwd", 4) == roofline.Work(289_029_312, 780_337_152)


def test_strided_depthwise_output_is_the_padded_convolution_size():
    case = Case("depthwise_conv2d", (32, 96, 112, 112), "", kernel=3, stride=2)
    x, y, weight = 32 * 96 * 112 * 112, 32 * 96 * 56 * 56, 96 * 9
    assert roofline.work(case, "fwd", 2) == roofline.Work((x + weight + y) * 2, 2 * y * 9)


def test_pointwise_is_a_gemm_with_residual_and_training_passes():
    case = Case("pointwise_conv2d", (32, 1024, 14, 14), "ResNet-50 layer3 conv1", kernel=256)
    pixels = 32 * 14 * 14
    assert roofline.work(case, "fwd", 4) == roofline.Work(
        33_161_216, 2 * pixels * 1024 * 256, on_tensor_cores=True)
    x, w, y = pixels * 1024, 1024 * 256, pixels * 256
    assert roofline.work(case, "fwd+bwd", 4) == roofline.Work(
        (3 * x + 3 * w + 2 * y) * 4, 3 * 2 * pixels * 1024 * 256, on_tensor_cores=True)
    projection = Case("pointwise_conv2d", (32, 144, 56, 56), "", kernel=24, residual=True)
    x, w, y = 32 * 144 * 56 * 56, 144 * 24, 32 * 24 * 56 * 56
    assert roofline.work(projection, "fwd", 4).bytes == (x + w + 2 * y) * 4  # residual read


def test_strided_pointwise_reads_only_the_pixels_it_samples():
    case = Case("pointwise_conv2d", (8, 64, 56, 56), "", kernel=128, stride=2)
    sampled, w, y = 8 * 64 * 28 * 28, 64 * 128, 8 * 128 * 28 * 28
    assert roofline.work(case, "fwd", 4).bytes == (sampled + w + y) * 4
    full_dx = 8 * 64 * 56 * 56
    assert roofline.work(case, "fwd+bwd", 4).bytes == \
        ((sampled + w + y) + (y + sampled + w + full_dx + w)) * 4


def test_squeeze_excite_counts_both_weights_and_both_small_gemms():
    case = Case("squeeze_excite", (32, 960, 7, 7), "MobileNetV3-L block 14 SE", kernel=240)
    assert roofline.work(case, "fwd", 4) == roofline.Work(13_885_440, 29_491_200, True)
    assert roofline.work(case, "fwd+bwd", 4) == roofline.Work(35_635_200, 88_473_600, True)


def test_unknown_op_or_pass_is_a_clear_error():
    with pytest.raises(ValueError, match="no roofline model for op 'conv3d'"):
        roofline.work(Case("conv3d", (1, 1, 1, 1), ""), "fwd", 4)
    with pytest.raises(ValueError, match="unknown pass 'bwd'"):
        roofline.work(Case("hardswish", (1, 1, 1, 1), ""), "bwd", 4)


@pytest.mark.parametrize("name, expected", [
    (H100_NAME, roofline.H100_SXM),
    ("NVIDIA H200", roofline.H200), ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
    ("NVIDIA H200 NVL", None), ("NVIDIA A100-SXM4-80GB", None), ("", None)])
def test_gpu_table_matches_by_name_and_leaves_other_parts_unknown(name, expected):
    assert roofline.peaks_for(name) is expected


def test_device_peaks_reads_the_cuda_device_name_and_is_none_on_cpu(monkeypatch):
    assert roofline.device_peaks(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert roofline.device_peaks(torch.device("cuda", 0)) is roofline.H200


def test_lower_bound_is_the_slower_of_bytes_and_flops():
    case = Case("pointwise_conv2d", (32, 1024, 14, 14), "", kernel=256)
    flops = 2 * 32 * 14 * 14 * 1024 * 256
    # float32: 102 FLOP per byte, above the ridge (20): compute bound at 67 TFLOP/s
    fp32 = roofline.work(case, "fwd", 4)
    assert roofline.lower_bound_s(fp32, roofline.H100_SXM, torch.float32) == \
        pytest.approx(flops / 67e12)
    # bfloat16 GEMM on the tensor cores: memory bound at 3.35 TB/s, and faster still on an H200
    bf16 = roofline.work(case, "fwd", 2)
    assert roofline.lower_bound_s(bf16, roofline.H100_SXM, torch.bfloat16) == \
        pytest.approx(16_580_608 / 3.35e12)
    assert roofline.lower_bound_s(bf16, roofline.H200, torch.bfloat16) == \
        pytest.approx(16_580_608 / 4.8e12)


def test_depthwise_in_bf16_is_held_to_the_cuda_core_rate():
    case = Case("depthwise_conv2d", (32, 768, 7, 7), "", kernel=7)
    done = roofline.work(case, "fwd", 2)
    assert not done.on_tensor_cores
    assert roofline.lower_bound_s(done, roofline.H100_SXM, torch.bfloat16) == pytest.approx(
        max(done.bytes / 3.35e12, done.flops / 67e12))


def test_row_gives_each_side_its_fraction_and_names_the_bound():
    case = Case("hardswish", (32, 96, 56, 56), "")
    floor = 77_070_336 / 4.8e12
    medians = {"torch": 4 * floor, "cnnkernels[cuda]": 2 * floor, "copy": floor}
    roof = roofline.row(case, "fwd", torch.float32, roofline.H200, medians)
    assert roof["gpu"] == "H200" and roof["bound"] == "memory"
    assert roof["bytes"] == 77_070_336 and roof["flops"] == 0
    assert roof["lower_bound_s"] == pytest.approx(floor)
    assert roof["fraction"] == pytest.approx({"torch": 0.25, "cnnkernels[cuda]": 0.5})


def test_cells_and_header_of_the_printed_table():
    roof = {"fraction": {"torch": 0.423, "cnnkernels[triton]": 1.07, "torch.compile": 0.004}}
    assert roofline.cell(roof, "torch") == "    42%"
    assert roofline.cell(roof, "torch.compile") == "   0.4%"
    assert roofline.cell(roof, "cnnkernels[triton]") == "   107%"
    assert roofline.cell(roof, "cnnkernels[cuda]") == "      -"
    assert roofline.cell(None, "torch") == ""
    assert roofline.header(roofline.H100_SXM) == "  %roof" and roofline.header(None) == ""
    assert "3.35 TB/s" in roofline.legend(roofline.H100_SXM)


def test_bench_kernels_prints_and_writes_the_roofline_on_a_known_gpu(tmp_path, capsys, monkeypatch):
    # The CPU timings stand in for a GPU's: only the column logic is under test here.
    monkeypatch.setattr(roofline, "device_peaks", lambda device: roofline.peaks_for(H100_NAME))
    out = tmp_path / "kernels.json"
    assert cli.main(["bench", "kernels", "--ops", "hardswish", "--quick", "--batch", "1",
                     "--reps", "1", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    header = next(line for line in printed.splitlines() if line.startswith("op "))
    assert header.count("%roof") == 1 + len(results["sides"])  # eager and each of ours
    assert "%roof = lower-bound time / measured time" in printed
    assert results["roofline_peaks"]["name"] == "H100 SXM"
    for row in results["results"]:
        roof = row["roofline"]
        assert roof["fraction"]["torch"] == pytest.approx(
            roof["lower_bound_s"] / row["median_s"]["torch"])
        assert set(roof["fraction"]) == set(row["median_s"])
    from cnnkernels import report
    table = report.markdown_table(results)
    assert "| torch % of roofline |" in table and table.count("%") > len(results["results"])


def test_bench_kernels_has_no_roofline_on_cpu(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert cli.main(["bench", "kernels", "--ops", "hardsigmoid", "--quick", "--batch", "1",
                     "--reps", "1", "--device", "cpu", "--json", str(out)]) == 0
    assert "%roof" not in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["roofline_peaks"] is None
    assert all("roofline" not in row for row in results["results"])
