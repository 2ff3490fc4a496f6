"""The report written by `cnnkernels report`: report.md, kernels.json and one PNG bar chart of speed
-ups per pass (forward, forward+backward), from the results of cli.run_kernel_benchmarks; and, when
given, the DenseNet memory section (densenet_memory.json and a PNG of peak memory vs depth)."""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from . import models_bench  # noqa: E402

_PASSES = {"fwd": "forward", "fwd+bwd": "forward+backward"}


def markdown_table(results: dict) -> str:
    sides = results["sides"]
    header = ["op", "shape", "pass", "torch ms"] + [f"{s} ms" for s in sides] + [
        f"{s} speed-up" for s in sides]
    roofline = any("roofline" in row for row in results["results"])  # a GPU of known peaks
    header += [f"{s} % of roofline" for s in ["torch", *sides]] if roofline else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["results"]:
        medians = row["median_s"]
        cells = [row["op"], row["label"], row["direction"], f"{medians['torch'] * 1e3:.3f}"]
        # a side missing from a row has no kernel for that op (e.g. no CUDA C++ depthwise yet)
        cells += [f"{medians[s] * 1e3:.3f}" if s in medians else "-" for s in sides]
        cells += [f"{row['speedup_vs_torch'][s]:.2f}x" if s in medians else "-" for s in sides]
        if roofline:
            fractions = row.get("roofline", {}).get("fraction", {})
            cells += [f"{fractions[s] * 100:.1f}%" if s in fractions else "-"
                      for s in ["torch", *sides]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedup_plot(results: dict, direction: str, path: str) -> None:
    rows = [r for r in results["results"] if r["direction"] == direction]
    sides = results["sides"]
    labels = [f"{r['op']} {r['label']}" for r in rows]
    height = 0.8 / max(len(sides), 1)
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) * max(len(sides), 1) + 1.5))
    for k, side in enumerate(sides):
        ax.barh([i + k * height for i in range(len(rows))],
                [r["speedup_vs_torch"].get(side, 0.0) for r in rows], height=height, label=side)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}x" if f"{v:.0e}"[0] in "25" else ""))  # label 0.2, 0.5, 2, 5...
    ax.set_yticks([i + height * (len(sides) - 1) / 2 for i in range(len(rows))], labels)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over PyTorch eager (torch median / ours; > 1 is faster)")
    info = results["info"]
    ax.set_title(f"{_PASSES[direction]}, {info['device']}, torch {info['torch']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_markdown(memory: dict) -> str:
    header = ["depth", "params", "impl", "peak MiB", "saved MiB", "step s", "peak / naive",
              "time / naive"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ratio = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for row in memory["rows"]:
        lines.append(f"| {row['depth']} | {row['params']:,} | {row['impl']} | {row['peak_mib']:.1f} | "
                     f"{row['saved_mib']:.1f} | {row['step_s']:.3f} | {ratio(row['peak_vs_naive'])} | "
                     f"{ratio(row['time_vs_naive'])} |")
    return "\n".join(lines)


def _save_json(payload: dict, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def _save_plot(plot, section: dict, out_dir: str, name: str) -> str:
    """`plot(rows, path, title)` of a section's rows into out_dir/name."""
    path = os.path.join(out_dir, name)
    plot(section["rows"], path, section["title"])
    return path


def write_memory(memory: dict, out_dir: str) -> tuple[list[str], list[str]]:
    """densenet_memory.json, the plot, and report.md's lines for them."""
    from .memory import plot

    json_path = _save_json(memory, out_dir, "densenet_memory.json")
    png = _save_plot(plot, memory, out_dir, "densenet_memory.png")
    lines = ["", "## DenseNet memory", "",
             f"{memory['title']}: one training step (forward, cross-entropy, backward) per "
             "configuration, each in a fresh process. Peak = peak memory of the step beyond what was "
             "held before it; saved = bytes autograd keeps after the forward; step time is the "
             "median of a few steps.", "", memory_markdown(memory), "",
             f"![{os.path.basename(png)}]({os.path.basename(png)})"]
    return [json_path, png], lines


def write_models(models: dict, out_dir: str) -> tuple[list[str], list[str]]:
    """models.json and the markdown section for `bench models` results."""
    path = _save_json(models, out_dir, "models.json")
    lines = ["", "## Models: plain vs `cnnkernels.convert`", "", models["title"] + "; the "
             "converted model's outputs are checked against the plain one's before timing.", "",
             "| model | pass | batch | torch ms | converted ms | speed-up | PyTorch layers "
             "(tuning) | swapped |",
             "|---|---|---|---|---|---|---|---|"]
    for r in models["rows"]:
        swapped = ", ".join(f"{n} {k}" for k, n in r["swapped"].items()) or "nothing"
        lines.append(f"| {r['model']} | {r['direction']} | {r['batch']} | "
                     f"{r['median_s']['torch'] * 1e3:.1f} | {r['median_s']['cnnkernels'] * 1e3:.1f} | "
                     f"{r['speedup']:.2f}x | {models_bench.tuned_cell(r)} | {swapped} |")
    return [path], lines


def write_overhead(overhead: dict, out_dir: str) -> tuple[list[str], list[str]]:
    from . import overhead as overhead_module

    path = _save_json(overhead, out_dir, "overhead.json")
    lines = ["", "## Host overhead per call", "", overhead_module.title(overhead), "",
             overhead_module.format_table(overhead)]
    return [path], lines


def write_memory_models(memory_models: dict, out_dir: str) -> tuple[list[str], list[str]]:
    """models_memory.json, its bar chart, and report.md's lines for them."""
    from .memory_models import plot

    path = _save_json(memory_models, out_dir, "models_memory.json")
    png = _save_plot(plot, memory_models, out_dir, "models_memory.png")
    budget = memory_models["budget_bytes"] / 2**30
    lines = ["", "## Activation memory: plain vs `cnnkernels.convert`", "",
             memory_models["title"] + "; each model in a fresh process. Saved = bytes autograd "
             "keeps after the forward; peak = peak memory of one training step beyond what was "
             f"held before it; largest batch = what fits {budget:g} GiB beside the weights, "
             "gradients and Adam's moments, from the saved bytes per sample (an upper bound).", "",
             "| model | saved MiB plain | converted | ratio | peak MiB plain | converted | ratio | "
             "largest batch plain | converted |", "|---|---|---|---|---|---|---|---|---|"]
    for r in memory_models["rows"]:
        peak_ratio = f"{r['peak_ratio']:.2f}" if r["peak_ratio"] is not None else "-"
        lines.append(f"| {r['model']} | {r['saved_mib_plain']:.1f} | {r['saved_mib_converted']:.1f} "
                     f"| {r['saved_ratio']:.2f} | {r['peak_mib_plain']:.1f} | "
                     f"{r['peak_mib_converted']:.1f} | {peak_ratio} | {r['largest_batch_plain']} | "
                     f"{r['largest_batch_converted']} |")
    lines += ["", f"![{os.path.basename(png)}]({os.path.basename(png)})"]
    return [path, png], lines


def write(results: dict, out_dir: str, memory: dict | None = None,
          models: dict | None = None, overhead: dict | None = None,
          memory_models: dict | None = None) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    info = results["info"]
    paths = [_save_json(results, out_dir, "kernels.json")]
    pictures = []
    for direction in _PASSES:
        png = os.path.join(out_dir, f"speedup_{direction.replace('+', '_')}.png")
        speedup_plot(results, direction, png)
        pictures.append(os.path.basename(png))
        paths.append(png)
    lines = [
        "# cnnkernels report", "",
        f"cnnkernels {info['version']}, torch {info['torch']}, device {info['device']}, "
        f"backend {info['backend']}; median of {results['reps']} round-robin repetitions per side"
        + ("; CPU heap kept mapped while timing" if results["cpu_heap_kept"] else "") + ".", "",
        "Speed-up = PyTorch eager median / ours: above 1 we are faster.", "",
        "## Kernels", "", markdown_table(results), "",
    ] + [f"![{p}]({p})" for p in pictures]
    if memory is not None:
        memory_paths, memory_lines = write_memory(memory, out_dir)
        paths += memory_paths
        lines += memory_lines
    if models is not None:
        model_paths, model_lines = write_models(models, out_dir)
        paths += model_paths
        lines += model_lines
    if overhead is not None:
        overhead_paths, overhead_lines = write_overhead(overhead, out_dir)
        paths += overhead_paths
        lines += overhead_lines
    if memory_models is not None:
        section_paths, section_lines = write_memory_models(memory_models, out_dir)
        paths += section_paths
        lines += section_lines
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    paths.append(md_path)
    return paths
