"""The CUDA-graph path of meta-training against the eager one (skipped without a GPU)."""
import dataclasses
import functools
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import anml
import cuda_graph
import runtime
import workers
from anml import RunConfig, RunState
from datasets import load_split, sample_meta_train
from model import ANML
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    runtime.float32_only()


@pytest.fixture(scope="module")
def on_gpu(background):
    return background.to(CUDA)


class KeepGradients(torch.optim.Optimizer):
    """A step that copies each gradient aside and leaves the weights as they are."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].setdefault("grad", torch.zeros_like(p)).copy_(p.grad)


def test_replay_gives_the_eager_gradients(on_gpu):
    torch.manual_seed(0)
    traj, remember = sample_meta_train(on_gpu)
    task = (*on_gpu.batch(traj), *on_gpu.batch(remember))
    model = ANML().to(CUDA)
    keep = KeepGradients(model.parameters())
    step = cuda_graph.CudaGraphed(anml.eager_step(model, keep, 0.1))
    eager_loss = None
    for call in range(cuda_graph.WARMUP):
        eager_loss, _ = step(*task)
    eager = [keep.state[p]["grad"].clone() for p in model.parameters()]
    replay_loss, _ = step(*task)  # captured, then replayed
    assert step.graph is not None
    torch.testing.assert_close(replay_loss, eager_loss, rtol=1e-5, atol=0)
    for (name, p), grad in zip(model.named_parameters(), eager):
        if name.endswith("conv.bias"):  # feeds an instance norm: its true gradient is zero, what is computed is noise
            continue
        replayed = keep.state[p]["grad"]
        assert ((replayed - grad).norm() / grad.norm()).item() < 1e-4, name


def compare(a: dict, b: dict, lr: float, steps: int) -> None:
    for name, value in a.items():
        # Adam normalises near-zero gradients (the conv biases'): rounding noise there becomes steps of up to lr.
        atol = 2 * lr * steps if name.endswith("conv.bias") else 1e-4
        torch.testing.assert_close(b[name], value, rtol=1e-3, atol=atol, msg=name)


def linear_adam(state: RunState) -> RunState:
    """The run with an Adam whose eps dwarfs every gradient, so that its step is proportional to the gradient.

    Plain Adam turns each near-zero gradient into a step of about lr whose sign is rounding noise, so that two
    exact paths, eager and graphed, part by O(lr) within a few steps: as far as a wrong task or rate would take them.
    """
    for group in state.optimizer.param_groups:
        group["eps"] = 1.0
    return state


# The published outer rate: at 10x it two eager runs on an H200 parted by 40% within 8 iterations (README).
SHORT = RunConfig(rln=32, nm=16, epochs=8, save_every=100, log_every=4)


def assert_moved_alike(start: dict, eager: dict, graphed: dict) -> None:
    """Each weight moved from `start` as far and in the same direction under the graph as eagerly, within 1%."""
    for name, weight in eager.items():
        if name.endswith("conv.bias"):  # its true gradient is zero: what moves it is rounding noise
            continue
        moved = weight - start[name]
        assert ((graphed[name] - start[name] - moved).norm() / moved.norm()).item() < 1e-2, name


def test_graphed_training_follows_the_eager_run(on_gpu, tmp_path):
    start = RunState.fresh(SHORT, CUDA).model.state_dict()
    eager = linear_adam(RunState.fresh(SHORT, CUDA))
    anml.train(eager, on_gpu, tmp_path / "eager")
    graphed = linear_adam(RunState.fresh(SHORT, CUDA))  # seeded afresh: the same weights and tasks
    anml.train(graphed, on_gpu, tmp_path / "graphed", graphed=True)  # 3 iterations eager, then 5 replays
    assert_moved_alike(start, eager.model.state_dict(), graphed.model.state_dict())
    eager_log, graphed_log = ((tmp_path / d / "training_log.csv").read_text().splitlines()
                              for d in ("eager", "graphed"))
    assert len(eager_log) == len(graphed_log) == 3


def torchrun_worker(rank: int, tmp_path, root) -> None:
    """One of two workers on the one GPU (gloo, as NCCL refuses two workers on one device): its own meta-gradient,
    the averaged one of the eager calls and of the replay of graphed_gradient, then a graphed run of SHORT."""
    torch.set_num_threads(1)
    runtime.float32_only()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=rank, world_size=2)
    data = load_split(root, "images_background").to(CUDA)
    torch.manual_seed(0)
    model = ANML().to(CUDA)  # the same weights on both workers
    torch.manual_seed(1 + rank)  # each worker its own task
    traj, remember = sample_meta_train(data)
    task = (*data.batch(traj), *data.batch(remember))
    anml.meta_gradient(model, *task)
    own = [p.grad.clone() for p in model.parameters()]
    keep = KeepGradients(model.parameters())
    keep.register_step_pre_hook(workers.average_gradients)
    step = cuda_graph.graphed_gradient(functools.partial(anml.meta_gradient, model), keep)
    for call in range(cuda_graph.WARMUP):
        step(*task)
    eager = [keep.state[p]["grad"].clone() for p in model.parameters()]
    step(*task)  # captured, then replayed
    replayed = [keep.state[p]["grad"].clone() for p in model.parameters()]
    torch.save({"own": own, "eager": eager, "replayed": replayed}, tmp_path / f"gradients{rank}.pt")

    state = RunState.fresh(SHORT, CUDA)
    anml.train(state, data, tmp_path / "run", graphed=True)
    torch.save(state.model.state_dict(), tmp_path / f"weights{rank}.pt")
    dist.destroy_process_group()


def test_graphed_torchrun_averages_the_replayed_gradients(omniglot_root, tmp_path):
    """Under torchrun the graph holds the meta-gradient, and the all-reduce and Adam follow each replay eagerly.

    Gradients, not runs, are compared: on a GPU two eager runs are not bitwise equal, and over a few iterations
    the meta-training amplifies that noise by orders of magnitude (measured on an H200 in README).
    """
    mp.spawn(torchrun_worker, args=(tmp_path, omniglot_root), nprocs=2)
    worker = [torch.load(tmp_path / f"gradients{r}.pt", weights_only=True) for r in (0, 1)]
    names = [name for name, _ in ANML().named_parameters()]
    for i, name in enumerate(names):
        if name.endswith("conv.bias"):  # feeds an instance norm: its true gradient is zero, what is computed is noise
            continue
        mean = (worker[0]["own"][i] + worker[1]["own"][i]) / 2
        assert not torch.equal(worker[0]["own"][i], worker[1]["own"][i]), name  # two tasks, two gradients
        for kind in ("eager", "replayed"):
            assert torch.equal(worker[0][kind][i], worker[1][kind][i]), name  # every worker the same mean
            assert ((worker[0][kind][i] - mean).norm() / mean.norm()).item() < 1e-4, (kind, name)
    weights = [torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in (0, 1)]
    start = RunState.fresh(SHORT, CUDA).model.state_dict()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in start)  # one averaged step on every worker
    assert not torch.equal(weights[0]["fc.weight"], start["fc.weight"])
    assert len((tmp_path / "run" / "training_log.csv").read_text().splitlines()) == 3


def together_worker(rank: int, tmp_path, root) -> None:
    """Two graphed runs of SHORT trained together, a stream each, and each alone; in a process of its own, as the
    cuBLAS workspaces that streams need gone must be gone before CUDA starts."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":0:0"
    runtime.float32_only()
    data = load_split(root, "images_background").to(CUDA)
    seeds = (1, 2)
    together = [linear_adam(RunState.fresh(dataclasses.replace(SHORT, seed=seed), CUDA)) for seed in seeds]
    anml.train_together(together, data, [tmp_path / f"together{seed}" for seed in seeds], graphed=True)
    for seed, state in zip(seeds, together):
        alone = linear_adam(RunState.fresh(dataclasses.replace(SHORT, seed=seed), CUDA))
        anml.train(alone, data, tmp_path / f"alone{seed}", graphed=True)
        torch.save({"alone": alone.model.state_dict(), "together": state.model.state_dict()}, tmp_path / f"{seed}.pt")


def test_graphed_runs_together_on_streams_follow_each_run_alone(omniglot_root, tmp_path):
    mp.spawn(together_worker, args=(tmp_path, omniglot_root), nprocs=1)
    for seed in (1, 2):
        weights = torch.load(tmp_path / f"{seed}.pt", weights_only=True)
        start = RunState.fresh(dataclasses.replace(SHORT, seed=seed), CUDA).model.state_dict()
        assert_moved_alike(start, weights["alone"], weights["together"])


def test_resumed_graphed_run_continues_as_the_uninterrupted_one(on_gpu, tmp_path):
    config = RunConfig(rln=32, nm=16, epochs=10, save_every=5, log_every=5, outer_lr_schedule="cosine")
    whole = RunState.fresh(config, CUDA)
    anml.train(whole, on_gpu, tmp_path, graphed=True)
    saved = torch.load(tmp_path / "32_16_288_ANML-4.state.pth", weights_only=True)
    assert all(type(g["lr"]) is float and not g["capturable"] for g in saved["optimizer"]["param_groups"])
    resumed = RunState.resume(tmp_path / "32_16_288_ANML-4.pth", CUDA)
    anml.train(resumed, on_gpu, tmp_path / "resumed", graphed=True)
    compare(whole.model.state_dict(), resumed.model.state_dict(), config.outer_lr, 5)


def longer(state: RunState, epochs: int) -> RunState:
    return dataclasses.replace(state, config=dataclasses.replace(state.config, epochs=epochs))


def test_checkpoints_cross_between_the_cpu_and_the_graph(on_gpu, background, tmp_path):
    fixture = REPO / "tests" / "fixtures" / "run_4_4_36"
    for f in ("4_4_36_ANML-1.pth", "4_4_36_ANML-1.state.pth"):
        shutil.copy(fixture / f, tmp_path)
    on_graph = longer(RunState.resume(tmp_path / "4_4_36_ANML-1.pth", CUDA), 7)  # saved by the CPU path
    anml.train(on_graph, on_gpu, tmp_path, graphed=True)  # iterations 2-4 eager, 5-6 replayed
    on_cpu = longer(RunState.resume(tmp_path / "4_4_36_ANML-6.pth", torch.device("cpu")), 8)  # saved under the graph
    anml.train(on_cpu, background, tmp_path)
    assert (tmp_path / "4_4_36_ANML-7.pth").is_file()


def test_a_replayed_iteration_never_waits_for_the_device(on_gpu):
    state = RunState.fresh(RunConfig(rln=32, nm=16), CUDA)
    cuda_graph.make_capturable(state.optimizer)
    step = cuda_graph.CudaGraphed(anml.eager_step(state.model, state.optimizer, 0.1))
    for _ in range(cuda_graph.WARMUP + 1):
        anml.meta_iteration(state.model, on_gpu, step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        anml.set_lr(state.optimizer, 0.001)
        loss, acc = anml.meta_iteration(state.model, on_gpu, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.is_cuda and acc.is_cuda and loss.item() > 0
