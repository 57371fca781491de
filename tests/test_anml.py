import copy
import dataclasses
import functools
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import anml
import checkpoints
from anml import RunConfig, RunState
from datasets import sample_meta_train
from model import ANML, SANML, build_model


def test_lobotomy_touches_exactly_one_row():
    model = ANML()
    before = copy.deepcopy(model.state_dict())
    anml.lobotomize(model, 7)
    after = model.state_dict()
    for key in before:
        if key != "fc.weight":
            assert torch.equal(before[key], after[key]), key
    changed = (before["fc.weight"] != after["fc.weight"]).any(1)
    assert changed.nonzero().flatten().tolist() == [7]
    assert not model.fc.weight.grad_fn and model.fc.weight.requires_grad


def test_lobotomy_draws_kaiming_normal():
    model = ANML()
    rows = []
    for cls in range(200):
        anml.lobotomize(model, cls)
        rows.append(model.fc.weight[cls].detach())
    std = torch.stack(rows).std().item()
    assert abs(std - (2 / 2304) ** 0.5) < 0.02 * (2 / 2304) ** 0.5


@pytest.mark.parametrize("treatment, sizes", [("anml", (32, 16, 288)), ("sanml", (32,)), ("oml", (32,))])
def test_meta_step_matches_plain_reference(treatment, sizes, background):
    """The fast step and the obvious higher loop over the whole network give the same outer update.

    In float64, so that the comparison sees the algorithm rather than float32 rounding over 20 unrolled
    steps, and narrower than the default ANML, because float64 convolutions are slow on a CPU.
    """
    torch.manual_seed(0)
    traj, remember = sample_meta_train(background)
    batch = [t.double() if t.is_floating_point() else t for t in (*background.batch(traj), *background.batch(remember))]
    fast = build_model(treatment, sizes).double()
    plain = copy.deepcopy(fast)
    start = copy.deepcopy(fast.state_dict())
    fast_out = anml.meta_step(fast, torch.optim.SGD(fast.parameters(), lr=1.0), *batch)
    plain_out = anml.plain_meta_step(plain, torch.optim.SGD(plain.parameters(), lr=1.0), *batch)
    assert [t.item() for t in fast_out] == pytest.approx([t.item() for t in plain_out], rel=1e-6)
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        assert not torch.equal(a, start[name]) or name.endswith("conv.bias"), f"{name} was not updated"
        if name.endswith("conv.bias"):  # feeds an instance norm: its true gradient is zero
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=0, msg=name)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_stop_signal_finishes_the_iteration_and_saves(stop_signal, background, tmp_path, monkeypatch):
    real_step = anml.meta_step
    calls = []

    def step_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), stop_signal)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(anml, "meta_step", step_then_interrupt)
    state = RunState.fresh(RunConfig(rln=16, nm=8, epochs=10, save_every=100, log_every=100), torch.device("cpu"))
    handler = signal.getsignal(stop_signal)  # SIGINT: SIG_IGN, not Python's default, in a background job
    with pytest.raises(KeyboardInterrupt, match="stopped after iteration 1"):
        anml.train(state, background, tmp_path)
    assert len(calls) == 2
    saved = tmp_path / checkpoints.checkpoint_name("anml", (16, 8, 144), 1)
    assert saved.is_file() and checkpoints.state_path(saved).is_file()
    assert signal.getsignal(stop_signal) is handler  # train's own handler is gone again


def test_runs_trained_together_are_each_the_run_alone(background, tmp_path):
    """Each draws from its own random state: trained together, two runs give what each gives alone, logs included,
    and resumed together from their checkpoints halfway they go on as before."""
    cpu, seeds = torch.device("cpu"), (1, 2)
    config = RunConfig(rln=16, nm=8, epochs=4, save_every=2, log_every=1)
    alone = [RunState.fresh(dataclasses.replace(config, seed=seed), cpu) for seed in seeds]  # both made, then run
    for seed, state in zip(seeds, alone):
        anml.train(state, background, tmp_path / f"alone{seed}")
    together = [RunState.fresh(dataclasses.replace(config, seed=seed), cpu) for seed in seeds]
    dirs = [tmp_path / f"together{seed}" for seed in seeds]
    assert anml.train_together(together, background, dirs) == [d / "16_8_144_ANML-3.pth" for d in dirs]
    resumed = [RunState.resume(d / "16_8_144_ANML-1.pth", cpu) for d in dirs]
    anml.train_together(resumed, background, [tmp_path / f"resumed{seed}" for seed in seeds])
    for seed, one, two, three in zip(seeds, alone, together, resumed):
        for key, weight in one.model.state_dict().items():
            assert torch.equal(two.model.state_dict()[key], weight) and torch.equal(three.model.state_dict()[key],
                                                                                    weight), (seed, key)
        log = (tmp_path / f"alone{seed}" / "training_log.csv").read_text()
        assert (tmp_path / f"together{seed}" / "training_log.csv").read_text() == log
    assert not torch.equal(alone[0].model.fc.weight, alone[1].model.fc.weight)


def test_one_run_diverging_stops_the_others_saved(background, tmp_path):
    cpu, config = torch.device("cpu"), RunConfig(rln=4, nm=4, epochs=50, save_every=100, log_every=2)
    states = [RunState.fresh(config, cpu), RunState.fresh(dataclasses.replace(config, inner_lr=1e30), cpu)]
    with pytest.raises(anml.Diverged, match="diverged: its outer loss was nan at iteration 0; no checkpoint was saved"):
        anml.train_together(states, background, [tmp_path / "fine", tmp_path / "diverging"])
    assert (tmp_path / "fine" / "4_4_36_ANML-1.pth").is_file()  # stopped after its second iteration, saved
    assert not list((tmp_path / "diverging").glob("*.pth"))


def test_meta_iteration_draws_a_task_and_lobotomizes_its_class(background):
    model = ANML(16, 8, 144)
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(3)
    traj, _ = sample_meta_train(background)
    torch.manual_seed(3)
    step = anml.eager_step(model, torch.optim.SGD(model.parameters(), lr=0.0), 0.1)
    loss, acc = anml.meta_iteration(model, background, step)
    changed = (before["fc.weight"] != model.fc.weight).any(1)
    assert changed.nonzero().flatten().tolist() == [int(background.labels[traj[0]])]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k != "fc.weight")
    assert loss.shape == acc.shape == () and loss > 0 and 0 <= acc <= 1


def test_gradient_graph_then_eager_adam_is_meta_step(background, monkeypatch):
    """cuda_graph.graphed_gradient's eager half, with the graph's replay as the plain call it records (the replay
    itself is tests/test_cuda_graph.py's): Adam on the gradients that each call adds into the zeroed buffers."""
    monkeypatch.setattr(anml.cuda_graph, "CudaGraphed", lambda step: step)
    torch.manual_seed(5)
    tasks = [(*background.batch(t), *background.batch(r)) for t, r in (sample_meta_train(background) for _ in range(3))]
    eager, split = ANML(16, 8, 144), ANML(16, 8, 144)
    split.load_state_dict(eager.state_dict())
    eager_step = anml.eager_step(eager, torch.optim.Adam(eager.parameters(), lr=0.01), 0.1)
    split_step = anml.cuda_graph.graphed_gradient(functools.partial(anml.meta_gradient, split, inner_lr=0.1),
                                                  torch.optim.Adam(split.parameters(), lr=0.01))
    for task in tasks:
        assert torch.equal(torch.stack(eager_step(*task)), torch.stack(split_step(*task)))
    for a, b in zip(eager.state_dict().values(), split.state_dict().values()):
        assert torch.equal(a, b)


def test_pretrain_is_plain_supervised_training_on_iid_batches(background):
    config = RunConfig(treatment="pretrain", rln=8, nm=4, batch_size=16)
    assert RunConfig(treatment="pretrain").epochs == 12188  # 30,000 iterations' 104 drawings each, in batches of 256
    state = RunState.fresh(config, torch.device("cpu"))
    plain = copy.deepcopy(state.model)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=config.outer_lr)
    step = functools.partial(anml.supervised_step, state.model, state.optimizer)
    torch.manual_seed(4)
    anml.supervised_iteration(state.model, background, step, config.batch_size)
    torch.manual_seed(4)
    batch = torch.randperm(len(background.labels))[:16]
    assert len(set(background.labels[batch].tolist())) > 8  # drawn across the classes, not class by class
    x, y = background.batch(batch)
    torch.nn.functional.cross_entropy(plain(x), y).backward()
    plain_opt.step()
    for a, b in zip(state.model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_outer_lr_schedules():
    constant = RunConfig(epochs=100, outer_lr=0.002)
    assert {anml.get_lr(it, constant) for it in range(100)} == {0.002}
    cosine = RunConfig(epochs=100, outer_lr=0.002, outer_lr_schedule="cosine")
    rates = [anml.get_lr(it, cosine) for it in range(100)]
    assert rates[0] == 0.002 and rates[50] == pytest.approx(0.001) and 0 < rates[-1] < 1e-5
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_cosine_run_resumes_exactly(background, tmp_path):
    config = RunConfig(rln=4, nm=4, epochs=4, save_every=2, log_every=1, outer_lr_schedule="cosine")
    whole = RunState.fresh(config, torch.device("cpu"))
    anml.train(whole, background, tmp_path / "whole")
    assert whole.optimizer.param_groups[0]["lr"] == anml.get_lr(3, config)
    resumed = RunState.resume(tmp_path / "whole" / "4_4_36_ANML-1.pth", torch.device("cpu"))
    anml.train(resumed, background, tmp_path / "resumed")
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_kaiming_conv_init_redraws_conv_weights_only():
    default = RunState.fresh(RunConfig(rln=32, nm=16, seed=2), torch.device("cpu")).model.state_dict()
    kaiming = RunState.fresh(RunConfig(rln=32, nm=16, seed=2, conv_init="kaiming"), torch.device("cpu")).model
    for name, value in kaiming.state_dict().items():
        is_conv_weight = name.endswith("conv.weight")
        assert torch.equal(value, default[name]) != is_conv_weight, name
    for stack in (kaiming.rln, kaiming.nm):
        weight = stack.convBlock2.conv.weight
        assert weight.std().item() == pytest.approx((2 / weight[0].numel()) ** 0.5, rel=0.05)


FIXTURE = Path(__file__).parent / "fixtures" / "run_4_4_36"


def test_resumes_a_run_saved_before_the_run_config(background, tmp_path):
    """A state file written by the code before RunConfig (settings without the recipe options) resumes and
    continues that run: its iterations 2-3 as the old code computed them, up to float rounding across machines."""
    for f in ("4_4_36_ANML-1.pth", "4_4_36_ANML-1.state.pth", "training_log.csv"):
        shutil.copy(FIXTURE / f, tmp_path)
    state = RunState.resume(tmp_path / "4_4_36_ANML-1.pth", torch.device("cpu"))
    assert (state.iteration, state.config) == (2, RunConfig(rln=4, nm=4, epochs=4, seed=5, save_every=2, log_every=1))
    anml.train(state, background, tmp_path)
    expected = torch.load(FIXTURE / "4_4_36_ANML-3.pth", weights_only=True)
    for name, value in torch.load(tmp_path / "4_4_36_ANML-3.pth", weights_only=True).items():
        # A conv bias feeds an instance norm: its gradient is rounding noise, which Adam turns into steps of lr.
        atol = 4 * state.config.outer_lr if name.endswith("conv.bias") else 1e-5
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=atol, msg=name)
    logs = [np.loadtxt(f, delimiter=",", skiprows=1)
            for f in (FIXTURE / "training_log.csv", tmp_path / "training_log.csv")]
    np.testing.assert_allclose(*logs, atol=2e-5)
