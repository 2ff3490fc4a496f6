"""Activation memory of torchvision models, plain vs `cnnkernels.convert`-ed
(`cnnkernels memory models`).

Each (model, variant) runs in a fresh Python process, so one model's heap never pollutes another's
numbers. It builds the model (the same weights for both variants; converted with
``prefer="memory"``, so that tuning keeps our layers wherever they keep fewer activations), takes
one warm-up training step (where the converted model tunes),
then measures:
- the bytes autograd keeps after a forward (`profile.saved_activation_bytes`), per sample: exact
  and the same on every device;
- the peak memory of one training step (forward, cross-entropy, backward): the caching allocator's
  peak on CUDA, the peak resident set size on the CPU, as `memory densenet` measures them.
From the saved bytes per sample and the parameters it estimates the largest batch that fits a
memory budget: budget minus the weights, their gradients and Adam's two moments (4 × the
parameters' bytes), divided by the saved bytes per sample. Workspace and the transient tensors of
the backward come on top, so the estimate is an upper bound.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

VARIANTS = ("plain", "converted")
DEFAULT_MODELS = ("resnet50", "mobilenet_v2", "mobilenet_v3_large", "densenet121")
OPTIMIZER_COPIES = 4  # weights, gradients and Adam's two moments


@dataclass
class ModelMemoryConfig:
    model: str
    variant: str
    batch_size: int = 8
    image_size: int = 224
    device: str = "cpu"
    dtype: str = "float32"


@dataclass
class ModelMemoryResult:
    config: ModelMemoryConfig
    params: int
    param_bytes: int
    saved_bytes: int
    peak_bytes: int


def parse_bytes(text: str) -> int:
    """'16GiB', '512MiB', '8GB', '1000000' as a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"expected a size such as 16GiB, 512MiB or 8GB, got {text!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
             "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


def _model(config: ModelMemoryConfig) -> torch.nn.Module:
    from .models_bench import build

    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    plain, converted, _ = build(config.model, device, dtype, prefer="memory")
    return (plain if config.variant == "plain" else converted).train()


def measure(config: ModelMemoryConfig) -> ModelMemoryResult:
    """Saved and peak bytes of one (model, variant), in this (fresh) process."""
    from . import profile

    device = torch.device(config.device)
    if device.type == "cpu":
        profile.return_freed_cpu_memory()
    model = _model(config)
    x = torch.randn(config.batch_size, 3, config.image_size, config.image_size, device=device,
                    dtype=getattr(torch, config.dtype))
    target = torch.randint(0, 1000, (config.batch_size,), device=device)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: lazy initialisation, kernel caches
    peak = profile.peak_memory(step, device)
    saved = profile.saved_activation_bytes(model, x)
    params = list(model.parameters())
    return ModelMemoryResult(config, sum(p.numel() for p in params),
                             sum(p.numel() * p.element_size() for p in params), saved, peak)


def run_in_subprocess(config: ModelMemoryConfig) -> ModelMemoryResult:
    proc = subprocess.run([sys.executable, "-m", "cnnkernels.memory_models",
                           json.dumps(asdict(config))], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"cnnkernels: the memory worker for {config.model} "
                           f"({config.variant}) failed:\n{tail}")
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    payload["config"] = ModelMemoryConfig(**payload["config"])
    return ModelMemoryResult(**payload)


def largest_batch(saved_bytes_per_sample: float, param_bytes: int, budget: int) -> int:
    """The largest batch whose saved activations, weights and optimizer state fit `budget`."""
    room = budget - OPTIMIZER_COPIES * param_bytes
    if room <= 0 or saved_bytes_per_sample <= 0:
        return 0
    return int(room // saved_bytes_per_sample)


def rows(results: list[ModelMemoryResult], budget: int) -> list[dict]:
    """One row per model: plain and converted side by side, converted / plain ratios."""
    by_model: dict[str, dict[str, ModelMemoryResult]] = {}
    for r in results:
        by_model.setdefault(r.config.model, {})[r.config.variant] = r
    table = []
    for model, variants in by_model.items():
        plain, converted = variants["plain"], variants["converted"]
        per_sample = {v: variants[v].saved_bytes / variants[v].config.batch_size for v in VARIANTS}
        table.append({
            "model": model, "batch": plain.config.batch_size, "params": plain.params,
            "saved_mib_plain": plain.saved_bytes / 2**20,
            "saved_mib_converted": converted.saved_bytes / 2**20,
            "saved_ratio": converted.saved_bytes / plain.saved_bytes,
            "saved_mib_per_sample_plain": per_sample["plain"] / 2**20,
            "saved_mib_per_sample_converted": per_sample["converted"] / 2**20,
            "peak_mib_plain": plain.peak_bytes / 2**20,
            "peak_mib_converted": converted.peak_bytes / 2**20,
            "peak_ratio": converted.peak_bytes / plain.peak_bytes if plain.peak_bytes else None,
            "largest_batch_plain": largest_batch(per_sample["plain"], plain.param_bytes, budget),
            "largest_batch_converted": largest_batch(per_sample["converted"],
                                                     converted.param_bytes, budget),
        })
    return table


def format_table(table: list[dict], budget: int) -> str:
    header = (f"{'model':<20} {'saved MiB':>19} {'saved':>6} {'MiB/sample':>15} "
              f"{'peak MiB':>19} {'peak':>6} {'batch in ' + _budget_text(budget):>17}")
    sub = (f"{'':<20} {'plain':>9} {'convert':>9} {'ratio':>6} {'plain':>7} {'convert':>7} "
           f"{'plain':>9} {'convert':>9} {'ratio':>6} {'plain':>8} {'convert':>8}")
    lines = [header, sub, "-" * len(sub)]
    for row in table:
        peak_ratio = f"{row['peak_ratio']:6.2f}" if row["peak_ratio"] is not None else f"{'-':>6}"
        lines.append(
            f"{row['model']:<20} {row['saved_mib_plain']:>9.1f} {row['saved_mib_converted']:>9.1f} "
            f"{row['saved_ratio']:>6.2f} {row['saved_mib_per_sample_plain']:>7.1f} "
            f"{row['saved_mib_per_sample_converted']:>7.1f} {row['peak_mib_plain']:>9.1f} "
            f"{row['peak_mib_converted']:>9.1f} {peak_ratio} {row['largest_batch_plain']:>8} "
            f"{row['largest_batch_converted']:>8}")
    return "\n".join(lines)


def _budget_text(budget: int) -> str:
    return f"{budget / 2**30:g} GiB"


def plot(table: list[dict], path: str, title: str) -> None:
    """Saved activation MiB per sample, plain vs converted, one pair of bars per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(table)), 4))
    positions = range(len(table))
    for offset, variant in ((-0.2, "plain"), (0.2, "converted")):
        ax.bar([p + offset for p in positions],
               [row[f"saved_mib_per_sample_{variant}"] for row in table], width=0.4, label=variant)
    ax.set_xticks(list(positions), [row["model"] for row in table], rotation=15)
    ax.set_ylabel("saved activations per sample (MiB)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    print(json.dumps(asdict(measure(ModelMemoryConfig(**json.loads(sys.argv[1]))))))
