"""Seconds per meta-training iteration: this project's meta_step against the plain higher loop, same inputs.

    OMNIGLOT_ROOT=../shared/omniglot python benchmarks/meta_step.py [--iterations 5] [-d cpu]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import anml  # noqa: E402
import runtime  # noqa: E402
from datasets import find_root, load_split, sample_meta_train  # noqa: E402
from model import ANML  # noqa: E402


def seconds_per_step(step, model, tasks, device) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    times = []
    for task in tasks:
        start = time.perf_counter()
        step(model, opt, *task)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first call warms up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=5, help="timed iterations per path (plus one warm-up)")
    p.add_argument("-d", "--device", choices=["cpu", "cuda"])
    args = p.parse_args()
    device = runtime.resolve_device(args.device)
    runtime.keep_freed_memory()
    data = load_split(find_root(), "images_background").to(device)
    torch.manual_seed(0)
    tasks = []
    for _ in range(args.iterations + 1):
        traj, remember = sample_meta_train(data)
        tasks.append((*data.batch(traj), *data.batch(remember)))
    model = ANML().to(device)

    fast, plain = copy.deepcopy(model), copy.deepcopy(model)
    anml.meta_step(fast, torch.optim.SGD(fast.parameters(), lr=1.0), *tasks[0])
    anml.plain_meta_step(plain, torch.optim.SGD(plain.parameters(), lr=1.0), *tasks[0])
    worst, worst_name = max((((a - b).norm() / b.norm()).item(), name) for (name, a), b in
                            zip(fast.named_parameters(), plain.parameters()) if not name.endswith("conv.bias"))

    t_fast = seconds_per_step(anml.meta_step, copy.deepcopy(model), tasks, device)
    t_plain = seconds_per_step(anml.plain_meta_step, copy.deepcopy(model), tasks, device)
    print(f"device {device}, {torch.get_num_threads()} threads, median of {args.iterations} iterations")
    print(f"plain higher loop  {t_plain:.3f} s/iteration")
    print(f"anml.meta_step     {t_fast:.3f} s/iteration")
    print(f"speed-up           {t_plain / t_fast:.1f}x")
    print(f"largest relative difference of a parameter after one step (SGD lr 1, float32): "
          f"{worst:.1e} ({worst_name})")


if __name__ == "__main__":
    main()
