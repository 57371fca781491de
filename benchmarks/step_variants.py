"""Candidate changes to the meta-step, each against today's `anml.meta_step` from the same weights and task: the
largest relative difference of a gradient, seconds per step (eager; on CUDA also one graph replay) and how much the
step launches (aten operators on a CPU; kernels and their summed time on CUDA, over one replay).

    OMNIGLOT_ROOT=../shared/omniglot python benchmarks/step_variants.py [-d cuda] [--iterations 10]

The candidates are the issue's ways to fewer, fatter kernels on a GPU, where a replay is bound by its thousands of
tiny kernels; one that wins there, by a margin beyond the noise of this script, moves into model.py or anml.py (as
model.instance_norm did, whose double backward is written out). Rows come likeliest winner first, so that a run cut
short by a lent GPU's time has measured those, and a row of several candidates joined by " + " has them all:
    compiled-norm  model.norm_double_backward, the dozens of small kernels of the norm's double backward, compiled
                   with torch.compile into a few
    flat-sgd       higher's inner SGD update on one flat tensor of RLN + fc (the parameters its pieces), in a multiply
                   and an add per step, not two a parameter; in the outer backward one concatenation gathers the
                   pieces' gradients, where each parameter took an add and a multiply of its own
    lean-relu-pool ReLU and max-pool with backwards of their own, whose double backward leaves out the zero gradient
                   that autograd's gives (and fills and adds) their saved tensors in every inner step
    one-add-sgd    higher's inner SGD update as one add (p.add(g, alpha=-lr)) per parameter, not a multiply and an add
    batched-norm   model.norm_double_backward with its full-size work in two batched matrix products (no compiler)
    channels-last  the conv weights, and so every activation after them, in channels-last memory format
    unfold-conv    each conv as a matrix product of its weights with the 3x3 patches of its input
    no-conv-bias   the convs without their bias, which the instance norm after each one cancels exactly
    foreach-sgd    higher's inner SGD update as one foreach add per step, not a multiply and an add per parameter
    group-norm     what model.instance_norm replaced: nn.GroupNorm, whose double backward autograd composes from
                   several dozen kernels
    adam-outside   (CUDA, right after today's row) the graph holds the meta-gradient only, Adam steps eagerly after
                   it: what train_omni.py does under torchrun, where the all-reduce of the gradients comes between the
                   two
On CUDA today's row is followed by its replay's costliest kernels by name. The last line names the fastest of the
rows whose gradients are today's within float32 rounding (GRADIENT_TOLERANCE): "fastest graph: LABEL" on CUDA, which
tools/gpu.sh's `best` step then times end to end with benchmarks/train_variant.py. A row that fails (a candidate that
does not compile or capture) prints why and the table goes on; SIGTERM or Ctrl-C stops the table early, and the last
line then names the fastest of the rows measured.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import functools
import signal
import sys
from collections.abc import Callable, Iterator
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


def _finish(block: model.ConvBlock, x: torch.Tensor) -> torch.Tensor:
    return F.relu(model.max_pool(x) if block.pool else x)


def group_norm(block: model.ConvBlock, x: torch.Tensor) -> torch.Tensor:
    return _finish(block, block.norm(block.conv(x)))


def no_conv_bias(block: model.ConvBlock, x: torch.Tensor) -> torch.Tensor:
    return _finish(block, model.instance_norm(F.conv2d(x, block.conv.weight), block.norm.weight, block.norm.bias,
                                              block.norm.eps))


def unfold_conv(block: model.ConvBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's conv as one matrix product of its weights with the image's 3x3 patches (F.unfold), where cuDNN
    computes a batch-1 conv with few thread blocks; autograd then differentiates products and (un)folds."""
    n, _, h, w = x.shape
    conv = block.conv
    out = conv.weight.flatten(1) @ F.unfold(x, conv.kernel_size)  # (n, out channels, positions)
    out = out.view(n, -1, h - 2, w - 2) + conv.bias.view(-1, 1, 1)
    return _finish(block, model.instance_norm(out, block.norm.weight, block.norm.bias, block.norm.eps))


def foreach_sgd_update(self, grouped_grads, **kwargs) -> None:
    """higher's DifferentiableSGD update, p - lr g for every parameter, as one foreach add per group (no momentum and
    no weight decay, as the inner loop has none)."""
    for group, grads in zip(self.param_groups, grouped_grads):
        live = [i for i, g in enumerate(grads) if g is not None]
        moved = torch._foreach_add([group["params"][i] for i in live], [grads[i] for i in live], alpha=-group["lr"])
        for i, p in zip(live, moved):
            group["params"][i] = p


def one_add_sgd_update(self, grouped_grads, **kwargs) -> None:
    """higher's DifferentiableSGD update, p - lr g, as one add per parameter, where higher multiplies, then adds."""
    for group, grads in zip(self.param_groups, grouped_grads):
        for i, g in enumerate(grads):
            if g is not None:
                group["params"][i] = group["params"][i].add(g, alpha=-group["lr"])


def flat_sgd_update(self, grouped_grads, **kwargs) -> None:
    """higher's DifferentiableSGD update, p + (-lr g) in higher's arithmetic, on one flat tensor of the parameters
    that have a gradient, which are then its pieces: a multiply and an add per inner step, where higher takes two a
    parameter, and in the outer backward one concatenation of the pieces' gradients where each parameter took an add
    and a multiply of its own."""
    flats = self.__dict__.setdefault("flats", {})  # group -> (flat tensor, its pieces as the group's parameters)
    for i, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
        live = [j for j, g in enumerate(grads) if g is not None]
        params = [group["params"][j] for j in live]
        flat, pieces = flats.get(i, (None, []))
        if len(pieces) != len(params) or any(p is not q for p, q in zip(params, pieces)):  # the first step
            flat = torch.cat([p.reshape(-1) for p in params])
        flat = flat + -group["lr"] * torch.cat([grads[j].reshape(-1) for j in live])
        pieces = [x.view_as(p) for x, p in zip(flat.split([p.numel() for p in params]), params)]
        flats[i] = flat, pieces
        for j, piece in zip(live, pieces):
            group["params"][j] = piece


class _ReLU(torch.autograd.Function):
    """F.relu with its backward a function of its own: autograd's double backward of ReLU's backward also gives a
    gradient to the ReLU's output that is always zero, which it fills and adds in every inner step."""

    @staticmethod
    def forward(ctx, x):
        out = torch.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        return _ReLUBackward.apply(g, *ctx.saved_tensors)


class _ReLUBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, out):
        ctx.save_for_backward(out)
        return model.aten.threshold_backward(g, out, 0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, a):
        return model.aten.threshold_backward(a, *ctx.saved_tensors, 0), None


class _MaxPool(torch.autograd.Function):
    """model.max_pool under autograd, with its backward a function of its own: autograd's double backward of
    max-pooling's backward also gives its input a gradient that is always zero, filled and added in every inner
    step."""

    @staticmethod
    def forward(ctx, x):
        out, indices = model.aten.max_pool2d_with_indices(x, [2, 2], [2, 2])
        ctx.save_for_backward(x, indices)
        return out

    @staticmethod
    def backward(ctx, g):
        return _MaxPoolBackward.apply(g, *ctx.saved_tensors)


class _MaxPoolBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, x, indices):
        ctx.save_for_backward(indices)
        return model.aten.max_pool2d_with_indices_backward(g, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, a):
        (indices,) = ctx.saved_tensors
        return a.flatten(2).gather(2, indices.flatten(2)).view_as(indices), None, None


@contextlib.contextmanager
def lean_relu_pool():
    """ReLU and max-pool as _ReLU and _MaxPool wherever the blocks call them (F.relu, model.max_pool)."""
    with patched(F, "relu", _ReLU.apply), patched(model, "max_pool", _MaxPool.apply):
        yield


def channels_last(meta_gradient: Callable) -> Callable:
    """meta_gradient with the model's conv weights first made channels-last, in place (once: after that it is a
    no-op, so a graph captures none of it). The convolutions then write channels-last activations, which the norm,
    pool and ReLU keep, and the fast weights and Adam's moments follow their parameters; the drawings, of one
    channel, are in either format already."""
    def wrapped(net: model.ANML, *args, **kwargs):
        for p in net.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        return meta_gradient(net, *args, **kwargs)
    return wrapped


def batched_norm_double_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
                                 rstd: torch.Tensor, a: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """model.norm_double_backward in fewer, fatter kernels, without a compiler.

    Both full-size results are combinations of g, a, x̂ and 1 with coefficients per image and channel: d_g =
    w r a + (alpha - w r q/m) x̂ + (beta - w r mean(a)), d_x = k1 (g - mean(g)) + k2 (a - mean(a)) + k3 x̂. So the
    four go into one stacked tensor, one batched product of it takes the five sums the coefficients need (of g, of a,
    of g x̂, of a x̂, of a g), a second one forms both combinations, and the rest is arithmetic on (images, channels).
    """
    n, c, h, wd = x.shape
    m = h * wd
    r = rstd.view(n, c)
    xh = (x - mean.view(n, c, 1, 1)) * rstd.view(n, c, 1, 1)
    basis = torch.stack([g, a, xh, g.new_ones(()).expand_as(g)], 2).view(n * c, 4, m)
    sums = (basis[:, :2] @ basis.transpose(1, 2)).view(n, c, 2, 4)  # (g, a) . (g, a, x̂, 1)
    sum_ag, sum_gxh, sum_g = sums[..., 1, 0], sums[..., 0, 2], sums[..., 0, 3]
    q, sum_a = sums[..., 1, 2], sums[..., 1, 3]
    w, alpha, beta = w.view(1, c), alpha.view(1, c), beta.view(1, c)
    wr, p, g_mean, a_mean = w * r, sum_gxh / m, sum_g / m, sum_a / m
    s = torch.addcmul(sum_ag, sum_a, g_mean, value=-1)  # sum(a (g - mean(g)))
    pq = p * q
    x_coef = torch.addcmul(alpha, wr, q, value=-1 / m)
    k1, wrr = r * x_coef, wr * r
    k2 = -(wrr * p)
    k3 = -(wrr * torch.add(s, pq, alpha=-3) / m + alpha * r * p)
    k0 = -(k1 * g_mean + k2 * a_mean)
    coefficients = torch.stack([torch.zeros_like(wr), wr, x_coef, torch.addcmul(beta, wr, a_mean, value=-1),
                                k1, k2, k3, k0], -1).view(n * c, 2, 4)
    d_g, d_x = (coefficients @ basis).view(n, c, 2, h, wd).unbind(2)
    return d_g, d_x, (r * (s - pq)).sum(0)


# Its 30-odd element-wise operations and reductions, run once per inner step and block in the outer backward, fused
# by Inductor into a few kernels. The graph captures them like any kernel; the eager warm-ups compile them first.
compiled_norm_double_backward = torch.compile(model.norm_double_backward, fullgraph=True, dynamic=False)


@contextlib.contextmanager
def patched(owner: object, name: str, value: Callable):
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
    "compiled-norm + no-conv-bias + flat-sgd + lean-relu-pool":
        lambda: _all_of("compiled-norm", "no-conv-bias", "flat-sgd", "lean-relu-pool"),
    "compiled-norm": lambda: patched(model, "norm_double_backward", compiled_norm_double_backward),
    "flat-sgd": lambda: patched(higher.optim.DifferentiableSGD, "_update", flat_sgd_update),
    "lean-relu-pool": lean_relu_pool,
    "compiled-norm + no-conv-bias + one-add-sgd": lambda: _all_of("compiled-norm", "no-conv-bias", "one-add-sgd"),
    "one-add-sgd": lambda: patched(higher.optim.DifferentiableSGD, "_update", one_add_sgd_update),
    "batched-norm": lambda: patched(model, "norm_double_backward", batched_norm_double_backward),
    "batched-norm + no-conv-bias + flat-sgd + lean-relu-pool":
        lambda: _all_of("batched-norm", "no-conv-bias", "flat-sgd", "lean-relu-pool"),
    # meta_step looks meta_gradient up in anml at each call, so patching it there reaches both.
    "channels-last": lambda: patched(anml, "meta_gradient", channels_last(anml.meta_gradient)),
    "unfold-conv": lambda: patched(model.ConvBlock, "forward", unfold_conv),
    "no-conv-bias": lambda: patched(model.ConvBlock, "forward", no_conv_bias),
    "foreach-sgd": lambda: patched(higher.optim.DifferentiableSGD, "_update", foreach_sgd_update),
    "group-norm": lambda: patched(model.ConvBlock, "forward", group_norm),
}
LABEL_WIDTH = max(map(len, VARIANTS)) + 2


# The largest relative gradient difference from today's that float32 rounding explains, amplified by the 20 inner
# steps: the candidates differed from today's by 5e-6 to 1.3e-5 on the H200, and on the 2-core CPU today's float32
# step differed from a float64 one by up to 4.6e-4. A wrong gradient is far off (PyTorch 2.11's mixed-layout norm
# gave 3.2); tests/test_step_variants.py checks each candidate's exactly, in float64.
GRADIENT_TOLERANCE = 1e-2


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


def device_events(step, task) -> list:
    """The device events (kernels and copies) of one call."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(*task)
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def kernels_per_step(step, task) -> tuple[int, float]:
    """The device events of one call, and their summed milliseconds."""
    events = device_events(step, task)
    return len(events), sum(e.time_range.elapsed_us() for e in events) / 1000


def kernel_table(net: model.ANML, tasks: list, rows: int = 15) -> str:
    """The kernels of one replay of today's step that take the most time in all, by name: where its time goes."""
    today = graphed_meta_step(net)
    for task in tasks[:cuda_graph.WARMUP + 1]:  # eager, then captured
        today(*task)
    count, us = collections.Counter(), collections.Counter()
    for e in device_events(today, tasks[0]):
        count[e.name] += 1
        us[e.name] += e.time_range.elapsed_us()
    total = sum(us.values())
    lines = [f"today's replay, its {rows} costliest kernels by name: ms, share of the kernel time, launches"]
    for name, t in us.most_common(rows):
        lines.append(f"{t / 1000:>8.2f}{t / total:>7.0%}{count[name]:>7}  {name[:100]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=5, help="timed iterations per path (plus warm-up)")
    p.add_argument("-d", "--device", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
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
    columns = f"{'graph s':>10}{'kernels':>9}{'kernel ms':>11}" if cuda else f"{'aten ops':>10}"
    print(f"{'variant':<{LABEL_WIDTH}}{'worst gradient':>16}{'eager s':>10}{columns}")
    times = {}
    # The time limit tools/gpu.sh gives this script ends it with SIGTERM: that, like Ctrl-C, stops the table where it
    # is, and the last line still names the fastest of the rows measured, for gpu.sh's `best` step.
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for label, row in table(net, tasks, reference, times, cuda):
            try:
                print(row(), flush=True)
            except Exception as err:  # a row that fails (to compile, to capture) must not cost the others
                reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
                print(f"{label:<{LABEL_WIDTH}}failed: {reason}", flush=True)
    except KeyboardInterrupt:
        print("stopped (SIGTERM or Ctrl-C): the rows above are all that were measured", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if times:
        print(f"fastest {'graph' if cuda else 'step'}: {min(times, key=times.get)}")


def table(net: model.ANML, tasks: list, reference: dict, times: dict, cuda: bool) -> Iterator[tuple[str, Callable]]:
    """The table's rows in order, each a label and what prints it: a row per variant, and on CUDA after today's the
    `adam-outside` row and today's costliest kernels."""
    for label, variant in VARIANTS.items():
        yield label, functools.partial(variant_row, label, variant, net, tasks, reference, times)
        if label == "today" and cuda:
            yield "adam-outside", functools.partial(adam_outside_row, net, tasks, times)
            yield "today's kernels", functools.partial(kernel_table, net, tasks)


def graphed_meta_step(net: model.ANML) -> cuda_graph.CudaGraphed:
    """meta_step of a copy of `net` and its own Adam, as a CUDA graph."""
    net = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=0.001)
    cuda_graph.make_capturable(opt)
    return cuda_graph.CudaGraphed(functools.partial(anml.meta_step, net, opt))


def variant_row(label: str, variant: Callable, net: model.ANML, tasks: list, reference: dict, times: dict) -> str:
    """The variant's row: its worst gradient difference, eager seconds, and graph seconds and kernels (CUDA) or aten
    operators (CPU), its time a ratio of today's, the first row's. `times` gains the row's seconds (the graph's on
    CUDA) where its gradients are today's within GRADIENT_TOLERANCE."""
    device = tasks[0][0].device
    worst, _ = worst_difference(gradients(net, tasks[0], label), reference)
    with variant():
        eager_net = copy.deepcopy(net)
        eager = functools.partial(anml.meta_step, eager_net, torch.optim.Adam(eager_net.parameters(), lr=0.001))
        t_eager = seconds_per_step(eager, tasks, device)
        if device.type == "cuda":
            graphed = graphed_meta_step(net)
            t, path = seconds_per_step(graphed, tasks, device, warmup=cuda_graph.WARMUP + 1), "graph"
            kernels, kernel_ms = kernels_per_step(graphed, tasks[0])
            counts = f"{t:>10.4f}{kernels:>9}{kernel_ms:>11.1f}"
        else:
            t, path = t_eager, "step"
            # Compiled code cannot run under the mode that counts operators, and runs none of them one by one.
            counts = f"{'' if 'compiled' in label else ops_per_step(eager, tasks[0]):>10}"
    if worst < GRADIENT_TOLERANCE:
        times[label] = t
    return f"{label:<{LABEL_WIDTH}}{worst:>16.1e}{t_eager:>10.4f}{counts}   {times['today'] / t:.2f}x today's {path}"


def adam_outside_row(net: model.ANML, tasks: list, times: dict) -> str:
    """The graph of the meta-gradient alone, Adam stepping eagerly after it, as under torchrun."""
    outside_net = copy.deepcopy(net)
    outside_opt = torch.optim.Adam(outside_net.parameters(), lr=0.001)
    cuda_graph.make_capturable(outside_opt)  # as anml.graphed_step has it
    outside = cuda_graph.graphed_gradient(functools.partial(anml.meta_gradient, outside_net), outside_opt)
    t_graph = seconds_per_step(outside, tasks, tasks[0][0].device, warmup=cuda_graph.WARMUP + 1)
    kernels, kernel_ms = kernels_per_step(outside, tasks[0])
    return (f"{'adam-outside':<{LABEL_WIDTH}}{'':>16}{'':>10}{t_graph:>10.4f}{kernels:>9}{kernel_ms:>11.1f}   "
            f"{times['today'] / t_graph:.2f}x today's graph")


if __name__ == "__main__":
    main()
