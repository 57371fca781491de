"""K independent meta-training runs batched into one network: every conv a grouped conv with K groups (group k holds
run k's channels), every linear layer a batched matmul, the loss the sum of the K runs' losses. The runs' parameters
are disjoint slices, inner SGD and outer Adam act element by element, so one step of the batch is one step of each run
on its own task. Prints run-iterations per second against one run alone (eager; on CUDA also as graphs), and how far
the batch's meta-gradients are from the K runs' own.

    OMNIGLOT_ROOT=../shared/omniglot python benchmarks/batched_runs.py [-d cuda] [--runs 2 4] [--iterations 5]

One run's kernels fill a fraction of a GPU; this is the alternative to replaying several runs' graphs on several
streams (benchmarks/concurrent_runs.py). The runs must share their recipe (one Adam rate for the whole batch).
"""
from __future__ import annotations

import argparse
import copy
import functools
import sys
from pathlib import Path

import higher
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import anml  # noqa: E402
import cuda_graph  # noqa: E402
import runtime  # noqa: E402
from datasets import find_root, load_split, sample_meta_train  # noqa: E402
from meta_step import seconds_per_step  # noqa: E402
from model import ANML, ConvStack  # noqa: E402
from step_variants import gradients, worst_difference  # noqa: E402

PARTS = ("conv.weight", "conv.bias", "norm.weight", "norm.bias")


def _name(block: int, part: str) -> str:
    return f"b{block}_{part.replace('.', '_')}"


class BatchedStack(nn.Module):
    """K conv stacks as one: input (B, K, 28, 28), output (B, K, C * 9), run k's features at [:, k]."""

    def __init__(self, stacks: list[ConvStack]):
        super().__init__()
        self.k = len(stacks)
        for i in (1, 2, 3):
            for part in PARTS:
                joined = torch.cat([s.get_parameter(f"convBlock{i}.{part}").detach() for s in stacks])
                self.register_parameter(_name(i, part), nn.Parameter(joined))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, pool in ((1, True), (2, True), (3, False)):
            w, b, nw, nb = (getattr(self, _name(i, part)) for part in PARTS)
            x = F.group_norm(F.conv2d(x, w, b, groups=self.k), len(nw), nw, nb)
            x = F.relu(F.max_pool2d(x, 2) if pool else x)
        return x.reshape(len(x), self.k, -1)


class BatchedLinear(nn.Module):
    """K linear layers as one: (B, K, in) -> (B, K, out)."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x.transpose(0, 1), self.weight.transpose(1, 2)).transpose(0, 1)


class BatchedANML(nn.Module):
    def __init__(self, nets: list[ANML]):
        super().__init__()
        self.rln = BatchedStack([n.rln for n in nets])
        self.nm = BatchedStack([n.nm for n in nets])
        self.nm_fc = BatchedLinear([n.nm.fc for n in nets])
        self.fc = BatchedLinear([n.fc for n in nets])

    def run_gradients(self, k: int) -> dict[str, torch.Tensor]:
        """Run k's slice of every parameter's gradient, under the names of its ANML's parameters."""
        out = {}
        for net in ("rln", "nm"):
            stack = getattr(self, net)
            chs = len(stack.b1_norm_weight) // stack.k
            for i in (1, 2, 3):
                for part in PARTS:
                    grad = getattr(stack, _name(i, part)).grad
                    out[f"{net}.convBlock{i}.{part}"] = grad[k * chs:(k + 1) * chs]
        for name, layer in (("nm.fc", self.nm_fc), ("fc", self.fc)):
            out[f"{name}.weight"], out[f"{name}.bias"] = layer.weight.grad[k], layer.bias.grad[k]
        return out


class BatchedPlastic(nn.Module):
    def __init__(self, net: BatchedANML):
        super().__init__()
        self.rln, self.fc = net.rln, net.fc

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rln(x) * gate)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum over runs of each run's mean cross-entropy: logits (B, K, classes), labels (B, K)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / len(labels)


class Hold(torch.optim.Optimizer):
    """An outer 'optimizer' that leaves the weights and their gradients alone: batched_meta_step with it
    computes the meta-gradient into .grad and nothing else."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self):
        pass

    def zero_grad(self, set_to_none: bool = True):
        pass


def batched_meta_step(net: BatchedANML, outer_opt: torch.optim.Optimizer, traj_ims, traj_labels, remember_ims,
                      remember_labels, inner_lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """anml.meta_step of K runs at once; images (B, K, 28, 28), labels (B, K): run k's task at [:, k]."""
    ims = torch.cat([traj_ims, remember_ims])
    labels = torch.cat([traj_labels, remember_labels])
    gates = torch.sigmoid(net.nm_fc(net.nm(ims)))
    plastic = BatchedPlastic(net)
    inner_opt = torch.optim.SGD(plastic.parameters(), lr=inner_lr)
    with higher.innerloop_ctx(plastic, inner_opt, copy_initial_weights=False) as (fplastic, diffopt):
        for i in range(len(traj_ims)):
            step = slice(i, i + 1)
            diffopt.step(summed_loss(fplastic(traj_ims[step], gates[step]), traj_labels[step]))
        logits = fplastic(ims, gates)
        loss = summed_loss(logits, labels)
        loss.backward()
    outer_opt.step()
    outer_opt.zero_grad()
    return loss.detach(), (logits.argmax(2) == labels).float().mean()


def batch_tasks(tasks: list[tuple]) -> tuple:
    """K runs' tasks (images (B, 1, 28, 28) and labels (B,), twice) as one: images (B, K, 28, 28), labels (B, K)."""
    return tuple(torch.cat(parts, 1) if parts[0].dim() == 4 else torch.stack(parts, 1) for parts in zip(*tasks))


def batched_gradients(nets: list[ANML], tasks: list[tuple]) -> list[dict[str, torch.Tensor]]:
    """Each run's meta-gradient, computed by one batched step."""
    net = BatchedANML(nets)
    batched_meta_step(net, Hold(net.parameters()), *batch_tasks(tasks))
    return [net.run_gradients(k) for k in range(len(nets))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--device", choices=["cpu", "cuda"])
    p.add_argument("--runs", type=int, nargs="+", default=[2, 4], help="numbers of runs to batch")
    p.add_argument("--iterations", type=int, default=5, help="timed iterations per path (plus warm-up)")
    args = p.parse_args()
    if args.iterations < 1 or min(args.runs) < 1:
        p.error("--iterations and --runs must be positive")
    device = runtime.set_up(args.device)
    cuda = device.type == "cuda"
    data = load_split(find_root(), "images_background").to(device)
    rounds = args.iterations + cuda_graph.WARMUP + 2
    tasks = []  # tasks[k][i]: run k's task of iteration i
    for k in range(max(args.runs)):
        torch.manual_seed(100 + k)
        tasks.append([(*data.batch(t), *data.batch(r)) for t, r in (sample_meta_train(data) for _ in range(rounds))])
    nets = []
    for k in range(max(args.runs)):
        torch.manual_seed(k)
        nets.append(ANML().to(device))

    def timings(make_step, task_list) -> tuple[float, float | None]:
        """Seconds per eager step and, on CUDA, per graph replay (the step made afresh for each)."""
        eager = seconds_per_step(make_step(), task_list, device)
        if not cuda:
            return eager, None
        return eager, seconds_per_step(cuda_graph.CudaGraphed(make_step()), task_list, device,
                                       warmup=cuda_graph.WARMUP + 1)

    def one_run():
        net = copy.deepcopy(nets[0])
        opt = torch.optim.Adam(net.parameters(), lr=0.001)
        if cuda:
            cuda_graph.make_capturable(opt)
        return functools.partial(anml.meta_step, net, opt)

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device {device} ({name}), {torch.get_num_threads()} threads, median of the iterations after warm-up")
    alone = timings(one_run, tasks[0])
    print(f"1 run: {alone[0]:.4f} s eager" + (f", {alone[1]:.4f} s as a graph" if cuda else ""), flush=True)
    for n in args.runs:
        worst = max(worst_difference(got, gradients(nets[k], tasks[k][0]))[0]
                    for k, got in enumerate(batched_gradients(nets[:n], [tasks[k][0] for k in range(n)])))

        def batched_run():
            net = BatchedANML(nets[:n])
            opt = torch.optim.Adam(net.parameters(), lr=0.001)
            if cuda:
                cuda_graph.make_capturable(opt)
            return functools.partial(batched_meta_step, net, opt)

        batched = timings(batched_run, [batch_tasks([tasks[k][i] for k in range(n)]) for i in range(rounds)])
        row = f"{n} runs batched: {batched[0]:.4f} s eager, {n * alone[0] / batched[0]:.2f}x the run-iterations/s"
        if cuda:
            row += f"; {batched[1]:.4f} s as a graph, {n * alone[1] / batched[1]:.2f}x"
        print(f"{row}; largest relative difference of a run's meta-gradient from its own step: {worst:.1e}", flush=True)


if __name__ == "__main__":
    main()
