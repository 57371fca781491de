"""Candidate changes to the meta-step, each against today's `anml.meta_step` from the same weights and task: the
largest relative difference of a gradient, seconds per step (eager; on CUDA also one graph replay) and how much the
step launches (aten operators on a CPU; kernels and their summed time on CUDA, over one replay).

    OMNIGLOT_ROOT=../shared/omniglot python benchmarks/step_variants.py [-d cuda] [--iterations 10]

The candidates are the issue's ways to fewer, fatter kernels on a GPU, where a replay is bound by its thousands of
tiny kernels; one that wins there, by a margin beyond the noise of this script, moves into model.py or anml.py:
    fused-norm     the instance norm's backward as one native kernel, and its double backward (what the outer
                   step differentiates through the inner loop) written out in a dozen operations
    no-conv-bias   the convs without their bias, which the instance norm after each one cancels exactly
    foreach-sgd    higher's inner SGD update as one foreach add per step, not a multiply and an add per parameter
    adam-outside   (CUDA) the graph holds the meta-gradient only, Adam steps eagerly after it: what train_omni.py
                   does under torchrun, where the all-reduce of the gradients comes between the two
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import higher
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import anml  # noqa: E402
import cuda_graph  # noqa: E402
import model  # noqa: E402
import runtime  # noqa: E402
from datasets import find_root, load_split, sample_meta_train  # noqa: E402
from meta_step import seconds_per_step  # noqa: E402

aten = torch.ops.aten


class _NormBackward(torch.autograd.Function):
    """Instance norm's backward, (g, x, w) -> (dx, dw, db), with its own backward written out.

    Per image and channel, with x̂ = (x - mean) r, r = 1 / sqrt(var + eps), P = mean(g x̂):
    dx = w r (g - mean(g) - x̂ P), dw = sum(g x̂), db = sum(g).
    """

    @staticmethod
    def forward(ctx, g, x, w, mean, rstd):
        n, c = x.shape[:2]
        ctx.save_for_backward(g, x, w, mean, rstd)
        return aten.native_group_norm_backward(g, x, mean, rstd, w, n, c, x[0, 0].numel(), c, [True] * 3)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, a, alpha, beta):
        g, x, w, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        m, hw = x[0, 0].numel(), (2, 3)
        r, w, alpha, beta = rstd.view(n, c, 1, 1), w.view(1, c, 1, 1), alpha.view(1, c, 1, 1), beta.view(1, c, 1, 1)
        a = torch.zeros_like(x) if a is None else a
        xh = (x - mean.view(n, c, 1, 1)) * r
        g_c, a_c = g - g.mean(hw, keepdim=True), a - a.mean(hw, keepdim=True)
        p = (g * xh).mean(hw, keepdim=True)
        q = (a * xh).sum(hw, keepdim=True)
        s = (a * g_c).sum(hw, keepdim=True)
        d_g = w * r * (a_c - xh * q / m) + alpha * xh + beta
        d_x = -w * r * r * (q / m * g_c + p * a_c + xh * (s - 3 * p * q) / m) + alpha * r * (g_c - xh * p)
        d_w = (r * a * (g_c - xh * p)).sum((0, 2, 3))
        return d_g, d_x, d_w, None, None


class _InstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, eps):
        n, c = x.shape[:2]
        out, mean, rstd = aten.native_group_norm(x, w, b, n, c, x[0, 0].numel(), c, eps)
        ctx.save_for_backward(x, w, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, g):
        return *_NormBackward.apply(g, *ctx.saved_tensors), None


def instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """F.group_norm(x, channels, weight, bias, eps), differentiable twice through the fused backward."""
    return _InstanceNorm.apply(x, weight, bias, eps)


def _finish(block: model.ConvBlock, x: torch.Tensor) -> torch.Tensor:
    return F.relu(model.max_pool(x) if block.pool else x)


def fused_norm(block: model.ConvBlock, x: torch.Tensor) -> torch.Tensor:
    return _finish(block, instance_norm(block.conv(x), block.norm.weight, block.norm.bias, block.norm.eps))


def no_conv_bias(block: model.ConvBlock, x: torch.Tensor) -> torch.Tensor:
    return _finish(block, block.norm(F.conv2d(x, block.conv.weight)))


def both(block: model.ConvBlock, x: torch.Tensor) -> torch.Tensor:
    conv = F.conv2d(x, block.conv.weight)
    return _finish(block, instance_norm(conv, block.norm.weight, block.norm.bias, block.norm.eps))


def foreach_sgd_update(self, grouped_grads, **kwargs) -> None:
    """higher's DifferentiableSGD update, p - lr g for every parameter, as one foreach add per group (no momentum and
    no weight decay, as the inner loop has none)."""
    for group, grads in zip(self.param_groups, grouped_grads):
        live = [i for i, g in enumerate(grads) if g is not None]
        moved = torch._foreach_add([group["params"][i] for i in live], [grads[i] for i in live], alpha=-group["lr"])
        for i, p in zip(live, moved):
            group["params"][i] = p


@contextlib.contextmanager
def patched(owner: type, name: str, value: Callable):
    """owner.name replaced by value; higher's patched module copies and its optimizers look methods up on the class."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _all_of(*variants: str):
    stack = contextlib.ExitStack()
    for v in variants:
        stack.enter_context(VARIANTS[v]())
    return stack


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "today": contextlib.nullcontext,
    "fused-norm": lambda: patched(model.ConvBlock, "forward", fused_norm),
    "no-conv-bias": lambda: patched(model.ConvBlock, "forward", no_conv_bias),
    "fused-norm + no-conv-bias": lambda: patched(model.ConvBlock, "forward", both),
    "foreach-sgd": lambda: patched(higher.optim.DifferentiableSGD, "_update", foreach_sgd_update),
    "fused-norm + no-conv-bias + foreach-sgd": lambda: _all_of("fused-norm + no-conv-bias", "foreach-sgd"),
}


def gradients(net: model.ANML, task, variant: str = "today") -> dict[str, torch.Tensor]:
    net = copy.deepcopy(net)
    with VARIANTS[variant]():
        anml.meta_gradient(net, *task)
    return {name: p.grad for name, p in net.named_parameters() if p.grad is not None}


def worst_difference(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest relative difference of a gradient, leaving out the conv biases: their true gradient is zero (the
    norm cancels them), so what either path computes for them is rounding noise."""
    return max((((grads[name] - g).norm() / g.norm()).item(), name) for name, g in reference.items()
               if not name.endswith("conv.bias"))


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(step, task) -> int:
    with CountOps() as counter:
        step(*task)
    return counter.count


def kernels_per_step(step, task) -> tuple[int, float]:
    """The device events (kernels and copies) of one call, and their summed milliseconds."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        step(*task)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(events), sum(e.time_range.elapsed_us() for e in events) / 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=5, help="timed iterations per path (plus warm-up)")
    p.add_argument("-d", "--device", choices=["cpu", "cuda"])
    args = p.parse_args()
    if args.iterations < 1:
        p.error("--iterations must be at least 1")
    device = runtime.set_up(args.device)
    cuda = device.type == "cuda"
    data = load_split(find_root(), "images_background").to(device)
    torch.manual_seed(0)
    tasks = [(*data.batch(t), *data.batch(r)) for t, r in
             (sample_meta_train(data) for _ in range(args.iterations + cuda_graph.WARMUP + 2))]
    net = model.ANML().to(device)
    reference = gradients(net, tasks[0])
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device {device} ({name}), {torch.get_num_threads()} threads, median of the iterations after warm-up")
    print(f"{'variant':<42}{'worst gradient':>16}{'eager s':>10}" + (f"{'graph s':>10}{'kernels':>9}{'kernel ms':>11}"
                                                                      if cuda else f"{'aten ops':>10}"))
    base = {}
    for label, variant in VARIANTS.items():
        worst, _ = worst_difference(gradients(net, tasks[0], label), reference)
        with variant():
            eager_net = copy.deepcopy(net)
            eager = functools.partial(anml.meta_step, eager_net, torch.optim.Adam(eager_net.parameters(), lr=0.001))
            t_eager = seconds_per_step(eager, tasks, device)
            row = f"{label:<42}{worst:>16.1e}{t_eager:>10.4f}"
            if cuda:
                graph_net = copy.deepcopy(net)
                opt = torch.optim.Adam(graph_net.parameters(), lr=0.001)
                cuda_graph.make_capturable(opt)
                graphed = cuda_graph.CudaGraphed(functools.partial(anml.meta_step, graph_net, opt))
                t_graph = seconds_per_step(graphed, tasks, device, warmup=cuda_graph.WARMUP + 1)
                kernels, kernel_ms = kernels_per_step(graphed, tasks[0])
                base.setdefault("graph", t_graph)
                row += f"{t_graph:>10.4f}{kernels:>9}{kernel_ms:>11.1f}   {base['graph'] / t_graph:.2f}x today's graph"
            else:
                ops = ops_per_step(eager, tasks[0])
                base.setdefault("eager", t_eager)
                row += f"{ops:>10}   {base['eager'] / t_eager:.2f}x today's step"
        print(row, flush=True)
    if cuda:
        outside_net = copy.deepcopy(net)
        outside_opt = torch.optim.Adam(outside_net.parameters(), lr=0.001)
        cuda_graph.make_capturable(outside_opt)  # as anml.graphed_step has it
        outside = cuda_graph.graphed_gradient(functools.partial(anml.meta_gradient, outside_net), outside_opt)
        t_graph = seconds_per_step(outside, tasks, device, warmup=cuda_graph.WARMUP + 1)
        kernels, kernel_ms = kernels_per_step(outside, tasks[0])
        print(f"{'adam-outside':<42}{'':>16}{'':>10}{t_graph:>10.4f}{kernels:>9}{kernel_ms:>11.1f}   "
              f"{base['graph'] / t_graph:.2f}x today's graph")


if __name__ == "__main__":
    main()
