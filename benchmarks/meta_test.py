"""Seconds for meta-test runs: this project's path (features once, then Adam on each run's fc layer: the runs
together on CUDA, one after another on a CPU) against the plain protocol (the whole model, one Adam step per
drawing), on the same default-size model and classes.

    OMNIGLOT_ROOT=../shared/omniglot python benchmarks/meta_test.py [--classes 600] [--runs 10] [--plain-runs 1]

The plain path takes minutes per 600-class run on a CPU, so it is timed on --plain-runs runs and its figure for
--runs runs is that per-run time multiplied out (each run does the same work); the output says so.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import meta_test  # noqa: E402
import runtime  # noqa: E402
from datasets import find_root, load_split  # noqa: E402
from model import ANML  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=600)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--plain-runs", type=int, default=1)
    p.add_argument("-d", "--device", choices=["cpu", "cuda"])
    args = p.parse_args()
    if min(args.runs, args.plain_runs) < 1:
        p.error("--runs and --plain-runs must be at least 1")
    device = runtime.set_up(args.device)
    data = load_split(find_root(), "images_evaluation").to(device)
    torch.manual_seed(0)
    model = ANML().to(device).eval()

    def timed(fn):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    features = []
    t_features = timed(lambda: features.append(meta_test.gated_features(model, data)))
    seeds = list(range(args.runs))
    t_fast = timed(lambda: meta_test.meta_test_runs(model, features[0], data, args.classes, 0.001, seeds))
    plain_runs = lambda: [meta_test.plain_meta_test_run(copy.deepcopy(model), data, args.classes, 0.001, seed=run)
                          for run in range(args.plain_runs)]
    t_plain = timed(plain_runs) / args.plain_runs
    fast_total, plain_total = t_features + t_fast, t_plain * args.runs
    print(f"device {device}, {torch.get_num_threads()} threads, {args.classes} classes")
    print(f"plain protocol   {t_plain:.1f} s/run (timed over {args.plain_runs} run(s)); "
          f"{args.runs} runs: {plain_total:.0f} s (per-run time x {args.runs})")
    print(f"fast             features of all {len(data.labels)} drawings {t_features:.1f} s + "
          f"{t_fast / args.runs:.1f} s/run; {args.runs} runs: {fast_total:.0f} s")
    print(f"speed-up         {plain_total / fast_total:.1f}x for {args.runs} runs with feature extraction, "
          f"{t_plain * args.runs / t_fast:.1f}x without")


if __name__ == "__main__":
    main()
