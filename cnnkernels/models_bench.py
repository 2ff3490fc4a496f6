"""`cnnkernels bench models`: training-step and inference time of torchvision models, plain vs
`cnnkernels.convert`-ed, timed round-robin on the same input (cnnkernels.profile.compare_times).

The converted model holds copies of the plain one's weights; its outputs are checked against the
plain model's before timing, so a speed-up can never come from computing something else.
"""
from __future__ import annotations

import torch

CORE_MODELS = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "resnet50",
               "densenet121")  # the families the kernels were written for (pytest bench runs these)
MODELS = CORE_MODELS + ("resnet18", "shufflenet_v2_x1_0", "mnasnet1_0", "efficientnet_b0",
                        "regnet_y_400mf")


def build(name: str, device: torch.device, dtype: torch.dtype, prefer: str = "speed"):
    """(plain, converted, swap counts) for a torchvision model name."""
    import torchvision

    from .conversion import convert

    if name not in MODELS and not hasattr(torchvision.models, name):
        raise ValueError(f"unknown model {name!r}; try one of {', '.join(MODELS)}")
    torch.manual_seed(0)
    plain = getattr(torchvision.models, name)()
    _give_batchnorms_statistics(plain)
    plain = plain.to(device, dtype)
    converted, report = convert(plain, report=True, prefer=prefer)
    return plain, converted, report.counts()


def _give_batchnorms_statistics(model: torch.nn.Module) -> None:
    """Random running statistics and affine parameters, as a trained model has: with torchvision's
    initialisation (mean 0, variance 1, weight 1, bias 0) an untrained MobileNetV2's eval outputs are
    ~1e-8, and the output check below would compare nothing."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)


def _check_same_outputs(plain, converted, x) -> float:
    plain.eval(), converted.eval()
    with torch.no_grad():
        y, y_ref = converted(x), plain(x)
    error = ((y - y_ref).norm() / y_ref.norm().clamp_min(1e-12)).item()
    if error > 1e-3:
        raise RuntimeError(f"cnnkernels: the converted model's outputs differ from the original's "
                           f"(relative error {error:.2e})")
    return error


def bench_model(name: str, device: torch.device, dtype: torch.dtype, batch: int, image: int,
                reps: int, with_compile: bool = False) -> list[dict]:
    """Rows of plain vs converted (and, `with_compile`, torch.compile of the plain and of the
    converted model: their first step, in the warm-up, compiles; inference and training compile
    separately)."""
    from . import profile

    plain, converted, counts = build(name, device, dtype)
    x = torch.randn(batch, 3, image, image, device=device, dtype=dtype)
    error = _check_same_outputs(plain, converted, x)
    compiled = profile.compile_fresh(plain) if with_compile else None
    compiled_converted = profile.compile_fresh(converted) if with_compile else None
    rows = []
    for direction in ("inference", "training"):
        fns = {"torch": step_fn(plain, x, direction), "cnnkernels": step_fn(converted, x, direction)}
        if compiled is not None:
            fns["torch.compile"] = step_fn(compiled, x, direction)
            fns["compile(cnnkernels)"] = step_fn(compiled_converted, x, direction)
        medians = profile.compare_times(fns, device, warmup=1, reps=reps)
        row = {"model": name, "direction": direction, "batch": batch, "image": image,
               "median_s": medians, "speedup": medians["torch"] / medians["cnnkernels"],
               "swapped": counts, "relative_output_error": error,
               "tuned": _choices(converted, direction)}
        if compiled is not None:
            row["speedup_vs_compile"] = medians["torch.compile"] / medians["cnnkernels"]
            row["compiled_converted_vs_compiled_plain"] = \
                medians["torch.compile"] / medians["compile(cnnkernels)"]
        rows.append(row)
    return rows


def _choices(model, direction: str) -> dict[str, int]:
    """How many of the converted layers' decisions (cnnkernels.tuning) for this pass run ours and
    how many PyTorch's."""
    from . import tuning

    mode = "eval" if direction == "inference" else "train"
    chosen = [row["choice"] for row in tuning.decisions_of(model) if row["mode"] == mode]
    return {"ours": chosen.count("ours"), "torch": chosen.count("torch")}


def step_fn(model, x, direction: str):
    """One inference (eval, no_grad) or training (forward, backward) step of `model` on `x`."""
    if direction == "inference":
        model.eval()

        def infer():
            with torch.no_grad():
                return model(x)
        return infer
    model.train()

    def train_step():
        model(x).float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    return train_step


def tuned_cell(row: dict) -> str:
    """'3 of 31': decisions that run PyTorch's computation, of all decisions, for this pass."""
    tuned = row.get("tuned")
    if not tuned:
        return "-"
    return f"{tuned['torch']} of {tuned['ours'] + tuned['torch']}"


def format_table(rows: list[dict]) -> str:
    compiled = any("speedup_vs_compile" in r for r in rows)
    extra = f" {'compile ms':>10} {'vs compile':>10} {'c(ours)/c':>9}" if compiled else ""
    lines = [f"{'model':<20} {'pass':<10} {'batch':>5} {'torch ms':>10} {'ours ms':>10} {'speed-up':>9}"
             f"{extra} {'PyTorch layers':>14}  swapped"]
    for r in rows:
        swapped = ", ".join(f"{n} {k}" for k, n in r["swapped"].items()) or "nothing"
        cells = ""
        if compiled:
            cells = (f" {r['median_s']['torch.compile'] * 1e3:>10.1f} {r['speedup_vs_compile']:>9.2f}x"
                     f" {r['compiled_converted_vs_compiled_plain']:>8.2f}x"
                     if "speedup_vs_compile" in r else f" {'-':>10} {'-':>10} {'-':>9}")
        lines.append(f"{r['model']:<20} {r['direction']:<10} {r['batch']:>5} "
                     f"{r['median_s']['torch'] * 1e3:>10.1f} {r['median_s']['cnnkernels'] * 1e3:>10.1f} "
                     f"{r['speedup']:>8.2f}x{cells} {tuned_cell(r):>14}  {swapped}")
    return "\n".join(lines)


def tune_model(name: str, device: torch.device, dtype: torch.dtype, batch: int, image: int,
               train: bool) -> dict:
    """Tunes every converted layer of a torchvision model on one step (cnnkernels.tuning), and
    returns each layer's candidates' times and winner, with the cost of the first step."""
    import time

    from . import profile, tuning

    _, converted, counts = build(name, device, dtype)
    x = torch.randn(batch, 3, image, image, device=device, dtype=dtype)
    step = step_fn(converted, x, "training" if train else "inference")
    with tuning.use_tuning("auto"):
        spent = tuning.statistics_of_tuning()["seconds"]
        started = time.perf_counter()
        step()
        profile.synchronize(device)
        first = time.perf_counter() - started
        spent = tuning.statistics_of_tuning()["seconds"] - spent
        later = profile.compare_times({"step": step}, device, warmup=0, reps=3)["step"]
    rows = [row for row in tuning.decisions_of(converted) if row["layer"]]
    return {"model": name, "batch": batch, "image": image, "pass": "training" if train else
            "inference", "device": str(device), "dtype": str(dtype).split(".")[-1],
            "first_step_s": first, "tuning_s": spent, "later_step_s": later, "swapped": counts,
            "layers": rows}


def format_tuning(result: dict) -> str:
    lines = [f"{result['model']} {result['pass']}, batch {result['batch']}, "
             f"{result['image']}x{result['image']}, {result['dtype']} on {result['device']}",
             f"{'layer':<28} {'kind':<16} {'input':<18} {'ours ms':>9} {'torch ms':>9} "
             f"{'runs':>6} {'speed-up':>9}"]
    for row in result["layers"]:
        times = row.get("times")
        shape = "x".join(map(str, row["shape"]))
        if times:
            chosen = times[row["choice"]]
            cells = (f"{times['ours'] * 1e3:>9.3f} {times['torch'] * 1e3:>9.3f} "
                     f"{row['choice']:>6} {times['torch'] / chosen:>8.2f}x")
        else:
            cells = f"{'-':>9} {'-':>9} {row['choice']:>6} {'-':>9}  ({row['source']})"
        lines.append(f"{row['layer']:<28} {row['kind']:<16} {shape:<18} {cells}")
    lines.append(f"first step {result['first_step_s'] * 1e3:.0f} ms, of which tuning "
                 f"{result['tuning_s'] * 1e3:.0f} ms; later steps {result['later_step_s'] * 1e3:.1f} ms")
    return "\n".join(lines)
