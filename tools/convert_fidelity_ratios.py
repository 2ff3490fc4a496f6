"""Issue 21's float32 gradient metric for the models of tests/test_convert_fidelity.py.

Per seed: (converted float32 error + 1e-6) / (original float32 error + 1e-6), errors as max |g - g
of the original in float64|, for the input gradient and the worst parameter. With --control the
converted model is replaced by the original fed its input nudged by one ulp: the metric's own noise.

    .venv/bin/python tools/convert_fidelity_ratios.py [--control] [--json FILE] [MODEL ...]
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import test_convert_fidelity as fidelity  # noqa: E402

import cnnkernels  # noqa: E402

FLOOR = 1e-6
SEEDS = (0, 1, 2)


def ratios(source: str, name: str, seed: int, control: bool) -> tuple[float, float, str]:
    model = fidelity._model(source, name)
    fidelity._randomise_norms(model)
    model.train()
    reference = copy.deepcopy(model).double()
    other = copy.deepcopy(model) if control else cnnkernels.convert(model)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, 64, generator=generator)
    upstream = torch.randn(2, 1000, generator=generator)
    x_other = torch.nextafter(x, torch.full_like(x, float("inf"))) if control else x
    _, gx64, g64 = fidelity._step(reference, x.double(), upstream.double())
    _, gx_o, g_o = fidelity._step(model, x, upstream)
    _, gx_c, g_c = fidelity._step(other, x_other, upstream)

    def ratio(ours, theirs, exact):
        return (fidelity._error(ours, exact) + FLOOR) / (fidelity._error(theirs, exact) + FLOOR)

    per_parameter = {n: ratio(g_c[n], g_o[n], g) for n, g in g64.items()}
    worst = max(per_parameter, key=per_parameter.get)
    return ratio(gx_c, gx_o, gx64), per_parameter[worst], worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: every CI model)")
    parser.add_argument("--control", action="store_true", help="the one-ulp control")
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [("torchvision", n) for n in fidelity.TORCHVISION_MODELS] + \
        [("timm", n) for n in fidelity.TIMM_MODELS]
    rows = []
    for source, name in cases:
        if args.models and name not in args.models:
            continue
        results = [ratios(source, name, seed, args.control) for seed in SEEDS]
        rows.append({"source": source, "name": name, "input": [r[0] for r in results],
                     "worst": [r[1] for r in results], "worst_name": [r[2] for r in results]})
        row = rows[-1]
        print(f"{source}:{name} input {' / '.join(f'{v:.2g}' for v in row['input'])} "
              f"(median {statistics.median(row['input']):.2f}), worst parameter "
              f"{' / '.join(f'{v:.2g}' for v in row['worst'])} "
              f"(median {statistics.median(row['worst']):.2f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
