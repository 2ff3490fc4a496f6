"""The `cnnkernels` command line (also `python -m cnnkernels`).

    cnnkernels info                      what was built, the device, the active backend
    cnnkernels bench kernels [--quick]   our kernels vs PyTorch on shapes from real models
    cnnkernels bench models [--quick]    torchvision models, plain vs cnnkernels.convert-ed
    cnnkernels convert torchvision:NAME|timm:NAME  swap our layers in, show the report, check, time both
    cnnkernels memory densenet           DenseNet-BC memory and step time per memory mode
    cnnkernels memory models             activation and peak memory of models, plain vs converted
    cnnkernels report [--quick]          the kernels, written to report/report.md with JSON and plots
    cnnkernels kernels --target sm_90    every Triton and CUDA kernel compiled: registers, spills, occupancy
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, Sequence

import torch

from . import cases as bench_cases
from . import info as package_info
from . import profile, roofline, use_backend
from .backend import BackendUnavailableError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def _our_backends(device: torch.device) -> list[str]:
    info = package_info()
    if device.type == "cpu":
        return ["cpu"] if info["cpu_ext"] else ["torch"]
    return [b for b, ok in (("cuda", info["cuda_ext"]), ("triton", info["triton"])) if ok]


def _given_or(value, default):
    """`value` unless the flag was left out (None): an explicit value is never swapped for the
    default (the parse-time types have already refused 0 where it is meaningless)."""
    return default if value is None else value


def _make_parent_folder(path: str, flag: str) -> None:
    """Create the folders above an output file, so `--json out/run1/x.json` works on a fresh
    checkout; a folder that cannot be made is a one-line error naming the flag."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder or ".", exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag}: cannot create the folder {folder!r} for {path!r}: "
                         f"{err.strerror}") from None


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        _make_parent_folder(path, "--json")
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def cmd_info(args: argparse.Namespace) -> int:
    info = package_info()
    if args.device != "auto":  # what runs on that device: its name and the backend auto picks
        from . import backend

        device = _device(args.device)
        info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        info["auto_backend_there"] = backend.select(device, backend.ALL_KERNELS, "info")
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    _write_json(args.json, info)
    return 0


# --timing stream: calls per timed repetition, enough for the host to run ahead of the GPU
STREAM_CALLS = 20


def _bench_case(case, device, dtype, backends, direction, reps, with_compile, with_copy=False,
                calls_per_rep=1, channels_last=False):
    prepared = bench_cases.prepare(case, device, dtype, requires_grad=direction == "fwd+bwd",
                                   channels_last=channels_last)
    grad = None

    def timed(fn, backend="auto"):
        def run():
            nonlocal grad
            with use_backend(backend):
                y = fn()
                if direction == "fwd+bwd":
                    grad = torch.randn_like(y) if grad is None else grad
                    torch.autograd.grad(y, prepared.leaves, grad)
        return run

    fns = {"torch": timed(prepared.torch_fn)}
    if with_compile:
        fns["torch.compile"] = timed(profile.compile_fresh(prepared.torch_fn))
    for backend in backends:
        fn = timed(prepared.ours_fn, backend)
        try:
            fn()
        except BackendUnavailableError:  # e.g. no CUDA C++ depthwise kernel yet: leave it out
            continue
        fns[f"cnnkernels[{backend}]"] = fn
    if with_copy:  # the reference bandwidth: a copy of the input, timed in the same rounds
        source = prepared.leaves[0].detach()
        target = torch.empty_like(source)
        fns["copy"] = lambda: target.copy_(source)
    return profile.compare_times(fns, device, reps=reps, calls_per_rep=calls_per_rep)


def _bandwidth(case, direction, element_size, medians, ours) -> dict:
    """Achieved bandwidth of each of our sides, counting the op's minimum bytes, and as a fraction
    of a copy of the input measured in the same round-robin."""
    moved = bench_cases.min_bytes(case, direction, element_size)
    copy_rate = 2 * math.prod(case.shape) * element_size / medians["copy"]  # read + write
    rates = {s: moved / medians[s] for s in ours}
    return {"min_bytes": moved, "copy_bytes_per_s": copy_rate, "bytes_per_s": rates,
            "fraction_of_copy": {s: rate / copy_rate for s, rate in rates.items()}}


def run_kernel_benchmarks(args: argparse.Namespace) -> dict:
    """Time every selected case, printing one line per case; returns the JSON-ready results."""
    device, dtype = _device(args.device), _DTYPES[args.dtype]
    backends = _our_backends(device)
    selected = tuple(args.ops) if args.ops else bench_cases.known_ops()
    # convolutions at batch 8 on a CPU, where batch 32 takes seconds per layer and side
    todo = [case for op in selected for case in bench_cases.cases(
        (op,), quick=args.quick,
        batch=_given_or(args.batch, 8 if device.type == "cpu" and op.endswith("conv2d") else None))]
    reps = _given_or(args.reps, 10 if args.quick else 30)
    calls = STREAM_CALLS if args.timing == "stream" else 1
    info = package_info()
    steady = device.type == "cpu" and profile.keep_cpu_memory_mapped()
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"cnnkernels {info['version']} | torch {info['torch']} | {info['device']} | "
          f"{args.dtype} {layout} | median of {reps} round-robin repetitions of "
          + ("1 synchronised call" if calls == 1 else f"{calls} back-to-back calls")
          + (" | CPU heap kept mapped (no page faults in timings)" if steady else ""))
    rows = []
    peaks = roofline.device_peaks(device)  # None on a CPU or an unknown GPU: no roofline column
    header = f"{'op':<17} {'shape':<22} {'pass':<8} {'torch ms':>9}" + roofline.header(peaks)
    sides = (["torch.compile"] if args.compile else []) + [f"cnnkernels[{b}]" for b in backends]
    header += "".join(f" {s + ' ms':>20}{roofline.header(peaks)} {'speed-up':>9}" for s in sides)
    bandwidth = args.bandwidth if args.bandwidth is not None else device.type == "cuda"
    ours = [s for s in sides if s.startswith("cnnkernels[")]
    header += "".join(f" {s.split('[')[1][:-1] + ' %copy':>11}" for s in ours) if bandwidth else ""
    print(header)
    element_size = torch.empty(0, dtype=dtype).element_size()
    from .progress import progress

    for case in progress(todo, len(todo), "bench kernels", label=lambda c: f"{c.op} {c.label}"):
        for direction in bench_cases.directions(case.op):
            medians = _bench_case(case, device, dtype, backends, direction, reps, args.compile,
                                  with_copy=bandwidth, calls_per_rep=calls,
                                  channels_last=args.channels_last)
            roof = roofline.row(case, direction, dtype, peaks, medians) if peaks else None
            line = (f"{case.op:<17} {case.label:<22} {direction:<8} {medians['torch'] * 1e3:>9.3f}"
                    + roofline.cell(roof, "torch"))
            for side in sides:
                line += (f" {medians[side] * 1e3:>20.3f}{roofline.cell(roof, side)}"
                         f" {medians['torch'] / medians[side]:>8.2f}x"
                         if side in medians else f" {'-':>20}{roofline.cell(roof, side)} {'-':>9}")
            row = {"op": case.op, "shape": case.shape, "label": case.label,
                   "source": case.source, "kernel": case.kernel, "stride": case.stride,
                   "direction": direction, "dtype": args.dtype, "layout": layout,
                   "median_s": medians,
                   "speedup_vs_torch": {s: medians["torch"] / medians[s] for s in sides
                                        if s in medians}}
            if roof:
                row["roofline"] = roof
            if bandwidth:
                present = [s for s in ours if s in medians]
                row.update(_bandwidth(case, direction, element_size, medians, present))
                line += "".join(f" {row['fraction_of_copy'][s] * 100:>10.0f}%" if s in present
                                else f" {'-':>11}" for s in ours)
            print(line, flush=True)
            rows.append(row)
    print("speed-up = torch eager median / ours (> 1 means faster than PyTorch)")
    if bandwidth:
        print("%copy = (minimum bytes the op moves / our time) / (bytes of a copy of the input / "
              "its time), the copy timed in the same rounds")
    if peaks:
        print(roofline.legend(peaks))
    return {"info": info, "cpu_heap_kept": steady, "reps": reps, "timing": args.timing,
            "calls_per_rep": calls, "sides": sides, "results": rows,
            "roofline_peaks": vars(peaks) if peaks else None}


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    _write_json(args.json, run_kernel_benchmarks(args))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import report  # late: matplotlib is only needed here

    out_dir = args.out
    memory_args = _report_memory_args(args) if args.densenet_depths else None
    if memory_args is not None:  # before the kernels: a mistake must not surface minutes in
        _check_last_batch_norm(memory_args, "--densenet-batch", "--densenet-image-size")
    results = run_kernel_benchmarks(args)
    memory = None
    if memory_args is not None:
        memory = run_memory_densenet(memory_args)
        from . import memory as memory_module

        print(memory["title"])
        print(memory_module.format_table(memory["rows"]))
    models = run_model_benchmarks(args.models, args) if args.models else None
    overhead = None
    if args.overhead:
        overhead = run_overhead(argparse.Namespace(device=args.device, threads=None,
                                                   quick=args.quick, reps=None))
    memory_models = None
    if args.memory_models and args.models:
        memory_models = run_memory_models(argparse.Namespace(
            models=args.models, device=args.device, dtype=args.dtype, budget=args.memory_budget,
            batch_size=2 if args.quick else 8, image_size=128 if args.quick else 224))
    paths = report.write(results, out_dir, memory, models, overhead, memory_models)
    if args.json:  # everything in one file, besides the per-section ones in out_dir
        _write_json(args.json, {"kernels": results, "densenet_memory": memory, "models": models,
                                "overhead": overhead, "models_memory": memory_models})
        paths.append(args.json)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _report_memory_args(args: argparse.Namespace) -> argparse.Namespace:
    """The `memory densenet` arguments of the report's DenseNet section."""
    from . import memory

    return argparse.Namespace(
        depths=args.densenet_depths, growth_rate=args.densenet_growth_rate,
        batch_size=_given_or(args.densenet_batch, 16 if args.quick else 64),
        image_size=args.densenet_image_size, impls=list(memory.IMPLS),
        device=args.device, dtype=args.dtype, steps=2 if args.quick else 3)


def _check_last_batch_norm(args: argparse.Namespace, batch_flag: str, image_flag: str) -> None:
    """DenseNet-BC's last BatchNorm sees batch × (image // 4)² values per channel; training
    BatchNorm needs at least 2 of them, or the worker fails deep inside torch."""
    last_plane = (args.image_size // 4) ** 2
    if args.batch_size * last_plane < 2:
        raise UsageError(f"{batch_flag} {args.batch_size} with {image_flag} {args.image_size} "
                         f"leaves one value per channel for DenseNet-BC's last BatchNorm "
                         f"(batch × (image // 4)² must be >= 2): raise either")


def memory_configs(args: argparse.Namespace) -> list:
    """One configuration per depth and implementation; the flags were checked at parse time."""
    from . import memory

    device = _device(args.device)
    return [memory.MemoryConfig(depth, args.growth_rate, args.batch_size, impl, str(device),
                                args.dtype, args.image_size, args.steps)
            for depth in args.depths for impl in args.impls]


def run_memory_densenet(args: argparse.Namespace) -> dict:
    from . import memory
    from .progress import progress

    configs = memory_configs(args)
    depths = sorted({c.depth for c in configs}, key=[c.depth for c in configs].index)
    # per depth: one fresh process per implementation for memory, then one timing them round-robin
    tasks = [(f"L={c.depth} {c.impl} memory", [c]) for c in configs]
    tasks += [(f"L={d} step times", [c for c in configs if c.depth == d]) for d in depths]
    memory_results: dict[int, memory.MemoryResult] = {}
    times: dict[int, list[float]] = {}
    for label, group in progress(tasks, len(tasks), "memory densenet", label=lambda t: t[0]):
        if label.endswith("memory"):
            memory_results[id(group[0])] = memory.run_in_subprocess(group[0])
        else:
            for config, samples in zip(group, memory.times_in_subprocess(group)):
                times[id(config)] = samples
    results = memory.with_times([memory_results[id(c)] for c in configs],
                                [times[id(c)] for c in configs])
    rows = memory.rows_with_ratios(results)
    first = configs[0]
    title = (f"DenseNet-BC k={first.growth_rate}, batch {first.batch_size}, "
             f"{first.image_size}x{first.image_size}, {first.device} {first.dtype}")
    return {"title": title, "device": first.device, "torch": torch.__version__,
            "cnnkernels": package_info()["version"], "rows": rows,
            "samples": [r.step_samples for r in results]}


def cmd_bench_models(args: argparse.Namespace) -> int:
    args.model_batch, args.model_reps = args.batch, args.reps
    _write_json(args.json, run_model_benchmarks(args.models, args))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from . import models_bench

    results = []
    for name in args.model:
        result = models_bench.tune_model(name, _device(args.device), _DTYPES[args.dtype],
                                         args.batch, args.image_size, args.train)
        print(models_bench.format_tuning(result))
        results.append(result)
    _write_json(args.json, {"results": results})
    return 0


def run_overhead(args: argparse.Namespace) -> dict:
    """Host overhead per call, ours vs eager, op by op and layer by layer; prints the table."""
    from . import overhead

    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = _given_or(args.reps, 5 if args.quick else 15)
    calls = 50 if args.quick else 200
    result = overhead.run(device, reps=reps, calls_per_rep=calls)
    print(overhead.title(result))
    print(overhead.format_table(result))
    return result


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    _write_json(args.json, run_overhead(args))
    return 0


def run_model_benchmarks(names: list[str], args: argparse.Namespace) -> dict:
    """Plain vs converted torchvision models (`names`, checked at parse time); prints the table
    and returns the JSON-ready results."""
    from . import models_bench
    from .progress import progress

    device, dtype = _device(args.device), _DTYPES[args.dtype]
    batch = _given_or(getattr(args, "model_batch", None), 2 if args.quick else 8)
    image = _given_or(getattr(args, "image_size", None), 128 if args.quick else 224)
    reps = _given_or(getattr(args, "model_reps", None), 3 if args.quick else 5)
    if device.type == "cpu":
        profile.keep_cpu_memory_mapped()
    rows = []
    for name in progress(names, len(names), "bench models"):
        rows += models_bench.bench_model(name, device, dtype, batch, image, reps,
                                         with_compile=getattr(args, "compile", False))
    from . import tuning

    title = (f"torchvision models, plain vs cnnkernels.convert (tuning {tuning.get_tuning()}), "
             f"{device} {args.dtype}, {image}x{image}, median of {reps} round-robin steps")
    print(title)
    print(models_bench.format_table(rows))
    print("speed-up = plain median / converted (> 1 means the converted model is faster); "
          "PyTorch layers = tuned layers that run PyTorch's computation" +
          ("; vs compile = torch.compile(plain) median / converted; c(ours)/c = "
           "torch.compile(plain) median / torch.compile(converted)"
           if getattr(args, "compile", False) else ""))
    return {"info": package_info(), "title": title, "rows": rows}


def _build_model(source: str, name: str, spec: str):
    """A randomly initialised torchvision:<name> or timm:<name> model."""
    if source == "torchvision" and name:
        import torchvision

        if not callable(getattr(torchvision.models, name, None)) or name.startswith("_"):
            raise UsageError(f"torchvision has no model {name!r}")
        return getattr(torchvision.models, name)()
    if source == "timm" and name:
        try:
            import timm
        except ImportError:
            raise UsageError("timm is not installed (pip install timm)") from None
        if name not in timm.list_models():
            raise UsageError(f"timm has no model {name!r}")
        return timm.create_model(name, pretrained=False)
    raise UsageError(f"MODEL must be torchvision:<name> or timm:<name> (e.g. "
                     f"torchvision:mobilenet_v3_large, timm:densenet121), got {spec!r}")


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a torchvision or timm model, print the swap report, check the outputs, time both."""
    from . import models_bench
    from .conversion import convert

    source, _, name = args.model.partition(":")
    include = args.include  # checked at parse time; None: every kind
    device, dtype = _device(args.device), _DTYPES[args.dtype]
    torch.manual_seed(0)
    plain = _build_model(source, name, args.model).to(device, dtype)
    converted, report = convert(plain, include=include, report=True)
    print(report)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    error = models_bench._check_same_outputs(plain, converted, x)
    print(f"outputs match (eval, relative error {error:.1e})")
    if device.type == "cpu":
        profile.keep_cpu_memory_mapped()
    rows = []
    for direction in ("inference", "training"):
        fns = {side: models_bench.step_fn(model, x, direction)
               for side, model in (("torch", plain), ("cnnkernels", converted))}
        medians = profile.compare_times(fns, device, warmup=1, reps=args.reps)
        rows.append({"model": name, "direction": direction, "batch": args.batch,
                     "image": args.image_size, "median_s": medians,
                     "speedup": medians["torch"] / medians["cnnkernels"], "swapped": report.counts(),
                     "relative_output_error": error})
    print(models_bench.format_table(rows))
    _write_json(args.json, {"info": package_info(), "rows": rows})
    return 0


def run_memory_models(args: argparse.Namespace) -> dict:
    """Every (model, variant) in a fresh process; rows of plain vs converted."""
    from . import memory_models
    from .progress import progress

    device = _device(args.device)
    configs = [memory_models.ModelMemoryConfig(model, variant, args.batch_size, args.image_size,
                                               str(device), args.dtype)
               for model in args.models for variant in memory_models.VARIANTS]
    results = [memory_models.run_in_subprocess(config)
               for config in progress(configs, len(configs), "memory models",
                                      label=lambda c: f"{c.model} {c.variant}")]
    title = (f"saved activations and peak memory of a training step, batch {args.batch_size}, "
             f"{args.image_size}x{args.image_size}, {device} {args.dtype}")
    return {"title": title, "device": str(device), "torch": torch.__version__,
            "cnnkernels": package_info()["version"], "budget_bytes": args.budget,
            "rows": memory_models.rows(results, args.budget)}


def cmd_memory_models(args: argparse.Namespace) -> int:
    from . import memory_models

    result = run_memory_models(args)
    _show_and_save(result, memory_models.format_table(result["rows"], args.budget), args,
                   memory_models.plot)
    return 0


def cmd_memory_densenet(args: argparse.Namespace) -> int:
    from . import memory

    _check_last_batch_norm(args, "--batch-size", "--image-size")
    result = run_memory_densenet(args)
    _show_and_save(result, memory.format_table(result["rows"]), args, memory.plot)
    return 0


def _show_and_save(result: dict, table: str, args: argparse.Namespace, plot) -> None:
    """A memory command's title and table, its --json and its --plot."""
    print(result["title"])
    print(table)
    _write_json(args.json, result)
    if args.plot:
        _make_parent_folder(args.plot, "--plot")
        plot(result["rows"], args.plot, result["title"])
        print(f"wrote {args.plot}")


# --- argument types ---------------------------------------------------------------------------
# Each refuses a bad value while the command line is parsed, so argparse prints one line naming the
# flag and exits with 2 before any benchmark starts, instead of a traceback (or a silently wrong
# table) minutes in.

def _integer(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """Batch sizes, repetitions, steps, image sizes, growth rates: 0 or less is meaningless."""
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# DenseNet-BC for 32×32 inputs halves the image in each of its two transitions
DENSENET_MIN_IMAGE = 4


def densenet_image_size(text: str) -> int:
    expected = f"an integer >= {DENSENET_MIN_IMAGE} (DenseNet-BC halves the image twice)"
    value = _integer(text, expected)
    if value < DENSENET_MIN_IMAGE:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _comma_separated(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _may_be_empty(parse: Callable[[str], list]) -> Callable[[str], list]:
    """`parse`, except that '' is the empty list: the report's way to skip a section."""
    def parse_or_skip(text: str) -> list:
        return parse(text) if _comma_separated(text) else []

    return parse_or_skip


def _is_densenet_bc_depth(depth: int) -> bool:
    """models.densenet_bc's rule: 3 blocks of (depth - 4) / 6 layers, at least one each."""
    return depth >= 10 and (depth - 4) % 6 == 0


def densenet_depths(text: str) -> list[int]:
    expected = "comma-separated DenseNet-BC depths 6n + 4 (10, 40, 100, 160, 250, ...)"
    depths = [_integer(item, expected) for item in _comma_separated(text)]
    wrong = [str(depth) for depth in depths if not _is_densenet_bc_depth(depth)]
    if wrong or not depths:
        got = ",".join(wrong) if wrong else text
        raise argparse.ArgumentTypeError(f"expected {expected}, got {got!r}")
    return depths


def _names_from(noun: str, known: Callable[[], Sequence[str]]) -> Callable[[str], list[str]]:
    """A type for comma-separated names, each one of `known()` (a function, so that the module
    holding the list is imported only by the command that uses it)."""
    def parse(text: str) -> list[str]:
        choices, names = tuple(known()), _comma_separated(text)
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {noun} {', '.join(unknown)}; choose from {','.join(choices)}")
        if not names:
            raise argparse.ArgumentTypeError(
                f"expected at least one {noun} of {','.join(choices)}, got {text!r}")
        return names

    return parse


def _memory_impls() -> Sequence[str]:
    from .memory import IMPLS

    return IMPLS


def _model_names() -> Sequence[str]:
    from .models_bench import MODELS

    return MODELS


def _conversion_kinds() -> Sequence[str]:
    from .conversion import KINDS

    return KINDS


op_names = _names_from("op", bench_cases.known_ops)
memory_impl_names = _names_from("implementation", _memory_impls)
model_names = _names_from("model", _model_names)
conversion_kinds = _names_from("kind", _conversion_kinds)


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse's parser, with a mistake reported as one line (no usage block: `-h` has it), like
    the errors the commands raise; the exit code stays argparse's 2. Subparsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def memory_budget(text: str) -> int:
    from .memory_models import parse_bytes
    try:
        value = parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a budget above zero, got {text!r}")
    return value


def memory_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", type=densenet_depths, default="40,100,160,250",
                        help="comma-separated DenseNet-BC depths, each 6n + 4 (default 40,100,160,250)")
    parser.add_argument("--growth-rate", type=positive_int, default=12)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--image-size", type=densenet_image_size, default=32)
    parser.add_argument("--impls", type=memory_impl_names, default="naive,checkpoint,shared",
                        help="comma-separated subset of naive,checkpoint,shared")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    parser.add_argument("--steps", type=positive_int, default=3,
                        help="timed training steps (median reported)")


def kernels_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", type=op_names,
                        help=f"comma-separated subset of {','.join(bench_cases.known_ops())}")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    parser.add_argument("--reps", type=positive_int,
                        help="timed repetitions per side (median reported)")
    parser.add_argument("--batch", type=positive_int,
                        help="batch size of every case (default: the model's)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--bandwidth", action=argparse.BooleanOptionalAction, default=None,
                        help="also time a copy of the input and print each of our kernels' "
                             "achieved bandwidth as a fraction of it (default: on CUDA)")
    parser.add_argument("--channels-last", action="store_true",
                        help="inputs in channels_last memory format (default: NCHW)")
    parser.add_argument("--timing", choices=["call", "stream"], default="call",
                        help="call: each repetition is one synchronised call (latency, host "
                             f"overhead included); stream: {STREAM_CALLS} back-to-back calls "
                             "(throughput, as in a training loop; on a GPU the host runs ahead)")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog="cnnkernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, what was built, device, backend")
    info.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                      help="describe this device and the backend `auto` uses there")
    info.add_argument("--json", metavar="PATH", help="also write the answer as JSON")
    info.set_defaults(run=cmd_info)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    kernels = bench_sub.add_parser("kernels", help="our kernels vs PyTorch, op by op")
    kernels_options(kernels)
    kernels.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    kernels.set_defaults(run=cmd_bench_kernels)

    models = bench_sub.add_parser("models", help="torchvision models, plain vs converted: "
                                                 "training step and inference")
    models.add_argument("--models", type=model_names,
                        default="mobilenet_v2,mobilenet_v3_large,resnet50,densenet121",
                        help="comma-separated torchvision model names")
    models.add_argument("--quick", action="store_true", help="batch 2 at 128x128, 3 steps")
    models.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    models.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    models.add_argument("--batch", type=positive_int, help="batch size (default 8; 2 with --quick)")
    models.add_argument("--image-size", type=positive_int,
                        help="input size (default 224; 128 with --quick)")
    models.add_argument("--reps", type=positive_int,
                        help="timed steps per side (default 5; 3 with --quick)")
    models.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the plain and of the converted model "
                             "(four compilations per model, inference and training: minutes "
                             "per model on a small CPU)")
    models.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    models.set_defaults(run=cmd_bench_models)

    over = bench_sub.add_parser("overhead", help="host cost per call of every op and layer "
                                                 "kind, ours vs eager, on tiny tensors")
    over.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    over.add_argument("--threads", type=positive_int,
                      help="torch.set_num_threads first (default: torch's own)")
    over.add_argument("--quick", action="store_true", help="5 repetitions of 50 calls per side")
    over.add_argument("--reps", type=positive_int,
                      help="timed repetitions per side (default 15; 5 with --quick)")
    over.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    over.set_defaults(run=cmd_bench_overhead)

    conv = sub.add_parser("convert", help="convert a model, print what was swapped, check the "
                                          "outputs and time both")
    conv.add_argument("model", metavar="MODEL", help="torchvision:<name> or timm:<name>, e.g. "
                                                     "torchvision:mobilenet_v3_large")
    conv.add_argument("--include", type=conversion_kinds,
                      help="comma-separated kinds (default: every kind)")
    conv.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    conv.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    conv.add_argument("--batch", type=positive_int, default=8)
    conv.add_argument("--image-size", type=positive_int, default=224)
    conv.add_argument("--reps", type=positive_int, default=5, help="timed steps per side")
    conv.add_argument("--json", metavar="PATH", help="also write the timings as JSON")
    conv.set_defaults(run=cmd_convert)

    tune = sub.add_parser("tune", help="time our kernels against PyTorch's on each converted "
                                       "layer of a torchvision model, keep the faster (cached)")
    tune.add_argument("model", metavar="MODEL", type=model_names,
                      help="a torchvision model name, e.g. mobilenet_v3_large")
    tune.add_argument("--train", action="store_true", help="a training step (default: inference)")
    tune.add_argument("--batch", type=positive_int, default=8)
    tune.add_argument("--image-size", type=positive_int, default=224)
    tune.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    tune.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    tune.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    tune.set_defaults(run=cmd_tune)

    mem = sub.add_parser("memory", help="memory profiles")
    mem_sub = mem.add_subparsers(dest="what", required=True)
    dense = mem_sub.add_parser("densenet", help="DenseNet-BC training-step memory and time for "
                                                "the naive, checkpoint and shared memory modes")
    memory_options(dense)
    dense.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    dense.add_argument("--plot", metavar="PATH", default="densenet_memory.png",
                       help="PNG of peak memory vs depth (default densenet_memory.png; '' for none)")
    dense.set_defaults(run=cmd_memory_densenet)
    models = mem_sub.add_parser("models", help="saved activations and peak training-step memory "
                                               "of torchvision models, plain vs converted")
    models.add_argument("--models", type=_comma_separated,
                        default="resnet50,mobilenet_v2,mobilenet_v3_large,densenet121",
                        help="comma-separated torchvision model names (default resnet50,"
                             "mobilenet_v2,mobilenet_v3_large,densenet121)")
    models.add_argument("--batch-size", type=positive_int, default=8)
    models.add_argument("--image-size", type=positive_int, default=224)
    models.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    models.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    models.add_argument("--budget", type=memory_budget, default="16GiB",
                        help="memory for the largest-batch estimate (default 16GiB)")
    models.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    models.add_argument("--plot", metavar="PATH", default="models_memory.png",
                        help="PNG of saved MiB per sample (default models_memory.png; '' for none)")
    models.set_defaults(run=cmd_memory_models)

    rep = sub.add_parser("report", help="benchmark every kernel and write report.md, JSON and "
                                        "PNG plots")
    rep.add_argument("--out", default="report", metavar="DIR", help="output folder (./report)")
    kernels_options(rep)
    rep.add_argument("--densenet-depths", type=_may_be_empty(densenet_depths), default=None,
                     metavar="LIST",
                     help="DenseNet-BC depths for the memory section (default 40,100 with --quick, "
                          "else 40,100,160,250; '' skips it)")
    rep.add_argument("--densenet-batch", type=positive_int,
                     help="its batch size (16 with --quick, else 64)")
    rep.add_argument("--densenet-growth-rate", type=positive_int, default=12)
    rep.add_argument("--densenet-image-size", type=densenet_image_size, default=32)
    rep.add_argument("--models", type=_may_be_empty(model_names),
                     default="mobilenet_v2,mobilenet_v3_large,resnet50,densenet121",
                     help="torchvision models for the plain-vs-converted section ('' skips it)")
    rep.add_argument("--model-batch", type=positive_int,
                     help="their batch size (2 with --quick, else 8)")
    rep.add_argument("--model-reps", type=positive_int,
                     help="timed steps per side (3 with --quick, else 5)")
    rep.add_argument("--overhead", action=argparse.BooleanOptionalAction, default=True,
                     help="the host-overhead section: every op and layer kind on tiny tensors "
                          "(as `cnnkernels bench overhead`)")
    rep.add_argument("--memory-models", action=argparse.BooleanOptionalAction, default=True,
                     help="the activation-memory section for the --models (as `cnnkernels memory "
                          "models`; batch 2 at 128x128 with --quick, else batch 8 at 224x224)")
    rep.add_argument("--memory-budget", type=memory_budget, default="16GiB",
                     help="its memory budget for the largest-batch estimate (default 16GiB)")
    rep.add_argument("--json", metavar="PATH", help="also write every section's results to one "
                                                    "JSON file")
    rep.set_defaults(run=cmd_report, image_size=None)

    add_kernels_audit_parser(sub)
    return parser


def cmd_kernels(args: argparse.Namespace) -> int:
    from . import kernels_audit
    return kernels_audit.command(args.target, args.json, quick=args.quick, cuda=not args.no_cuda,
                                 workers=args.workers)


def add_kernels_audit_parser(sub) -> None:
    audit = sub.add_parser("kernels", help="compile every Triton kernel for a GPU without one; "
                                           "registers, spills, shared memory, occupancy of every "
                                           "Triton and CUDA kernel")
    audit.add_argument("--target", default="sm_90", choices=("sm_90", "sm_100"))
    audit.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    audit.add_argument("--quick", action="store_true",
                       help="fewer shapes and layouts (every kernel, every dtype, largest tiles)")
    audit.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels of _C")
    audit.add_argument("--workers", type=positive_int, default=None,
                       help="compiler processes (default: one per CPU)")
    audit.set_defaults(run=cmd_kernels)


class UsageError(Exception):
    """A mistake in the command line: reported as one line, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "report" and args.densenet_depths is None:
        args.densenet_depths = [40, 100] if args.quick else [40, 100, 160, 250]
    try:
        return args.run(args)
    except (UsageError, ValueError, BackendUnavailableError, RuntimeError) as err:
        print(f"cnnkernels: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
