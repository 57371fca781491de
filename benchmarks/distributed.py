"""Meta-training throughput with K workers (torch.distributed, gloo on CPU) against one process.

    OMNIGLOT_ROOT=../shared/omniglot python benchmarks/distributed.py [--workers 1 2] [--iterations 5]

Each worker gets cores / K threads, so every configuration uses the whole machine. A meta-batch of K tasks
per iteration: tasks/s = K x iterations/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import anml  # noqa: E402
import runtime  # noqa: E402
from anml import RunConfig, RunState  # noqa: E402
from datasets import find_root, load_split  # noqa: E402


def worker(rank: int, workers: int, iterations: int, store: str, result: mp.SimpleQueue) -> None:
    torch.set_num_threads(max(1, os.cpu_count() // workers))
    if workers > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=workers)
    runtime.keep_freed_memory()
    data = load_split(find_root(), "images_background")
    state = RunState.fresh(RunConfig(), torch.device("cpu"))
    step = anml.eager_step(state.model, state.optimizer, state.config.inner_lr)
    for it in range(iterations + 1):
        if it == 1:  # the first iteration warms up
            start = time.perf_counter()
        anml.meta_iteration(state.model, data, step)
    if rank == 0:
        result.put(iterations / (time.perf_counter() - start))
    if workers > 1:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--iterations", type=int, default=5)
    args = p.parse_args()
    if min(args.iterations, *args.workers) < 1:
        p.error("--workers and --iterations must be at least 1")
    base = None
    for k in args.workers:
        result = mp.get_context("spawn").SimpleQueue()
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(worker, args=(k, args.iterations, f"{tmp}/store", result), nprocs=k)
        its = result.get()
        base = base or its
        print(f"K={k}: {its:.3f} iterations/s, {k * its:.3f} tasks/s "
              f"({k * its / base:.2f}x the tasks/s of K={args.workers[0]}), {os.cpu_count() // k} thread(s) per worker")


if __name__ == "__main__":
    main()
