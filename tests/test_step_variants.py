"""What benchmarks/step_variants.py and batched_runs.py time on a GPU computes today's meta-gradient."""
import os
import signal
import sys

import pytest
import torch

from anml import RunConfig, RunState
from checkpoints import load_model
from datasets import sample_meta_train
from model import ANML
from tests.conftest import REPO
from tests.test_train_cli import SMALL

sys.path.append(str(REPO / "benchmarks"))  # after the repository, whose meta_test.py a benchmark shares a name with
import batched_runs  # noqa: E402
import step_variants  # noqa: E402
import train_variant  # noqa: E402


@pytest.mark.parametrize("variant", [v for v in step_variants.VARIANTS if v != "today"])
def test_variant_gives_todays_meta_gradient(background, variant):
    """In float64, so that the comparison sees the computation rather than float32 rounding."""
    torch.manual_seed(0)
    traj, remember = sample_meta_train(background)
    task = [t.double() if t.is_floating_point() else t for t in (*background.batch(traj), *background.batch(remember))]
    net = ANML(32, 16, 288).double()
    today = step_variants.gradients(net, task)
    grads = step_variants.gradients(net, task, variant)
    worst, name = step_variants.worst_difference(grads, today)
    assert worst < 1e-9, name
    biases = {n for n in today if n.endswith("conv.bias")}
    assert set(grads) == (set(today) - biases if "no-conv-bias" in variant else set(today))


def test_batched_runs_step_each_run_as_its_own_meta_step(background):
    """One step of K runs batched gives each run its own meta-gradient (float64)."""
    tasks, nets = [], []
    for k in range(2):
        torch.manual_seed(100 + k)
        traj, remember = sample_meta_train(background)
        tasks.append([t.double() if t.is_floating_point() else t
                      for t in (*background.batch(traj), *background.batch(remember))])
        nets.append(ANML(32, 16, 288).double())
    for net, task, grads in zip(nets, tasks, batched_runs.batched_gradients(nets, tasks)):
        worst, name = step_variants.worst_difference(grads, step_variants.gradients(net, task))
        assert worst < 1e-9, name


def test_train_variant_trains_with_the_variant_in_place(tmp_path, omniglot_root):
    """`no-conv-bias` leaves the conv biases out of the step, so Adam leaves them as drawn; today's step moves them
    (Adam takes their rounding-noise gradients to steps of the full rate)."""
    config = RunConfig(rln=16, nm=8, mask=144, seed=3)
    drawn = RunState.fresh(config, torch.device("cpu")).model
    flags = [*SMALL, "--epochs", "2", "--data-root", str(omniglot_root), "--out-dir"]
    for variant in ("no-conv-bias", "today"):
        train_variant.main([variant, *flags, str(tmp_path / variant)])
    for variant, moved in (("no-conv-bias", False), ("today", True)):
        trained = load_model(tmp_path / variant / "16_8_144_ANML-1.pth")
        for block in ("convBlock1", "convBlock2", "convBlock3"):
            before, after = (getattr(net.rln, block).conv.bias for net in (drawn, trained))
            assert torch.equal(before, after) != moved, (variant, block)


def table_lines(monkeypatch, capsys, row) -> list[str]:
    """The lines step_variants.main prints on this CPU with `row` in place of variant_row (a small ANML)."""
    monkeypatch.setattr(step_variants.model, "ANML", lambda: ANML(16, 8, 144))
    monkeypatch.setattr(step_variants, "variant_row", row)
    step_variants.main(["--iterations", "1"])
    return capsys.readouterr().out.splitlines()


def test_a_stopped_variants_table_still_names_the_fastest_row(omniglot_root, monkeypatch, capsys):
    """tools/gpu.sh's time limit ends the benchmark with SIGTERM; its `best` step reads the last line, which must
    name the fastest of the rows measured before it."""
    labels = list(step_variants.VARIANTS)
    seconds = dict(zip(labels, [2.0, 1.0, 0.5, 0.1]))

    def row(label, variant, net, tasks, reference, times):
        if label == labels[3]:
            os.kill(os.getpid(), signal.SIGTERM)
        times[label] = seconds[label]
        return label

    handler = signal.getsignal(signal.SIGTERM)
    lines = table_lines(monkeypatch, capsys, row)
    assert labels[3] not in lines and lines[-2].startswith("stopped")
    assert lines[-1] == f"fastest step: {labels[2]}"
    assert signal.getsignal(signal.SIGTERM) is handler


def test_a_failing_row_costs_the_variants_table_no_other_row(omniglot_root, monkeypatch, capsys):
    """A candidate that fails to compile or capture on the lent GPU, or a CUDA row after today's (`adam-outside`,
    today's kernels), prints why, and the rows after it are still measured and the fastest still named."""
    labels = list(step_variants.VARIANTS)
    on_cuda = [label for label, _ in step_variants.table(None, [], {}, {}, cuda=True)]
    assert on_cuda[:3] == ["today", "adam-outside", "today's kernels"] and on_cuda[3:] == labels[1:]

    def row(label, variant, net, tasks, reference, times):
        if label == labels[1]:
            raise RuntimeError("captured a synchronisation\nsecond line")
        times[label] = 1.0 / (1 + labels.index(label))
        return label

    lines = table_lines(monkeypatch, capsys, row)
    failed = f"{labels[1]:<{step_variants.LABEL_WIDTH}}failed: RuntimeError: captured a synchronisation"
    assert failed in lines and lines.index(failed) < lines.index(labels[-1])
    assert lines[-1] == f"fastest step: {labels[-1]}"
