"""Meta-batches across 2 CPU workers with gloo, started with torch.multiprocessing as torchrun would."""
import copy
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import anml
from anml import RunConfig, RunState
from checkpoints import state_path
from datasets import load_split, sample_meta_train
from model import ANML
from tests.conftest import REPO

CONFIG = RunConfig(rln=16, nm=8, epochs=3, seed=4, save_every=2, log_every=1)


def join(rank, tmp_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=rank, world_size=2)


def train_worker(rank, tmp_path, root):
    join(rank, tmp_path)
    state = RunState.fresh(CONFIG, torch.device("cpu"))
    anml.train(state, load_split(root, "images_background"), tmp_path / "out")
    torch.save(state.model.state_dict(), tmp_path / f"rank{rank}.pt")
    dist.destroy_process_group()


def step_worker(rank, tmp_path, root):
    """One distributed iteration; saves its task, the shared weights before the step, and after."""
    join(rank, tmp_path)
    data = load_split(root, "images_background")
    state = RunState.fresh(CONFIG, torch.device("cpu"))
    rng = torch.get_rng_state()
    traj, remember = sample_meta_train(data)  # the task that meta_iteration draws next
    torch.set_rng_state(rng)
    before = []  # the shared weights after every worker's lobotomy, as the averaged step meets them
    state.optimizer.register_step_pre_hook(lambda *_: before.append(copy.deepcopy(state.model.state_dict())))
    anml.meta_iteration(state.model, data, anml.eager_step(state.model, state.optimizer, CONFIG.inner_lr))
    torch.save({"traj": traj, "remember": remember, "before": before[0], "after": state.model.state_dict()},
               tmp_path / f"step{rank}.pt")
    dist.destroy_process_group()


def test_workers_hold_identical_weights(tmp_path, omniglot_root, background):
    mp.spawn(train_worker, args=(tmp_path, omniglot_root), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(tmp_path / "out" / "16_8_144_ANML-2.pth", weights_only=True)
    assert all(torch.equal(a[k], saved[k]) for k in a)
    state = torch.load(state_path(tmp_path / "out" / "16_8_144_ANML-2.pth"), weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_single_process_is_the_plain_loop(background, tmp_path):
    """Without torch.distributed, train is meta_iteration after meta_iteration on the global generator."""
    state = RunState.fresh(CONFIG, torch.device("cpu"))
    anml.train(state, background, tmp_path)
    anml.seed_everything(CONFIG.seed)
    plain = ANML(16, 8, 144)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=CONFIG.outer_lr)
    for _ in range(CONFIG.epochs):
        anml.meta_iteration(plain, background, anml.eager_step(plain, plain_opt, CONFIG.inner_lr))
    for a, b in zip(state.model.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def test_torchrun_runs_and_resumes(tmp_path, omniglot_root):
    common = ["--data-root", omniglot_root, "--out-dir", tmp_path, "-d", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = ["--rln", "16", "--nm", "8", "--mask", "144", "--epochs", "2", "--save-every", "1"]
    result = subprocess.run([*torchrun, "train_omni.py", *flags, *map(str, common)], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "meta-batch of 2 tasks" in result.stderr
    state = torch.load(state_path(tmp_path / "16_8_144_ANML-1.pth"), weights_only=True)
    assert len(state["rng"]) == 2
    uninterrupted = torch.load(tmp_path / "16_8_144_ANML-1.pth", weights_only=True)
    single = subprocess.run([sys.executable, "train_omni.py", "--resume", str(tmp_path / "16_8_144_ANML-0.pth"),
                             *map(str, common)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert single.returncode != 0 and "saved by 2 worker(s)" in single.stderr
    resumed = subprocess.run([*torchrun, "train_omni.py", "--resume", str(tmp_path / "16_8_144_ANML-0.pth"),
                              *map(str, common)], cwd=REPO, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert "at iteration 1" in resumed.stderr
    resumed_weights = torch.load(tmp_path / "16_8_144_ANML-1.pth", weights_only=True)
    assert all(torch.equal(resumed_weights[k], v) for k, v in uninterrupted.items())


def meta_gradient(model, data, traj, remember):
    anml.meta_gradient(model, *data.batch(traj), *data.batch(remember), CONFIG.inner_lr)
    return [p.grad for p in model.parameters()]


def test_two_workers_step_on_the_mean_meta_gradient(tmp_path, omniglot_root, background):
    mp.spawn(step_worker, args=(tmp_path, omniglot_root), nprocs=2)
    steps = [torch.load(tmp_path / f"step{r}.pt", weights_only=True) for r in (0, 1)]
    assert int(background.labels[steps[0]["traj"][0]]) != int(background.labels[steps[1]["traj"][0]])
    assert all(torch.equal(steps[0]["before"][k], steps[1]["before"][k]) for k in steps[0]["before"])
    model = ANML(16, 8, 144)
    model.load_state_dict(steps[0]["before"])
    # Adam's first step is lr * sign(gradient) wherever the gradient is rounding noise, so compute the reference
    # with the workers' thread count, whose reductions round the same way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_task = [meta_gradient(copy.deepcopy(model), background, s["traj"], s["remember"]) for s in steps]
    finally:
        torch.set_num_threads(threads)
    opt = torch.optim.Adam(model.parameters(), lr=CONFIG.outer_lr)
    for p, g0, g1 in zip(model.parameters(), *per_task):
        p.grad = (g0 + g1) / 2
    opt.step()
    for r in (0, 1):
        for name, value in model.state_dict().items():
            # A conv bias feeds an instance norm: its true gradient is zero, what is computed is rounding noise,
            # and Adam turns noise into steps of up to lr either way. Bound those by the step size.
            atol = 2 * CONFIG.outer_lr if name.endswith("conv.bias") else 1e-6
            torch.testing.assert_close(steps[r]["after"][name], value, rtol=1e-5, atol=atol, msg=name)
