"""Training-step time of converted torchvision models with the BN+act recipes of
cnnkernels/nn/recompute.py on and off, and of the plain model, timed round-robin in one process
(cnnkernels.profile.compare_times), with the saved activation bytes of each.

    python tools/recompute_ab.py --models mobilenet_v2,resnet50 --batch 8 --image 224 --reps 5
"""
from __future__ import annotations

import argparse
import contextlib
import json

import torch

from cnnkernels import profile
from cnnkernels.models_bench import build
from cnnkernels.nn import pool, recompute


@contextlib.contextmanager
def recipes(enabled: bool):
    saved = recompute.recipes_apply, pool.rebuilding_applies
    if not enabled:
        recompute.recipes_apply = lambda bn, z: False
        pool.rebuilding_applies = lambda x: False
    try:
        yield
    finally:
        recompute.recipes_apply, pool.rebuilding_applies = saved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mobilenet_v2,resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    profile.keep_cpu_memory_mapped()
    rows = []
    for name in args.models.split(","):
        plain, converted, _ = build(name, torch.device("cpu"), torch.float32)
        plain.train(), converted.train()
        x = torch.randn(args.batch, 3, args.image, args.image)

        def step(model, enabled):
            def run():
                with recipes(enabled):
                    model(x).square().mean().backward()
                model.zero_grad(set_to_none=True)
            return run

        times = profile.compare_times({"plain": step(plain, True),
                                       "recipes": step(converted, True),
                                       "no_recipes": step(converted, False)},
                                      "cpu", warmup=1, reps=args.reps)
        with recipes(True):
            saved_on = profile.saved_activation_bytes(converted, x)
        with recipes(False):
            saved_off = profile.saved_activation_bytes(converted, x)
        saved_plain = profile.saved_activation_bytes(plain, x)
        row = {"model": name, "batch": args.batch, "image": args.image,
               **{f"{k}_s": v for k, v in times.items()},
               "speedup_recipes": times["plain"] / times["recipes"],
               "speedup_no_recipes": times["plain"] / times["no_recipes"],
               "saved_mib_plain": saved_plain / 2**20, "saved_mib_recipes": saved_on / 2**20,
               "saved_mib_no_recipes": saved_off / 2**20}
        rows.append(row)
        print(f"{name:20s} step plain {times['plain'] * 1e3:8.1f} ms  recipes "
              f"{times['recipes'] * 1e3:8.1f} ms ({row['speedup_recipes']:.2f}x)  no recipes "
              f"{times['no_recipes'] * 1e3:8.1f} ms ({row['speedup_no_recipes']:.2f}x)  saved MiB "
              f"plain {row['saved_mib_plain']:.0f} recipes {row['saved_mib_recipes']:.0f} "
              f"no recipes {row['saved_mib_no_recipes']:.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
