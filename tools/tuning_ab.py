"""Converted torchvision models with tuning on (cnnkernels.tuning, mode auto) and off, and the
plain model, timed round-robin in one process (cnnkernels.profile.compare_times): inference at the
given batches and a training step, with the tuning cost of the first step.

    python tools/tuning_ab.py --models mobilenet_v3_small,mobilenet_v2 --batches 1,8 --reps 7
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from cnnkernels import profile, tuning
from cnnkernels.models_bench import build, step_fn


def with_mode(fn, mode: str):
    def run():
        with tuning.use_tuning(mode):
            fn()
    return run


def measure(name: str, batch: int, image: int, direction: str, reps: int,
            with_compile: bool = False) -> dict:
    plain, converted, _ = build(name, torch.device("cpu"), torch.float32)
    x = torch.randn(batch, 3, image, image)
    tuned = with_mode(step_fn(converted, x, direction), "auto")
    before = tuning.statistics_of_tuning()["seconds"]
    started = time.perf_counter()
    tuned()
    first = time.perf_counter() - started
    tuning_s = tuning.statistics_of_tuning()["seconds"] - before
    fns = {"plain": step_fn(plain, x, direction),
           "off": with_mode(step_fn(converted, x, direction), "off"), "auto": tuned}
    if with_compile:  # compile(converted) traces with the decisions tuning made above
        torch._dynamo.reset()
        fns["compile_plain"] = step_fn(torch.compile(plain), x, direction)
        fns["compile_converted"] = with_mode(step_fn(torch.compile(converted), x, direction),
                                             "auto")
    times = profile.compare_times(fns, "cpu", warmup=1, reps=reps)
    chosen = [r["choice"] for r in tuning.decisions_of(converted)]
    return {"model": name, "batch": batch, "image": image, "pass": direction, "median_s": times,
            "off_speedup": times["plain"] / times["off"],
            "auto_speedup": times["plain"] / times["auto"], "first_step_s": first,
            "tuning_s": tuning_s, "layers_torch": chosen.count("torch"),
            "compiled_converted_vs_compiled_plain": times["compile_plain"] / times[
                "compile_converted"] if with_compile else None,
            "layers_ours": chosen.count("ours")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mobilenet_v3_small,mobilenet_v2,resnet18")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--train", action="store_true", help="also a training step at each batch")
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile of the plain and of the converted model")
    parser.add_argument("--json")
    args = parser.parse_args()
    profile.keep_cpu_memory_mapped()
    rows = []
    print(f"{'model':<20} {'pass':<10} {'batch':>5} {'plain ms':>9} {'off':>7} {'auto':>7} "
          f"{'torch/ours layers':>18} {'tuning ms':>10}")
    for name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            for direction in ("inference", "training") if args.train else ("inference",):
                tuning.clear_memory()
                row = measure(name, batch, args.image, direction, args.reps, args.compile)
                rows.append(row)
                compiled = "" if not args.compile else (
                    f"  compile(plain) {row['median_s']['compile_plain'] * 1e3:.1f} ms, "
                    f"compile(converted) / compile(plain) "
                    f"{row['compiled_converted_vs_compiled_plain']:.2f}x")
                print(f"{name:<20} {direction:<10} {batch:>5} {row['median_s']['plain'] * 1e3:>9.1f} "
                      f"{row['off_speedup']:>6.2f}x {row['auto_speedup']:>6.2f}x "
                      f"{row['layers_torch']:>8}/{row['layers_ours']:<9} {row['tuning_s'] * 1e3:>10.0f}"
                      f"{compiled}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
