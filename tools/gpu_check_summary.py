"""Pack what tools/gpu_check.sh has finished so far: OUT/summary.md (the phase table and every
result table) and OUT/results.json (every phase's JSON under its file's name), each written to a
temporary name and renamed, so a run cut off at any moment leaves complete files.

Usage: python tools/gpu_check_summary.py WORKDIR OUTDIR

WORKDIR holds phases.tsv (phase, budget s, status, seconds, note: one line per finished phase) and
the JSON files the phases wrote. A JSON file that is missing or unreadable (its phase was cut off)
is listed as such; nothing here raises on a partial run.
"""
from __future__ import annotations

import glob
import json
import os
import sys

USAGE = "usage: python tools/gpu_check_summary.py WORKDIR OUTDIR"

# The JSON files of each section, in the order of the plan; glob patterns, sorted within each.
SECTIONS = (
    ("Kernels, latency (one synchronised call per repetition)", "kernels_call.json"),
    ("Kernels, throughput (back-to-back calls per repetition)", "kernels_stream.json"),
    ("Models, float32: plain vs converted (tuning on)", "models_fp32.json"),
    ("Tuning: ours vs PyTorch per layer, MobileNetV3-Large, batch 64", "tune_*.json"),
    ("Models, bfloat16 weights and inputs: plain vs converted", "models_bf16.json"),
    ("DenseNet-BC memory", "densenet_memory.json"),
    ("Activation memory of models, batch 64: plain vs converted", "memory_models_*.json"),
    ("Host overhead per call", "overhead.json"),
    ("Models, float32, with torch.compile of the plain model", "models_compile_*.json"),
)


def read_phases(work: str) -> list[dict]:
    path = os.path.join(work, "phases.tsv")
    if not os.path.exists(path):
        return []
    keys = ("phase", "budget_s", "status", "seconds", "note")
    with open(path) as f:
        return [dict(zip(keys, line.rstrip("\n").split("\t"))) for line in f if line.strip()]


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def phase_table(phases: list[dict]) -> str:
    lines = ["| phase | budget s | took s | status | note |", "|---|---|---|---|---|"]
    lines += [f"| {p['phase']} | {p.get('budget_s', '')} | {p.get('seconds', '')} | "
              f"{p.get('status', '')} | {p.get('note', '')} |" for p in phases]
    return "\n".join(lines)


def section_markdown(name: str, data: dict) -> str:
    """One result file as markdown, by the command that wrote it."""
    from cnnkernels import report

    if name.startswith("kernels_"):
        return report.markdown_table(data)
    if name.startswith("memory_models_"):
        from cnnkernels import memory_models
        return data["title"] + "\n\n```\n" + memory_models.format_table(
            data["rows"], data["budget_bytes"]) + "\n```"
    if name.startswith("tune_"):
        from cnnkernels import models_bench
        return "\n\n".join("```\n" + models_bench.format_tuning(r) + "\n```"
                           for r in data["results"])
    if name.startswith("models_"):
        from cnnkernels import models_bench
        return data["title"] + "\n\n```\n" + models_bench.format_table(data["rows"]) + "\n```"
    if name == "densenet_memory.json":
        return data["title"] + "\n\n" + report.memory_markdown(data)
    if name == "overhead.json":
        from cnnkernels import overhead
        return overhead.title(data) + "\n\n" + overhead.format_table(data)
    return "```\n" + json.dumps(data, indent=1)[:2000] + "\n```"


def header_lines(work: str) -> list[str]:
    info = read_json(os.path.join(work, "info.json")) or {}
    device = info.get("device", "device unknown (the build phase did not finish)")
    versions = ", ".join(f"{k} {info[k]}" for k in ("version", "torch", "triton") if k in info)
    return ["# tools/gpu_check.sh", "", f"{device}; {versions or 'versions unknown'}.", "",
            "Full logs, the JSON files and the plot: logs.tar.gz; every JSON also in "
            "results.json.", ""]


def summarize(work: str) -> tuple[str, dict]:
    phases = read_phases(work)
    lines = header_lines(work) + ["## Phases", "", phase_table(phases), ""]
    results: dict = {"phases": phases, "info": read_json(os.path.join(work, "info.json"))}
    for title, pattern in SECTIONS:
        for path in sorted(glob.glob(os.path.join(work, pattern))):
            name = os.path.basename(path)
            data = read_json(path)
            results[name.removesuffix(".json")] = data
            lines += [f"## {title} ({name})", ""]
            if data is None:
                lines += ["(unreadable: the phase was cut off while writing it)", ""]
                continue
            try:
                lines += [section_markdown(name, data), ""]
            except Exception as err:  # a table that cannot be drawn must not lose the others
                lines += [f"(no table: {type(err).__name__}: {err}; the data is in results.json)", ""]
    return "\n".join(lines), results


def write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(USAGE, file=sys.stderr)
        return 2
    work, out = argv
    markdown, results = summarize(work)
    write_atomically(os.path.join(out, "summary.md"), markdown + "\n")
    write_atomically(os.path.join(out, "results.json"), json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
