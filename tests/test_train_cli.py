import subprocess
import sys

import pytest
import torch

from anml import RunConfig
from train_omni import parse_args, run_config
from checkpoints import load_anml
from model import ANML
from tests.conftest import REPO, assert_one_line_error

SMALL = ["--rln", "16", "--nm", "8", "--mask", "144", "--seed", "3", "--log-every", "1", "-d", "cpu"]


def train_omni(*args, check=True):
    result = subprocess.run([sys.executable, "train_omni.py", *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_three_iterations_write_a_loadable_checkpoint(tmp_path, omniglot_root):
    train_omni(*SMALL, "--epochs", 3, "--data-root", omniglot_root, "--out-dir", tmp_path)
    path = tmp_path / "16_8_144_ANML-2.pth"
    state = torch.load(path, weights_only=True)
    ANML(16, 8, 144).load_state_dict(state)  # a plain state_dict of the spec's keys
    assert load_anml(path).fc.weight.shape == (1000, 144)
    log = (tmp_path / "training_log.csv").read_text().splitlines()
    assert log[0] == "iteration,outer_loss,outer_accuracy" and [r.split(",")[0] for r in log[1:]] == ["0", "1", "2"]
    assert (tmp_path / "training_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_gives_the_uninterrupted_run(tmp_path, omniglot_root):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = [*SMALL, "--data-root", omniglot_root, "--save-every", 2]
    train_omni(*common, "--epochs", 5, "--out-dir", whole)
    train_omni(*common, "--epochs", 2, "--out-dir", parts)
    resumed = train_omni("--resume", parts / "16_8_144_ANML-1.pth", "--epochs", 5, "--data-root", omniglot_root,
                         "--out-dir", parts)
    assert "at iteration 2" in resumed.stderr
    a = torch.load(whole / "16_8_144_ANML-4.pth", weights_only=True)
    b = torch.load(parts / "16_8_144_ANML-4.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "training_log.csv").read_text() == (parts / "training_log.csv").read_text()


def test_new_run_leaves_a_folder_holding_a_run_untouched(tmp_path, omniglot_root):
    train_omni(*SMALL, "--epochs", 1, "--data-root", omniglot_root, "--out-dir", tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = train_omni(*SMALL, "--epochs", 1, "--data-root", omniglot_root, "--out-dir", tmp_path, check=False)
    assert_one_line_error(result, "training_log.csv", "--resume")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_missing_data_root(tmp_path):
    result = train_omni("--data-root", tmp_path / "nowhere", "--no-download", "--out-dir", tmp_path, check=False)
    assert_one_line_error(result, "nowhere", "--data-root")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path, omniglot_root):
    result = train_omni("-d", "cuda", "--data-root", omniglot_root, "--out-dir", tmp_path, check=False)
    assert_one_line_error(result, "-d cuda", "-d cpu")


def test_resume_checkpoint_of_other_sizes(tmp_path, omniglot_root):
    wrong = tmp_path / "32_8_288_ANML-1.pth"
    torch.save(ANML(16, 8, 144).state_dict(), wrong)
    result = train_omni("--resume", wrong, "--data-root", omniglot_root, "--out-dir", tmp_path, check=False)
    assert_one_line_error(result, "32_8_288_ANML-1.pth", "do not match")


def test_resume_with_a_different_recipe(tmp_path, omniglot_root):
    train_omni(*SMALL, "--epochs", 1, "--data-root", omniglot_root, "--out-dir", tmp_path)
    result = train_omni("--resume", tmp_path / "16_8_144_ANML-0.pth", "--outer-lr", 0.001, "--epochs", 2,
                        "--data-root", omniglot_root, "--out-dir", tmp_path, check=False)
    assert_one_line_error(result, "--outer-lr 0.001", "0.003")


def test_recipe_is_kept_on_resume():
    with pytest.raises(ValueError, match="--conv-init kaiming differs from the resumed run's default"):
        run_config(parse_args(["--conv-init", "kaiming"]), RunConfig())
    assert run_config(parse_args(["--epochs", "20"]), RunConfig(epochs=10)).epochs == 20
    # the cosine schedule is drawn over --epochs, so a cosine run cannot be lengthened
    with pytest.raises(ValueError, match="--epochs 20 differs from the resumed run's 10"):
        run_config(parse_args(["--epochs", "20"]), RunConfig(epochs=10, outer_lr_schedule="cosine"))
    assert run_config(parse_args(["--rln", "16"]), None).mask == 144
