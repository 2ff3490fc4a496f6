"""Turn pytest-benchmark JSON into a markdown table of medians and speed ratios.

    python bench/compare.py out.json [more.json ...]

For each group (one op, shape, dtype and direction) it prints each implementation's median and
the ratio torch-eager median / implementation median (> 1: faster than PyTorch eager). Where the
suite also timed an implementation round-robin with PyTorch eager on the same tensors
(`speedup_vs_torch_interleaved`), that ratio is printed too: it is the one to quote, since
separate benchmarks run at different moments of a possibly noisy machine.
"""
from __future__ import annotations

import collections
import json
import sys


def load_rows(paths: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Medians per group and implementation, and the interleaved speed-ups where measured."""
    groups: dict[str, dict[str, float]] = collections.defaultdict(dict)
    interleaved: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for bench in data["benchmarks"]:
            impl = bench["extra_info"].get("impl", bench["name"])
            groups[bench["group"]][impl] = bench["stats"]["median"]
            if "speedup_vs_torch_interleaved" in bench["extra_info"]:
                interleaved[bench["group"]][impl] = bench["extra_info"]["speedup_vs_torch_interleaved"]
    return groups, interleaved


def markdown(groups: dict[str, dict[str, float]],
             interleaved: dict[str, dict[str, float]]) -> str:
    impls = sorted({impl for medians in groups.values() for impl in medians},
                   key=lambda name: (name != "torch", name != "torch.compile", name))
    others = [impl for impl in impls if impl != "torch"]
    with_interleaved = [i for i in others if any(i in row for row in interleaved.values())]
    header = (["case"] + [f"{impl} ms" for impl in impls] + [f"{i} speed-up" for i in others]
              + [f"{i} speed-up (round-robin)" for i in with_interleaved])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, medians in sorted(groups.items()):
        times = [f"{medians[i] * 1e3:.3f}" if i in medians else "" for i in impls]
        ratios = [f"{medians['torch'] / medians[i]:.2f}x" if i in medians and "torch" in medians
                  else "" for i in others]
        robust = [f"{interleaved[group][i]:.2f}x" if i in interleaved.get(group, {}) else ""
                  for i in with_interleaved]
        lines.append("| " + " | ".join([group] + times + ratios + robust) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    print(markdown(*load_rows(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
