"""Several independent meta-training runs on one GPU at once: K models, each with its own capturable Adam and its own
CUDA graph of meta_step, replayed one after another on one stream, or each on a stream of its own. Prints
run-iterations per second against one run alone, and how far each run's losses stray from those of the same run
replayed alone.

    OMNIGLOT_ROOT=../shared/omniglot python benchmarks/concurrent_runs.py [--runs 1 2 4] [--iterations 20]

One replay fills a fraction of the GPU, so concurrent streams could multiply a study's throughput. With PyTorch's
default cuBLAS workspace, two graphs on two streams hang in torch.cuda.synchronize() after their first concurrent
replay (PyTorch 2.11, H200, twice); with CUBLAS_WORKSPACE_CONFIG=:0:0 (no cuBLAS workspace) they do not: every graph
is captured on torch.cuda.graph's one default capture stream, while PyTorch keeps a cuBLAS workspace per handle and
stream; so a third mode captures each graph on a stream of its own, with whichever workspace setting is given. A
watchdog prints every thread's stack and ends the process when a phase runs past --watchdog seconds.
On a GPU the losses do not show exactness: two replays of one run are not bitwise equal there, and 20 Adam steps
amplify that (one run replayed on its own stream strays 1e-1 from itself replayed alone); benchmarks/README.md has
the figures.
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import anml  # noqa: E402
import cuda_graph  # noqa: E402
import runtime  # noqa: E402
from datasets import find_root, load_split, sample_meta_train  # noqa: E402
from model import ANML  # noqa: E402


def graphed_run(seed: int) -> cuda_graph.CudaGraphed:
    torch.manual_seed(seed)
    net = ANML().cuda()
    opt = torch.optim.Adam(net.parameters(), lr=0.001)
    cuda_graph.make_capturable(opt)
    return cuda_graph.CudaGraphed(functools.partial(anml.meta_step, net, opt))


@contextlib.contextmanager
def own_capture_streams():
    """Each graph captured on a stream of its own, not on torch.cuda.graph's one default capture stream: PyTorch keeps
    a cuBLAS workspace per handle and stream, so graphs captured on one stream share one workspace, which graphs
    replayed at once on several streams would then use at once."""
    original = torch.cuda.graph
    torch.cuda.graph = lambda graph, **kwargs: original(graph, stream=torch.cuda.Stream(), **kwargs)
    try:
        yield
    finally:
        torch.cuda.graph = original


def run_all(steps, tasks, iterations: int, streams: list[torch.cuda.Stream] | None) -> tuple[float, list]:
    """Seconds per round (one iteration of every run) over `iterations` rounds after the warm-up and capture, and
    each run's losses over all rounds."""
    losses = [[] for _ in steps]
    main = torch.cuda.current_stream()
    start = 0.0
    for it in range(cuda_graph.WARMUP + 1 + iterations):
        if it == cuda_graph.WARMUP + 1:
            torch.cuda.synchronize()
            start = time.perf_counter()
        for k, step in enumerate(steps):
            task = tasks[k][it]
            if streams is None:
                losses[k].append(step(*task)[0])
                continue
            streams[k].wait_stream(main)
            with torch.cuda.stream(streams[k]):
                losses[k].append(step(*task)[0])
        if streams is not None:
            for s in streams:
                main.wait_stream(s)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iterations, [torch.stack(run).cpu() for run in losses]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="+", default=[1, 2, 4], help="numbers of concurrent runs to time")
    p.add_argument("--iterations", type=int, default=20, help="timed rounds after warm-up and capture")
    p.add_argument("--watchdog", type=float, default=120, help="seconds a phase may take before the process ends")
    args = p.parse_args()
    if args.iterations < 1 or min(args.runs) < 1 or args.watchdog <= 0:
        p.error("--iterations, --runs and --watchdog must be positive")
    if not torch.cuda.is_available():
        p.error("PyTorch sees no CUDA device here: this benchmark is for a GPU")
    device = runtime.set_up("cuda")
    data = load_split(find_root(), "images_background").to(device)
    rounds = cuda_graph.WARMUP + 1 + args.iterations
    tasks = []
    for k in range(max(args.runs)):
        torch.manual_seed(100 + k)
        tasks.append([(*data.batch(t), *data.batch(r)) for t, r in (sample_meta_train(data) for _ in range(rounds))])
    print(f"{torch.cuda.get_device_name(device)}, PyTorch {torch.__version__}, {args.iterations} timed rounds")
    faulthandler.dump_traceback_later(args.watchdog, exit=True)
    alone_s, alone = run_all([graphed_run(0)], tasks, args.iterations, None)
    alone_losses = [alone[0]]
    for k in range(1, max(args.runs)):  # each run alone, to compare the concurrent ones with
        alone_losses.append(run_all([graphed_run(k)], tasks[k:], args.iterations, None)[1][0])
    print(f"1 run: {alone_s * 1000:.1f} ms an iteration", flush=True)
    # The mode that hung last: a hang ends the process, and the modes before it have printed their rows.
    for mode in ("one stream", "a stream each, captured on it", "a stream each"):
        for n in args.runs:
            if n == 1 and mode != "one stream":
                continue
            faulthandler.dump_traceback_later(args.watchdog, exit=True)
            streams = [torch.cuda.Stream() for _ in range(n)] if mode != "one stream" else None
            with own_capture_streams() if mode == "a stream each, captured on it" else contextlib.nullcontext():
                steps = [graphed_run(k) for k in range(n)]
                seconds, losses = run_all(steps, tasks, args.iterations, streams)
            stray = max(((a - b).abs() / b).max().item() for a, b in zip(losses, alone_losses))
            print(f"{n} runs, {mode}: {seconds * 1000:.1f} ms a round, {n * alone_s / seconds:.2f}x the run-iterations "
                  f"per second of one run; losses at most {stray:.1e} (relative) from each run's alone", flush=True)
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
