"""Turn pytest-benchmark JSON into a markdown table of medians and speed ratios.

    python bench/compare.py out.json [more.json ...]

For each group (one op, shape, dtype and direction) it prints each implementation's median and
the ratio torch-eager median / implementation median (> 1: faster than PyTorch eager).
"""
from __future__ import annotations

import collections
import json
import sys


def load_rows(paths: list[str]) -> dict[str, dict[str, float]]:
    groups: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for bench in data["benchmarks"]:
            impl = bench["extra_info"].get("impl", bench["name"])
            groups[bench["group"]][impl] = bench["stats"]["median"]
    return groups


def markdown(groups: dict[str, dict[str, float]]) -> str:
    impls = sorted({impl for medians in groups.values() for impl in medians},
                   key=lambda name: (name != "torch", name != "torch.compile", name))
    header = ["case"] + [f"{impl} ms" for impl in impls] + [
        f"{impl} speed-up" for impl in impls if impl != "torch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, medians in sorted(groups.items()):
        times = [f"{medians[i] * 1e3:.3f}" if i in medians else "" for i in impls]
        ratios = [f"{medians['torch'] / medians[i]:.2f}x" if i in medians and "torch" in medians
                  else "" for i in impls if i != "torch"]
        lines.append("| " + " | ".join([group] + times + ratios) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    print(markdown(load_rows(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
