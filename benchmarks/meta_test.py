"""Seconds for meta-test runs: this project's path (features once, then Adam on each run's fc layer: the runs
together on CUDA, one after another on a CPU), with denormal floats flushed as eval_omni.py runs it and kept,
against the plain protocol (the whole model, one Adam step per drawing), on the same model and classes.

    OMNIGLOT_ROOT=../shared/omniglot python benchmarks/meta_test.py [-m MODEL] [--classes 600] [--runs 10] \
        [--plain-runs 1] [--learn inner]

The model is the shipped one unless -m names another: a trained model's tiny features are what make denormals.
The plain path takes minutes per 600-class run on a CPU, so it is timed on --plain-runs runs and its figure for
--runs runs is that per-run time multiplied out (each run does the same work); the output says so. Each path runs
in a thread of its own, flushing denormals or not (runtime.call_in_new_thread); the plain path keeps them, as the
reference code does. With --learn inner or all, it also times that meta-test, which eval_omni.py runs as the plain
protocol does, a PyTorch step a drawing on the whole model (denormals flushed, as eval_omni.py runs it).
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
from checkpoints import load_model  # noqa: E402
from datasets import find_root, load_split  # noqa: E402
from eval_omni import SHIPPED_MODEL  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", type=Path, default=SHIPPED_MODEL, help="checkpoint (default the shipped model)")
    p.add_argument("--classes", type=int, default=600)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--plain-runs", type=int, default=1)
    p.add_argument("--learn", choices=["inner", "all"], help="also time a meta-test with these learning")
    p.add_argument("-d", "--device", choices=["cpu", "cuda"])
    args = p.parse_args()
    if min(args.runs, args.plain_runs) < 1:
        p.error("--runs and --plain-runs must be at least 1")
    device = runtime.set_up(args.device)
    data = load_split(find_root(), "images_evaluation").to(device)
    model = load_model(args.model, device).eval()

    def timed(fn, flush):
        def run():
            start = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start, result
        return runtime.call_in_new_thread(run, flush)

    t_features, features = timed(lambda: meta_test.gated_features(model, data), flush=True)
    meta_test.meta_test_runs(model, features, data, 2, 0.001, [0])  # compiles the step, outside the timings
    seeds = list(range(args.runs))
    fast = lambda: meta_test.meta_test_runs(model, features, data, args.classes, 0.001, seeds)
    t_flushed, flushed = timed(fast, flush=True)
    t_kept, kept = timed(fast, flush=False)
    plain_runs = lambda: [meta_test.plain_meta_test_run(copy.deepcopy(model), data, args.classes, 0.001, seed=run)
                          for run in range(args.plain_runs)]
    t_plain = timed(plain_runs, flush=False)[0] / args.plain_runs
    fast_total, plain_total = t_features + t_flushed, t_plain * args.runs
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), {torch.get_num_threads()} threads, {args.model.name}, {args.classes} classes")
    print(f"plain protocol   {t_plain:.1f} s/run (timed over {args.plain_runs} run(s)); "
          f"{args.runs} runs: {plain_total:.0f} s (per-run time x {args.runs})")
    print(f"fast             features of all {len(data.labels)} drawings {t_features:.1f} s + "
          f"{t_flushed / args.runs:.1f} s/run; {args.runs} runs: {fast_total:.0f} s")
    print(f"  denormals kept {t_kept / args.runs:.1f} s/run: flushing them makes the runs {t_kept / t_flushed:.1f}x "
          f"faster; largest difference in test accuracy "
          f"{(flushed.test_accuracy - kept.test_accuracy).abs().max().item():.1e}, in fc weight "
          f"{(flushed.weight - kept.weight).abs().max().item():.1e}")
    print(f"speed-up         {plain_total / fast_total:.1f}x for {args.runs} runs with feature extraction, "
          f"{t_plain * args.runs / t_flushed:.1f}x without")
    if args.learn:
        learning = lambda: [meta_test.plain_meta_test_run(copy.deepcopy(model), data, args.classes, 0.001, seed=run,
                                                          learn=args.learn) for run in range(args.plain_runs)]
        t_learn = timed(learning, flush=True)[0] / args.plain_runs
        print(f"--learn {args.learn:<6}  {t_learn:.1f} s/run, a PyTorch step a drawing (timed over {args.plain_runs} "
              f"run(s)), {t_learn / t_plain:.2f}x the plain protocol's fc-only run")


if __name__ == "__main__":
    main()
