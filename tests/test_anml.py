import copy
import os
import signal

import pytest
import torch

import anml
from datasets import sample_meta_train
from model import ANML, checkpoint_name
from tests.reference import plain_meta_step


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


def test_meta_step_matches_plain_reference(background):
    """The fast step and the obvious higher loop over the whole ANML give the same outer update.

    In float64, so that the comparison sees the algorithm rather than float32 rounding over 20 unrolled
    steps, and narrower than the default ANML, because float64 convolutions are slow on a CPU.
    """
    torch.manual_seed(0)
    traj, remember = sample_meta_train(background)
    batch = [t.double() if t.is_floating_point() else t for t in (*background.batch(traj), *background.batch(remember))]
    fast = ANML(32, 16, 288).double()
    plain = copy.deepcopy(fast)
    start = copy.deepcopy(fast.state_dict())
    fast_out = anml.meta_step(fast, torch.optim.SGD(fast.parameters(), lr=1.0), *batch)
    plain_out = plain_meta_step(plain, torch.optim.SGD(plain.parameters(), lr=1.0), *batch)
    assert fast_out == pytest.approx(plain_out, rel=1e-6)
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        assert not torch.equal(a, start[name]) or name.endswith("conv.bias"), f"{name} was not updated"
        if name.endswith("conv.bias"):  # feeds an instance norm: its true gradient is zero
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=0, msg=name)


def test_ctrl_c_finishes_the_iteration_and_saves(background, tmp_path, monkeypatch):
    real_step = anml.meta_step
    calls = []

    def step_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(anml, "meta_step", step_then_interrupt)
    settings = {"rln": 16, "nm": 8, "mask": 144, "epochs": 10, "inner_lr": 0.1, "outer_lr": 0.003,
                "seed": 0, "save_every": 100, "log_every": 100}
    model = ANML(16, 8, 144)
    with pytest.raises(KeyboardInterrupt, match="stopped after iteration 1"):
        anml.train(model, torch.optim.Adam(model.parameters()), background, tmp_path, settings)
    assert len(calls) == 2
    saved = tmp_path / checkpoint_name(16, 8, 144, 1)
    assert saved.is_file() and anml.state_path(saved).is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
