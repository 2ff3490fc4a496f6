"""The command line: info, bench kernels, and one-line errors with exit code 2."""
import json
import re
import subprocess
import sys

import pytest
import torch

import cnnkernels
from cnnkernels import cli


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cnnkernels", *args], capture_output=True,
                          text=True, timeout=300)


def test_info_prints_and_writes_json(tmp_path):
    result = run_cli("info", "--json", str(tmp_path / "info.json"))
    assert result.returncode == 0, result.stderr
    assert "cpu_ext" in result.stdout and "backend" in result.stdout
    assert json.loads((tmp_path / "info.json").read_text())["cpu_ext"] is True


def test_bench_kernels_writes_ratios(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert cli.main(["bench", "kernels", "--quick", "--ops", "hardsigmoid", "--reps", "2",
                     "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "hardsigmoid" in printed
    rows = json.loads(out.read_text())["results"]
    assert {row["direction"] for row in rows} == {"fwd", "fwd+bwd"}
    for row in rows:
        assert row["speedup_vs_torch"]["cnnkernels[cpu]"] > 0
        assert row["median_s"]["torch"] > 0


def test_bench_models_checks_outputs_and_prints_ratios(tmp_path, capsys):
    pytest.importorskip("torchvision")
    out = tmp_path / "models.json"
    assert cli.main(["bench", "models", "--models", "mobilenet_v3_large", "--batch", "1",
                     "--image-size", "64", "--reps", "1", "--device", "cpu",
                     "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mobilenet_v3_large   inference" in printed and "46 conv_bn_act" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["direction"] for r in rows] == ["inference", "training"]
    assert all(r["speedup"] > 0 and r["relative_output_error"] < 1e-3 for r in rows)


def test_bench_models_compile_times_torch_compile_of_the_plain_model(tmp_path, capsys,
                                                                     monkeypatch):
    """--compile adds torch.compile of the plain and of the converted model (here with Dynamo's
    eager backend: Inductor would take minutes per model on a 2-core CI machine)."""
    pytest.importorskip("torchvision")
    from cnnkernels import profile

    compiled = []
    real = profile.compile_fresh

    def compile_eagerly(fn, **options):
        compiled.append(fn)
        return real(fn, backend="eager")

    monkeypatch.setattr(profile, "compile_fresh", compile_eagerly)
    out = tmp_path / "models.json"
    assert cli.main(["bench", "models", "--models", "mobilenet_v3_large", "--batch", "2",
                     "--image-size", "32", "--reps", "1", "--device", "cpu", "--compile",
                     "--json", str(out)]) == 0
    assert [type(m).__name__ for m in compiled] == ["MobileNetV3", "MobileNetV3"]
    assert not any(isinstance(m, cnnkernels.nn.InvertedResidual) for m in compiled[0].modules())
    assert any(isinstance(m, cnnkernels.nn.InvertedResidual) for m in compiled[1].modules())
    printed = capsys.readouterr().out
    assert "vs compile" in printed and "c(ours)/c" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["direction"] for r in rows] == ["inference", "training"]
    assert all(r["median_s"]["torch.compile"] > 0 and r["speedup_vs_compile"] > 0 and
               r["compiled_converted_vs_compiled_plain"] > 0 for r in rows)


def test_convert_prints_report_check_and_timings(tmp_path, capsys):
    pytest.importorskip("torchvision")
    out = tmp_path / "convert.json"
    assert cli.main(["convert", "torchvision:mobilenet_v3_small", "--batch", "1", "--image-size",
                     "64", "--reps", "1", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "replaced: 34 conv_bn_act, 11 inverted_residual, 9 squeeze_excite, 1 hardswish" in printed
    assert "outputs match" in printed
    assert [r["direction"] for r in json.loads(out.read_text())["rows"]] == ["inference", "training"]


@pytest.mark.parametrize("args, message", [
    (("bench", "kernels", "--ops", "bogus"), "argument --ops: unknown op bogus"),
    (("convert", "resnet18"), "MODEL must be torchvision:<name>"),
    (("convert", "torchvision:nope"), "torchvision has no model 'nope'"),
    (("convert", "torchvision:resnet18", "--include", "gelu"), "--include: unknown kind gelu"),
    (("bench", "models", "--models", "lenet"), "--models: unknown model lenet"),
])
def test_errors_are_one_line_with_exit_code_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_overhead_times_every_op_and_layer_kind_in_both_modes(tmp_path, capsys):
    """Every op and converted layer kind, eval and training, ours and eager side by side; the
    layers were checked against the eager modules they replace before timing."""
    out = tmp_path / "overhead.json"
    assert cli.main(["bench", "overhead", "--quick", "--reps", "1", "--device", "cpu",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["kind"], r["name"], r["mode"]): r for r in result["rows"]}
    ops = {"hardswish", "hardsigmoid", "depthwise_conv2d", "pointwise_conv2d", "batch_norm_act",
           "squeeze_excite"}
    layers = {"HardSwish", "BatchNormAct2d", "BNActSequential", "ConvBNAct2d", "DepthwiseConv2d", "SqueezeExcite",
              "ResidualBlock", "InvertedResidual"}
    for mode in ("eval", "train"):
        assert {n for k, n, m in rows if k == "op" and m == mode} >= ops
        assert {n for k, n, m in rows if k == "layer" and m == mode} == layers
    assert ("op", "affine_act", "eval") in rows
    for r in result["rows"]:
        assert r["ours_us"] > 0 and r["eager_us"] > 0
        assert r["ratio"] == pytest.approx(r["ours_us"] / r["eager_us"])
    printed = capsys.readouterr().out
    assert "| layer | ConvBNAct2d | eval |" in printed


def test_report_quick_writes_markdown_json_and_plots(tmp_path):
    """`report --quick` on tiny shapes: every file exists and the tables parse."""
    out = tmp_path / "report"
    assert cli.main(["report", "--quick", "--batch", "1", "--reps", "1", "--device", "cpu",
                     "--ops", "hardswish,depthwise_conv2d", "--out", str(out),
                     "--densenet-depths", "10", "--densenet-batch", "2",
                     "--densenet-image-size", "8", "--models", "mobilenet_v3_large",
                     "--model-batch", "1", "--model-reps", "1",
                     "--json", str(tmp_path / "all.json")]) == 0
    combined = json.loads((tmp_path / "all.json").read_text())
    assert set(combined) == {"kernels", "densenet_memory", "models", "overhead", "models_memory"}
    results = json.loads((out / "kernels.json").read_text())
    assert {row["op"] for row in results["results"]} == {"hardswish", "depthwise_conv2d"}
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    text = full_text = (out / "report.md").read_text()
    text, memory_models_text = text.split("## Activation memory: plain vs `cnnkernels.convert`")
    (memory_row,) = [line for line in memory_models_text.splitlines()
                     if line.startswith("| mobilenet_v3_large")]
    ratio = float(memory_row.split("|")[4])
    assert ratio == pytest.approx(combined["models_memory"]["rows"][0]["saved_ratio"], abs=0.005)
    assert 0 < ratio < 1
    text, overhead_text = text.split("## Host overhead per call")
    overhead_rows = [line for line in overhead_text.splitlines() if line.startswith("| op ")]
    assert len(overhead_rows) == len([r for r in combined["overhead"]["rows"] if r["kind"] == "op"])
    text, models_text = text.split("## Models: plain vs `cnnkernels.convert`")
    model_rows = [line for line in models_text.splitlines() if line.startswith("| mobilenet_v3_large")]
    assert [row.split("|")[2].strip() for row in model_rows] == ["inference", "training"]
    assert len(json.loads((out / "models.json").read_text())["rows"]) == 2
    kernels_text, memory_text = text.split("## DenseNet memory")
    memory_rows = [line for line in memory_text.splitlines() if line.startswith("| 10 ")]
    assert [row.split("|")[3].strip() for row in memory_rows] == ["naive", "checkpoint", "shared"]
    assert len(json.loads((out / "densenet_memory.json").read_text())["rows"]) == 3
    table = [line for line in kernels_text.splitlines() if line.startswith("| ")]
    header, rows = table[0], table[1:]
    assert len(rows) == len(results["results"])
    assert all(row.count("|") == header.count("|") for row in rows)
    assert all(row.rstrip(" |").endswith("x") for row in rows)  # the speed-up column
    for png in pngs:
        assert f"]({png.name})" in full_text


def test_convert_timm_model_and_unknown_names(capsys):
    pytest.importorskip("timm")
    assert cli.main(["convert", "timm:mobilenetv3_large_100", "--batch", "1", "--image-size", "64",
                     "--reps", "1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "46 batchnorm_act" in printed and "outputs match" in printed
    assert cli.main(["convert", "timm:no_such_net"]) == 2
    assert "timm has no model 'no_such_net'" in capsys.readouterr().err
    assert cli.main(["convert", "keras:resnet50"]) == 2
    assert "MODEL must be torchvision:<name> or timm:<name>" in capsys.readouterr().err


def test_bench_kernels_bandwidth_column(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert cli.main(["bench", "kernels", "--ops", "batch_norm_act", "--quick", "--batch", "1",
                     "--reps", "1", "--device", "cpu", "--bandwidth", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cpu %copy" in printed and "%copy = (minimum bytes" in printed
    rows = json.loads(out.read_text())["results"]
    assert rows and all(r["fraction_of_copy"]["cnnkernels[cpu]"] > 0 for r in rows)
    assert rows[0]["min_bytes"] == 2 * 96 * 56 * 56 * 4  # eval: x read, y written


def test_info_for_a_device_and_forward_only_ops(tmp_path, capsys):
    out = tmp_path / "info.json"
    assert cli.main(["info", "--device", "cpu", "--json", str(out)]) == 0
    info = json.loads(out.read_text())
    assert info["device"] == "cpu" and info["auto_backend_there"] in ("cpu", "torch")
    capsys.readouterr()
    assert cli.main(["bench", "kernels", "--ops", "affine_act", "--quick", "--batch", "1",
                     "--reps", "1", "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("affine_act")]
    assert len(lines) == 2 and all(" fwd " in line for line in lines)  # no autograd: forward only


def test_bench_kernels_leaves_out_a_backend_without_that_kernel(tmp_path, capsys, monkeypatch):
    """On a GPU, depthwise_conv2d has a Triton kernel but no CUDA C++ one: its row shows '-' there
    instead of the whole run stopping (as it did on the first H100 run). Simulated here with a
    backend that cannot run on this machine at all."""
    from cnnkernels import report

    monkeypatch.setattr(cli, "_our_backends", lambda device: ["cpu", "cuda"])
    out = tmp_path / "kernels.json"
    assert cli.main(["bench", "kernels", "--ops", "hardsigmoid", "--quick", "--batch", "1",
                     "--reps", "1", "--device", "cpu", "--bandwidth", "--json", str(out)]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("hardsigmoid")]
    assert lines and all(l.split()[-1] == "-" and l.split()[-2].endswith("%") for l in lines)
    results = json.loads(out.read_text())
    for row in results["results"]:
        assert "cnnkernels[cuda]" not in row["median_s"]
        assert set(row["fraction_of_copy"]) == {"cnnkernels[cpu]"}
    table = report.markdown_table(results)
    assert "| - |" in table and "x | - |" in table
    report.speedup_plot(results, "fwd", str(tmp_path / "plot.png"))


def test_bench_kernels_stream_timing(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert cli.main(["bench", "kernels", "--ops", "hardswish", "--quick", "--batch", "1",
                     "--reps", "1", "--device", "cpu", "--timing", "stream", "--json", str(out)]) == 0
    assert f"{cli.STREAM_CALLS} back-to-back calls" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["timing"] == "stream" and results["calls_per_rep"] == cli.STREAM_CALLS
    assert all(r["median_s"]["cnnkernels[cpu]"] > 0 for r in results["results"])


def test_compile_fresh_compiles_every_case_of_the_same_closure():
    """Benchmark cases are closures over one code object: once Dynamo has compiled that frame
    recompile_limit times (here: tensors of a new rank each time, which no dynamic shape can
    cover) plain torch.compile runs the next cases eagerly, and a 'torch.compile' timing would
    time eager PyTorch; compile_fresh compiles each of them."""
    from cnnkernels.profile import compile_fresh

    compiled_graphs = []

    def counting_backend(graph, example_inputs):
        compiled_graphs.append(graph)
        return graph.forward

    def case(rank):
        x = torch.ones((2,) * rank)
        return lambda: x * 2 + 1

    limit = torch._dynamo.config.recompile_limit
    for rank in range(1, limit + 4):
        fn = case(rank)
        torch.testing.assert_close(compile_fresh(fn, backend=counting_backend)(), fn())
    assert len(compiled_graphs) == limit + 3


def run_in_process(args, capsys):
    """(exit code, stderr) of `cnnkernels ARGS` run in this process: argparse's mistakes exit
    through SystemExit, the commands' return 2."""
    try:
        code = cli.main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture
def no_work(monkeypatch):
    """Every benchmark, memory run and model build fails the test: a bad flag must be refused
    before any of them starts (a report used to reject --models only minutes in)."""
    def started(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for name in ("run_kernel_benchmarks", "run_memory_densenet", "run_model_benchmarks",
                 "_build_model"):
        monkeypatch.setattr(cli, name, started)


BAD_ARGUMENTS = [
    # (arguments, the flag the error line must name)
    (("memory", "densenet", "--batch-size", "0"), "--batch-size"),
    (("memory", "densenet", "--steps", "0"), "--steps"),
    (("memory", "densenet", "--growth-rate", "0"), "--growth-rate"),
    (("memory", "densenet", "--image-size", "0"), "--image-size"),
    (("memory", "densenet", "--image-size", "3"), "--image-size"),  # pooled to 0x0
    (("memory", "densenet", "--depths", "40,41"), "--depths"),
    (("memory", "densenet", "--depths", "4"), "--depths"),  # 6n + 4 with n = 0: no layers
    (("memory", "densenet", "--depths", "forty"), "--depths"),
    (("memory", "densenet", "--depths", ""), "--depths"),
    (("memory", "densenet", "--impls", "fast"), "--impls"),
    (("memory", "densenet", "--batch-size", "1", "--image-size", "4"), "--batch-size"),
    (("bench", "kernels", "--reps", "-3"), "--reps"),
    (("bench", "kernels", "--reps", "0"), "--reps"),
    (("bench", "kernels", "--batch", "0"), "--batch"),
    (("bench", "kernels", "--batch", "-2"), "--batch"),
    (("bench", "kernels", "--ops", ""), "--ops"),
    (("bench", "models", "--batch", "0"), "--batch"),
    (("bench", "models", "--batch", "-2"), "--batch"),
    (("bench", "models", "--reps", "0"), "--reps"),
    (("bench", "models", "--image-size", "0"), "--image-size"),
    (("bench", "models", "--models", ""), "--models"),
    (("convert", "torchvision:resnet18", "--batch", "0"), "--batch"),
    (("convert", "torchvision:resnet18", "--batch", "-2"), "--batch"),
    (("convert", "torchvision:resnet18", "--batch", "2.5"), "--batch"),
    (("convert", "torchvision:resnet18", "--image-size", "0"), "--image-size"),
    (("convert", "torchvision:resnet18", "--reps", "0"), "--reps"),
    (("convert", "torchvision:resnet18", "--include", "gelu"), "--include"),
    (("report", "--models", "bad"), "--models"),
    (("report", "--ops", "bogus"), "--ops"),
    (("report", "--reps", "0"), "--reps"),
    (("report", "--batch", "0"), "--batch"),
    (("report", "--densenet-depths", "41"), "--densenet-depths"),
    (("report", "--densenet-batch", "0"), "--densenet-batch"),
    (("report", "--densenet-growth-rate", "0"), "--densenet-growth-rate"),
    (("report", "--densenet-image-size", "0"), "--densenet-image-size"),
    (("report", "--densenet-batch", "1", "--densenet-image-size", "7"), "--densenet-batch"),
    (("report", "--model-batch", "0"), "--model-batch"),
    (("report", "--model-reps", "0"), "--model-reps"),
    (("info", "--json"), "--json"),
]


@pytest.mark.parametrize("args, flag", BAD_ARGUMENTS, ids=" ".join)
def test_bad_arguments_are_refused_before_any_work(args, flag, capsys, no_work):
    code, err = run_in_process(args, capsys)
    assert code == 2
    assert err.strip().count("\n") == 0, err
    assert re.search(rf"{re.escape(flag)}[: ]", err), err  # the flag itself, not --batch-size
    assert "Traceback" not in err


def test_explicit_values_are_kept_not_replaced_by_defaults(monkeypatch):
    """An explicit --reps 1 or --batch 1 must reach the benchmark as given (0 used to read as
    'unset' and silently become the default)."""
    seen = {}
    monkeypatch.setattr(cli, "run_model_benchmarks",
                        lambda names, args: seen.update(vars(args)) or {})
    assert cli.main(["bench", "models", "--models", "resnet50", "--batch", "1", "--reps", "1",
                     "--image-size", "16"]) == 0
    assert (seen["models"], seen["model_batch"], seen["model_reps"], seen["image_size"]) == (
        ["resnet50"], 1, 1, 16)


def test_info_json_into_a_missing_nested_folder(tmp_path, capsys):
    out = tmp_path / "not" / "yet" / "info.json"
    assert cli.main(["info", "--json", str(out)]) == 0
    assert "cpu_ext" in json.loads(out.read_text())


def test_json_where_a_file_blocks_the_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    code, err = run_in_process(["info", "--json", str(tmp_path / "a_file" / "info.json")], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "--json: cannot create" in err
    assert "Traceback" not in err


def test_memory_json_and_plot_into_missing_folders(tmp_path, capsys, monkeypatch):
    """The files are written after minutes of measurements: a missing folder must not lose them.
    (The measurements are replaced by a canned result here.)"""
    row = {"depth": 10, "impl": "naive", "params": 1, "peak_mib": 1.0, "saved_mib": 0.5,
           "step_s": 0.1, "peak_vs_naive": 1.0, "time_vs_naive": 1.0}
    monkeypatch.setattr(cli, "run_memory_densenet",
                        lambda args: {"title": "canned", "rows": [row]})
    json_path, plot_path = tmp_path / "j" / "k" / "memory.json", tmp_path / "p" / "memory.png"
    assert cli.main(["memory", "densenet", "--depths", "10", "--json", str(json_path),
                     "--plot", str(plot_path)]) == 0
    assert json.loads(json_path.read_text())["rows"] == [row]
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
