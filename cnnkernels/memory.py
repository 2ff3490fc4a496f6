"""Memory and time of DenseNet-BC training steps per memory mode (`cnnkernels memory densenet`).

Memory: each configuration (depth × implementation) runs in a fresh Python process, so one
configuration's heap never pollutes another's numbers: it builds the model, takes one warm-up step,
measures the peak memory of one training step (forward, cross-entropy, backward) and counts the bytes
autograd keeps after a forward. Time: for each depth, one more process builds the model once per
implementation (same weights) and times their steps round-robin (A, B, C, A, B, C, ...), so drifts
of the machine hit every implementation alike; medians are reported. These are the numbers of the
paper's Figure 4 and Table 1 (Pleiss et al., 2017).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

IMPLS = ("naive", "checkpoint", "shared")


@dataclass
class MemoryConfig:
    depth: int
    growth_rate: int
    batch_size: int
    impl: str
    device: str
    dtype: str = "float32"
    image_size: int = 32
    steps: int = 3
    seed: int = 0


@dataclass
class MemoryResult:
    config: MemoryConfig
    params: int
    peak_bytes: int
    saved_bytes: int
    step_seconds: float = float("nan")
    step_samples: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _training_step(config: MemoryConfig):
    """The model, its input and a training step for one configuration."""
    from .models import densenet_bc

    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    torch.manual_seed(config.seed)
    model = densenet_bc(config.depth, config.growth_rate, memory=config.impl).to(device, dtype)
    model.train()
    x = torch.randn(config.batch_size, 3, config.image_size, config.image_size, device=device,
                    dtype=dtype)
    target = torch.randint(0, 10, (config.batch_size,), device=device)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return model, x, step


def measure_memory(config: MemoryConfig) -> MemoryResult:
    """Peak and saved bytes of one configuration, in this (fresh) process."""
    from . import profile

    device = torch.device(config.device)
    if device.type == "cpu":
        profile.return_freed_cpu_memory()
    model, x, step = _training_step(config)
    step()  # warm-up: lazy initialisation, kernel caches
    _sync(device)
    peak = profile.peak_memory(step, device)
    saved = profile.saved_activation_bytes(model, x)
    return MemoryResult(config, sum(p.numel() for p in model.parameters()), peak, saved)


def measure_times(configs: list[MemoryConfig]) -> list[list[float]]:
    """Step times of several configurations (one depth, several implementations), round-robin
    in this process; returns the samples per configuration."""
    from . import profile

    device = torch.device(configs[0].device)
    if device.type == "cpu":
        profile.keep_cpu_memory_mapped()  # time kernels, not page faults
    steps = [_training_step(config)[2] for config in configs]
    for step in steps:
        step()  # warm-up; on the CPU also grows the kept heap to the step's peak
    samples: list[list[float]] = [[] for _ in configs]
    for _ in range(configs[0].steps):
        for index, step in enumerate(steps):
            _sync(device)
            begin = time.perf_counter()
            step()
            _sync(device)
            samples[index].append(time.perf_counter() - begin)
    return samples


def _run_worker(mode: str, payload) -> object:
    proc = subprocess.run([sys.executable, "-m", "cnnkernels.memory", mode, json.dumps(payload)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"cnnkernels: the memory worker ({mode}) failed:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_in_subprocess(config: MemoryConfig) -> MemoryResult:
    """`measure_memory(config)` in a fresh interpreter."""
    payload = _run_worker("memory", asdict(config))
    payload["config"] = MemoryConfig(**payload["config"])
    return MemoryResult(**payload)


def times_in_subprocess(configs: list[MemoryConfig]) -> list[list[float]]:
    """`measure_times(configs)` in a fresh interpreter."""
    return _run_worker("times", [asdict(c) for c in configs])  # type: ignore[return-value]


def with_times(results: list[MemoryResult], samples: list[list[float]]) -> list[MemoryResult]:
    return [replace(r, step_seconds=statistics.median(s), step_samples=s)
            for r, s in zip(results, samples)]


def rows_with_ratios(results: list[MemoryResult]) -> list[dict]:
    """One row per result, with memory and time relative to "naive" at the same depth."""
    naive = {r.config.depth: r for r in results if r.config.impl == "naive"}
    rows = []
    for r in results:
        base = naive.get(r.config.depth)
        rows.append({
            "depth": r.config.depth, "impl": r.config.impl, "params": r.params,
            "peak_mib": r.peak_bytes / 2**20, "saved_mib": r.saved_bytes / 2**20,
            "step_s": r.step_seconds,
            "peak_vs_naive": r.peak_bytes / base.peak_bytes if base else None,
            "time_vs_naive": r.step_seconds / base.step_seconds if base else None,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    header = (f"{'depth':>5}  {'params':>9}  {'impl':<10}  {'peak MiB':>9}  {'saved MiB':>9}  "
              f"{'step s':>7}  {'peak/naive':>10}  {'time/naive':>10}")
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = lambda v: f"{v:10.2f}" if v is not None else f"{'-':>10}"  # noqa: E731
        lines.append(f"{row['depth']:>5}  {row['params']:>9,}  {row['impl']:<10}  "
                     f"{row['peak_mib']:>9.1f}  {row['saved_mib']:>9.1f}  {row['step_s']:>7.3f}  "
                     f"{ratio(row['peak_vs_naive'])}  {ratio(row['time_vs_naive'])}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    """Peak memory vs depth, one line per implementation (the paper's Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in IMPLS:
        points = sorted((r["depth"], r["peak_mib"]) for r in rows if r["impl"] == impl)
        if points:
            ax.plot(*zip(*points), marker="o", label=impl)
    ax.set_xlabel("DenseNet-BC depth (layers)")
    ax.set_ylabel("peak memory of a training step (MiB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _worker_main(argv: list[str]) -> int:
    mode, payload = argv[0], json.loads(argv[1])
    if mode == "memory":
        print(json.dumps(asdict(measure_memory(MemoryConfig(**payload)))))
    elif mode == "times":
        print(json.dumps(measure_times([MemoryConfig(**c) for c in payload])))
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
