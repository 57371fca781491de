"""A guard against shipping the wrong file: the shipped model must meta-test far better than an untrained one."""
from pathlib import Path

import pytest
import torch

import meta_test
from datasets import sample_meta_test
from checkpoints import load_model, parse_checkpoint_name
from model import ANML
from tests.conftest import REPO


def shipped_model() -> Path:
    """The highest-iteration default-size checkpoint in trained_anmls/."""
    models = sorted((p for p in REPO.glob("trained_anmls/256_112_2304_ANML-*.pth") if parse_checkpoint_name(p)),
                    key=lambda p: parse_checkpoint_name(p).iteration)
    assert models, "no model in trained_anmls/"
    return models[-1]


def run_features(model: ANML, data, n_classes: int, seed: int) -> torch.Tensor:
    """Gated features of the drawings that the meta-test run of this seed uses (zeros for the others)."""
    train_idx, test_idx = sample_meta_test(data, n_classes, 15, torch.Generator().manual_seed(seed))
    used = torch.cat([train_idx.flatten(), test_idx.flatten()])
    features = torch.zeros(len(data.labels), model.fc.in_features)
    with torch.no_grad():
        features[used] = model.features(data.batch(used)[0])
    return features


def small_evaluation(model: ANML, data, n_classes: int, seed: int) -> float:
    """Test accuracy of one meta-test run, with features computed for its drawings only."""
    features = run_features(model, data, n_classes, seed)
    return meta_test.meta_test_runs(model, features, data, n_classes, 0.001, [seed]).test_accuracy.item()


@pytest.mark.parametrize("seed", [0, 1])
def test_shipped_model_is_far_better_than_untrained(evaluation, seed):
    torch.manual_seed(0)
    trained = small_evaluation(load_model(shipped_model()).eval(), evaluation, 50, seed)
    untrained = small_evaluation(ANML().eval(), evaluation, 50, seed)
    assert trained > 0.7 and trained > untrained + 0.25, (trained, untrained)
