"""Seconds per meta-training iteration of a treatment's network (ANML, SANML or OML at their default sizes): this
project's meta_step against the plain higher loop, same inputs, and the peak memory of each; on CUDA also meta_step
replayed as one CUDA graph (TF32 off, as in training).

    OMNIGLOT_ROOT=../shared/omniglot python benchmarks/meta_step.py [--treatment anml] [--iterations 5] [-d cpu]
"""
from __future__ import annotations

import argparse
import copy
import functools
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import anml  # noqa: E402
import cuda_graph  # noqa: E402
import runtime  # noqa: E402
from datasets import find_root, load_split, sample_meta_train  # noqa: E402
from model import Network, build_model  # noqa: E402


def seconds_per_step(step, tasks, device, warmup: int = 1) -> float:
    """Median seconds of step(*task) over the tasks after the first `warmup`."""
    times = []
    for task in tasks:
        start = time.perf_counter()
        step(*task)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def peak_memory(device) -> float:
    """MB: on CUDA the most allocated since the last reset; on a CPU the process's peak resident size so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def eager(step, model: Network, capturable: bool = False):
    opt = torch.optim.Adam(model.parameters(), lr=0.003, capturable=capturable)
    return functools.partial(step, model, opt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--treatment", choices=["anml", "sanml", "oml"], default="anml",
                   help="whose network and inner loop (default anml)")
    p.add_argument("--iterations", type=int, default=5, help="timed iterations per path (plus warm-up)")
    p.add_argument("-d", "--device", choices=["cpu", "cuda"])
    args = p.parse_args()
    if args.iterations < 1:
        p.error("--iterations must be at least 1")
    device = runtime.set_up(args.device)
    data = load_split(find_root(), "images_background").to(device)
    torch.manual_seed(0)
    tasks = []
    graph_warmup = cuda_graph.WARMUP + 1 if device.type == "cuda" else 0  # eager calls, then the capture
    for _ in range(args.iterations + graph_warmup + 1):
        traj, remember = sample_meta_train(data)
        tasks.append((*data.batch(traj), *data.batch(remember)))
    sizes = {"anml": (256, 112, 2304), "sanml": (256,), "oml": (256,)}[args.treatment]
    model = build_model(args.treatment, sizes).to(device)

    fast, plain = copy.deepcopy(model), copy.deepcopy(model)
    anml.meta_step(fast, torch.optim.SGD(fast.parameters(), lr=1.0), *tasks[0])
    anml.plain_meta_step(plain, torch.optim.SGD(plain.parameters(), lr=1.0), *tasks[0])
    worst, worst_name = max((((a - b).norm() / b.norm()).item(), name) for (name, a), b in
                            zip(fast.named_parameters(), plain.parameters()) if not name.endswith("conv.bias"))

    # The fast path first: on a CPU the peak only grows, so the plain loop's figure is the larger of the two.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_fast = seconds_per_step(eager(anml.meta_step, copy.deepcopy(model)), tasks[graph_warmup:], device)
    m_fast = peak_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_plain = seconds_per_step(eager(anml.plain_meta_step, copy.deepcopy(model)), tasks[graph_warmup:], device)
    m_plain = peak_memory(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    memory = "peak allocated" if device.type == "cuda" else "process's peak resident size after it"
    print(f"{args.treatment}, device {device} ({name}), {torch.get_num_threads()} threads, median of the iterations "
          f"after warm-up; memory: {memory}")
    print(f"plain higher loop  {t_plain:.4f} s/iteration   {m_plain:.0f} MB")
    print(f"anml.meta_step     {t_fast:.4f} s/iteration   {m_fast:.0f} MB   {t_plain / t_fast:.1f}x the plain loop")
    if device.type == "cuda":
        graphed = cuda_graph.CudaGraphed(eager(anml.meta_step, copy.deepcopy(model), capturable=True))
        t_graph = seconds_per_step(graphed, tasks, device, warmup=graph_warmup + 1)
        print(f"one CUDA graph     {t_graph:.4f} s/iteration   {t_plain / t_graph:.1f}x the plain loop, "
              f"{t_fast / t_graph:.1f}x meta_step")
    print(f"largest relative difference of a parameter after one step (SGD lr 1, float32): "
          f"{worst:.1e} ({worst_name})")


if __name__ == "__main__":
    main()
