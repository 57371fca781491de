"""tools/lobotomy_age.py replays a run's lobotomies as training drew them."""
import sys

import numpy as np
import torch

from anml import RunConfig, RunState, train
from checkpoints import load_model
from tests.conftest import REPO

sys.path.append(str(REPO / "tools"))
import lobotomy_age  # noqa: E402


def test_replay_finds_each_row_the_run_redrew(background, tmp_path):
    config = RunConfig(rln=4, nm=4, epochs=5, seed=3, log_every=1)
    last_saved = train(RunState.fresh(config, torch.device("cpu")), background, tmp_path)
    weight = load_model(last_saved).fc.weight.detach()
    assert lobotomy_age.run_config(tmp_path) == config

    def worst_row(config):  # how far the checkpoint's re-drawn rows are from the replay's draws, per outer step since
        last, rows = lobotomy_age.redraws(config, background, 4)
        redrawn = np.flatnonzero(last >= 0)
        steps = torch.tensor(5 - last[redrawn], dtype=torch.float)
        return float(((weight[redrawn] - rows[redrawn]).abs().amax(1) / steps).max())

    # Adam moves an entry by about the outer rate a step (rarely a few times it); the draws of another seed are a
    # Kaiming row (std 0.24) away
    assert worst_row(config) < 4 * config.outer_lr
    assert worst_row(RunConfig(rln=4, nm=4, epochs=5, seed=4)) > 0.1
