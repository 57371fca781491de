import json
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from anml import RunConfig
from train_omni import parse_args, run_config
import checkpoints
from checkpoints import load_model, sole_writer
from model import ANML
from tests.conftest import REPO, assert_one_line_error

SMALL = ["--rln", "16", "--nm", "8", "--mask", "144", "--seed", "3", "--log-every", "1", "-d", "cpu"]


def train_omni(*args, check=True, cwd=REPO):
    result = subprocess.run([sys.executable, REPO / "train_omni.py", *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_three_iterations_write_a_loadable_checkpoint(tmp_path, omniglot_root):
    train_omni(*SMALL, "--epochs", 3, "--data-root", omniglot_root, "--out-dir", tmp_path)
    path = tmp_path / "16_8_144_ANML-2.pth"
    state = torch.load(path, weights_only=True)
    ANML(16, 8, 144).load_state_dict(state)  # a plain state_dict of the spec's keys
    assert load_model(path).fc.weight.shape == (1000, 144)
    log = (tmp_path / "training_log.csv").read_text().splitlines()
    assert log[0] == "iteration,outer_loss,outer_accuracy" and [r.split(",")[0] for r in log[1:]] == ["0", "1", "2"]
    assert (tmp_path / "training_curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("treatment, flags, name, absent", [
    ("sanml", [], "8_SANML-3.pth", "nm."),
    ("oml", [], "8_OML-3.pth", "nm."),
    ("pretrain", ["--nm", 4, "--batch-size", 16], "8_4_72_PRETRAIN-3.pth", "")])
def test_treatments_train_resume_exactly_and_load_by_name(treatment, flags, name, absent, tmp_path, omniglot_root):
    """Each treatment's checkpoint is named for it (without an NM where it has none), resumes exactly, and
    eval_omni.py builds its network from the file alone (it stops at the data, which is missing, past the model)."""
    common = ["--treatment", treatment, "--rln", 8, *flags, "--seed", 3, "--log-every", 1, "--save-every", 2, "-d",
              "cpu", "--data-root", omniglot_root]
    train_omni(*common, "--epochs", 4, "--out-dir", tmp_path / "whole")
    train_omni(*common, "--epochs", 2, "--out-dir", tmp_path / "parts")
    train_omni("--resume", tmp_path / "parts", "--epochs", 4, "--data-root", omniglot_root, "-d", "cpu")
    whole, parts = (torch.load(tmp_path / run / name, weights_only=True) for run in ("whole", "parts"))
    assert not absent or not any(key.startswith(absent) for key in whole)
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    logs = [(tmp_path / run / "training_log.csv").read_text() for run in ("whole", "parts")]
    assert logs[0] == logs[1]
    refused = train_omni("--resume", tmp_path / "whole", "--treatment", "anml", "--epochs", 5, "--data-root",
                         omniglot_root, "-d", "cpu", check=False)
    assert_one_line_error(refused, f"--treatment anml differs from the resumed run's {treatment}")
    result = subprocess.run([sys.executable, "eval_omni.py", "-m", str(tmp_path / "whole" / name), "-c", "5",
                             "--no-download", "--data-root", str(tmp_path / "nowhere")], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert_one_line_error(result, "Omniglot not found")


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
    assert (whole / "training_log.csv").read_bytes() == (parts / "training_log.csv").read_bytes()


def test_several_seeds_train_together_and_resume_together(tmp_path, omniglot_root):
    flags = ["--rln", 16, "--nm", 8, "--log-every", 1, "--save-every", 2, "-d", "cpu", "--data-root", omniglot_root]
    train_omni(*flags, "--seed", 4, 5, "--epochs", 2, "--out-dir", tmp_path / "both")
    runs = [tmp_path / "both" / f"seed_{seed}" for seed in (4, 5)]
    assert [json.loads((run / "config.json").read_text())["seed"] for run in runs] == [4, 5]
    train_omni("--resume", *runs, "--epochs", 3, "--data-root", omniglot_root, "-d", "cpu")
    train_omni(*flags, "--seed", 5, "--epochs", 3, "--out-dir", tmp_path / "alone")
    alone = torch.load(tmp_path / "alone" / "16_8_144_ANML-2.pth", weights_only=True)
    together = torch.load(runs[1] / "16_8_144_ANML-2.pth", weights_only=True)
    assert all(torch.equal(alone[k], together[k]) for k in alone)
    assert (runs[1] / "training_log.csv").read_text() == (tmp_path / "alone" / "training_log.csv").read_text()
    assert all((run / "training_curve.png").is_file() for run in runs)


@pytest.mark.parametrize("flags, words", [
    (["--seed", "4", "4"], ["repeats a seed"]),
    (["--resume", "a", "b", "--out-dir", "c"], ["--out-dir", "own folder"]),
    (["--resume", "a", "--seed", "1", "2"], ["drop --seed"]),
    (["--resume", "a/x.pth", "a/y.pth"], ["share a folder"]),
    (["--treatment", "sanml", "--nm", "8"], ["--nm", "no NM"]),
    (["--treatment", "sanml", "--mask", "144"], ["--mask", "no NM"]),
    (["--treatment", "oml", "--nm", "8"], ["--nm", "OML has no NM"]),
    (["--treatment", "oml", "--conv-init", "kaiming"], ["--conv-init", "Kaiming-initialised already"]),
    (["--treatment", "pretrain", "--inner-lr", "0.1"], ["--inner-lr", "no inner loop"]),
    (["--batch-size", "16"], ["--batch-size", "only pretrain"]),
])
def test_several_runs_refuse_flags_that_do_not_fit(flags, words, tmp_path):
    assert_one_line_error(train_omni(*flags, "-d", "cpu", check=False, cwd=tmp_path), *words)


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


FIXTURE = REPO / "tests" / "fixtures" / "run_4_4_36"


def saved_run(folder):
    """A small run saved at iteration 1 of 4 (seed 5), in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("4_4_36_ANML-1.pth", "4_4_36_ANML-1.state.pth", "training_log.csv"):
        shutil.copy(FIXTURE / f, folder)
    return folder / "4_4_36_ANML-1.pth"


def incomplete_data(omniglot_root, folder):
    """Two characters of each split, one drawing of the first deleted."""
    for split in ("images_background", "images_evaluation"):
        src = omniglot_root / "omniglot-py" / split
        alphabet = sorted(src.iterdir())[0]
        for character in sorted(alphabet.iterdir())[:2]:
            shutil.copytree(character, folder / "omniglot-py" / split / alphabet.name / character.name)
    drawing = sorted((folder / "omniglot-py" / "images_background").glob("*/*/*.png"))[0]
    drawing.unlink()
    return folder, drawing.parent.name


def not_a_checkpoint(tmp_path, _):
    path = tmp_path / "16_8_144_ANML-1.pth"
    path.write_text("these are not weights\n")
    return ["--resume", path], ["16_8_144_ANML-1.pth", "is not an ANML checkpoint"]


def truncated_checkpoint(tmp_path, _):
    path = saved_run(tmp_path / "run")
    path.write_bytes(path.read_bytes()[:5000])
    return ["--resume", path], ["4_4_36_ANML-1.pth", "is not an ANML checkpoint"]


def junk_state(tmp_path, _):
    path = saved_run(tmp_path / "run")
    path.with_name("4_4_36_ANML-1.state.pth").write_bytes(b"\x80\x04junk" * 100)
    return ["--resume", path], ["4_4_36_ANML-1.state.pth", "is not a run's state file"]


def state_from_a_newer_version(tmp_path, _):
    path = saved_run(tmp_path / "run")
    state = torch.load(path.with_name("4_4_36_ANML-1.state.pth"), weights_only=True)
    state["settings"]["warmup"] = 100
    torch.save(state, path.with_name("4_4_36_ANML-1.state.pth"))
    return ["--resume", path], ["settings this code does not know (warmup)", "newer version"]


def folder_without_states(tmp_path, _):
    (tmp_path / "run").mkdir()
    torch.save(ANML(4, 4, 36).state_dict(), tmp_path / "run" / "4_4_36_ANML-1.pth")
    return ["--resume", tmp_path / "run"], ["holds no resumable checkpoint", "start a new run"]


def resume_a_path_not_there(tmp_path, _):
    return ["--resume", tmp_path / "runs" / "gpu"], ["runs/gpu: no such checkpoint", "check the path"]


def other_sizes(tmp_path, _):
    path = tmp_path / "32_8_288_ANML-1.pth"
    torch.save(ANML(16, 8, 144).state_dict(), path)
    return ["--resume", path], ["32_8_288_ANML-1.pth", "rln.convBlock1.conv.weight is (16, 1, 3, 3)",
                                "wants (32, 1, 3, 3)"]


def resume_past_its_end(tmp_path, _):
    return ["--resume", saved_run(tmp_path / "run"), "--epochs", 2], ["done 2 of its 2", "--epochs above 2"]


def out_dir_is_a_file(tmp_path, _):
    (tmp_path / "file").write_text("")
    return ["--out-dir", tmp_path / "file"], ["is a file", "--out-dir"]


def out_dir_takes_no_file(tmp_path, _):
    return ["--out-dir", "/proc/run"], ["--out-dir /proc/run: no file can be written in /proc"]


def drawing_missing(tmp_path, omniglot_root):
    root, character = incomplete_data(omniglot_root, tmp_path / "data")
    return ["--data-root", root], [character, "holds 19 drawings, not 20"]


def out_dir_under_a_file(tmp_path, _):
    (tmp_path / "model.pth").write_text("")
    return ["--out-dir", tmp_path / "model.pth" / "x"], ["--out-dir", "model.pth is a file, not a folder"]


def non_finite_checkpoint(tmp_path, _):
    path = saved_run(tmp_path / "run")
    weights = torch.load(path, weights_only=True)
    weights["rln.convBlock2.conv.weight"][0, 0, 0, 0] = float("nan")
    torch.save(weights, path)
    return ["--resume", path], ["rln.convBlock2.conv.weight holds non-finite values", "diverged"]


def interval(name, value):
    def case(tmp_path, _):
        return [name, value], [f"{name} {value} must be at least 1"]
    case.__name__ = f"{name}_{value}"
    return case


def negative_seed(tmp_path, _):
    return ["--seed", -1], ["--seed -1 is outside 0..4294967295"]


def bad_rate(name, value):
    def case(tmp_path, _):
        return [name, value], [f"{name} {value}", "learning rate"]
    case.__name__ = f"{name}_{value}"
    return case


@pytest.mark.parametrize("case", [not_a_checkpoint, truncated_checkpoint, junk_state, state_from_a_newer_version,
                                  folder_without_states, resume_a_path_not_there, other_sizes,
                                  resume_past_its_end, out_dir_is_a_file, out_dir_takes_no_file, drawing_missing,
                                  interval("--save-every", 0), interval("--log-every", 0),
                                  interval("--epochs", 0), interval("--epochs", -3), interval("--rln", 0),
                                  interval("--nm", -2), bad_rate("--outer-lr", 0.0), bad_rate("--inner-lr", -0.1),
                                  bad_rate("--outer-lr", "inf"), bad_rate("--inner-lr", "inf"),
                                  bad_rate("--inner-lr", "nan"), negative_seed, out_dir_under_a_file,
                                  non_finite_checkpoint],
                         ids=lambda c: c.__name__)
def test_bad_input_is_one_line_and_blocks_nothing(case, tmp_path, omniglot_root):
    args, words = case(tmp_path, omniglot_root)
    if "--data-root" not in args:
        args += ["--data-root", omniglot_root]
    out = [] if "--out-dir" in args or "--resume" in args else ["--out-dir", tmp_path / "out"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert_one_line_error(train_omni(*SMALL, *args, *out, check=False) if "--resume" not in args
                          else train_omni(*args, check=False), *words)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_resume_refuses_a_folder_that_another_process_trains_into(tmp_path, omniglot_root):
    checkpoint = saved_run(tmp_path / "run")
    with sole_writer(tmp_path / "run"):  # as a train_omni.py running there holds it
        before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
        result = train_omni("--resume", checkpoint, "--data-root", omniglot_root, check=False)
        assert result.returncode != 0  # after the resumed state is read, so its "resuming ..." line comes first
        assert result.stderr.strip().splitlines()[-1].startswith("error: another process is training into")
        assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    train_omni("--resume", checkpoint, "--data-root", omniglot_root)  # the lock goes with its holder
    assert (tmp_path / "run" / "4_4_36_ANML-3.pth").is_file()


def test_resume_goes_on_in_the_checkpoints_folder(tmp_path, omniglot_root):
    checkpoint = saved_run(tmp_path / "run")
    stale = tmp_path / "run" / ".4_4_36_ANML-1.pth.tmp99999"  # what a killed save leaves
    stale.write_bytes(b"half")
    result = train_omni("--resume", checkpoint, "--keep-states", 1, "--data-root", omniglot_root)
    assert not stale.exists()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["keep_states"] == 1 and config["rln"] == 4 and config["epochs"] == 4
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pth")) == [
        "4_4_36_ANML-1.pth", "4_4_36_ANML-3.pth", "4_4_36_ANML-3.state.pth"]
    assert [r.split(",")[0] for r in (tmp_path / "run" / "training_log.csv").read_text().splitlines()[1:]] == [
        "0", "1", "2", "3"]
    last = result.stderr.strip().splitlines()[-1]
    assert "4_4_36_ANML-3.pth" in last and "training_log.csv" in last and "training_curve.png" in last


def test_resume_a_folder_takes_its_newest_resumable_checkpoint(tmp_path, omniglot_root):
    checkpoint = saved_run(tmp_path / "run")
    shutil.copy(checkpoint, tmp_path / "run" / "4_4_36_ANML-7.pth")  # weights whose state was pruned
    shutil.copy(checkpoint, tmp_path / "run" / "4_4_36_ANML-10.pth")
    result = train_omni("--resume", tmp_path / "run", "--epochs", 3, "--data-root", omniglot_root)
    assert "4_4_36_ANML-1.pth at iteration 2" in result.stderr
    assert (tmp_path / "run" / "4_4_36_ANML-2.state.pth").is_file()


def test_short_run_logs_its_last_iterations_aligned_across_a_resume(tmp_path, omniglot_root):
    flags = ["--rln", 4, "--nm", 4, "--log-every", 4, "-d", "cpu", "--data-root", omniglot_root]
    train_omni(*flags, "--epochs", 2, "--out-dir", tmp_path)
    assert [r.split(",")[0] for r in (tmp_path / "training_log.csv").read_text().splitlines()[1:]] == ["1"]
    assert (tmp_path / "training_curve.png").is_file()
    train_omni("--resume", tmp_path / "4_4_36_ANML-1.pth", "--epochs", 6, "--data-root", omniglot_root)
    assert [r.split(",")[0] for r in (tmp_path / "training_log.csv").read_text().splitlines()[1:]] == ["1", "3", "5"]


@pytest.mark.parametrize("seeds, stop_signal", [([], signal.SIGINT), (["--seed", "1", "2"], signal.SIGINT),
                                                ([], signal.SIGTERM)], ids=["one_run", "two_runs", "sigterm"])
def test_a_stop_prints_a_resume_command_that_works(seeds, stop_signal, tmp_path, omniglot_root):
    """Ctrl-C or SIGTERM: saved, the command that goes on, and the shell's status for the signal (130, 143)."""
    out = tmp_path / "run"
    runs = [out / f"seed_{seed}" for seed in seeds[1:]] or [out]
    flags = ["--rln", "4", "--nm", "4", "--epochs", "100000", "--save-every", "1", "-d", "cpu",
             "--data-root", str(omniglot_root), "--out-dir", str(out), *seeds]
    proc = subprocess.Popen([sys.executable, "train_omni.py", *flags], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not all(list(run.glob("*.state.pth")) for run in runs) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(stop_signal)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + stop_signal
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted after iteration") and "resume with: python " in last
    command = shlex.split(last.split("resume with: ")[1])
    iterations = [int(i) for i in last.split("iteration ")[1].split(";")[0].split(", ")]
    assert len(iterations) == len(runs) and len(set(iterations)) == 1  # every run stopped after the same round
    resumed = subprocess.run([sys.executable, *command[1:], "--epochs", str(iterations[0] + 2)], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert all((run / f"4_4_36_ANML-{iterations[0] + 1}.pth").is_file() for run in runs)


def test_reference_spellings_and_seed():
    args = parse_args(["--inner_lr", "0.2", "--outer_lr", "0.001"])
    assert (args.inner_lr, args.outer_lr) == (0.2, 0.001)
    assert run_config(parse_args([]), None).seed == 1


def test_divergence_stops_the_run_and_keeps_its_finite_checkpoints(tmp_path, omniglot_root):
    """A huge inner rate blows up the first iteration: one line naming it, nothing saved, a status that is no
    success. A huge outer rate blows up after the first Adam step: the checkpoint before it stays, finite and
    resumable."""
    result = train_omni("--rln", 4, "--nm", 4, "--inner-lr", 1e30, "--epochs", 20, "-d", "cpu", "--data-root",
                        omniglot_root, "--out-dir", tmp_path / "inner", check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "diverged: its outer loss was nan at iteration 0" in last
    assert "no checkpoint was saved" in last
    assert result.returncode == 1 and not list((tmp_path / "inner").glob("*.pth"))

    result = train_omni("--rln", 4, "--nm", 4, "--outer-lr", 1e30, "--epochs", 20, "--save-every", 1, "-d", "cpu",
                        "--data-root", omniglot_root, "--out-dir", tmp_path / "outer", check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith("error: ") and "diverged" in last and "at iteration 1" in last
    assert "the last checkpoint, " in last and "4_4_36_ANML-0.pth, stays resumable" in last
    assert sorted(p.name for p in (tmp_path / "outer").glob("*.pth")) == ["4_4_36_ANML-0.pth",
                                                                          "4_4_36_ANML-0.state.pth"]
    assert checkpoints.newest_resumable(tmp_path / "outer") == tmp_path / "outer" / "4_4_36_ANML-0.pth"


def test_a_folder_killed_before_its_first_save_takes_a_new_run(tmp_path, omniglot_root):
    (tmp_path / "training_log.csv").write_text("iteration,outer_loss,outer_accuracy\n")  # all that the kill left
    (tmp_path / "config.json").write_text("{}")
    result = train_omni(*SMALL, "--epochs", 2, "--data-root", omniglot_root, "--out-dir", tmp_path)
    assert "holds no checkpoint" in result.stderr and "a new run starts there" in result.stderr
    assert [r.split(",")[0] for r in (tmp_path / "training_log.csv").read_text().splitlines()[1:]] == ["0", "1"]
    assert (tmp_path / "16_8_144_ANML-1.pth").is_file()


def test_resume_a_folder_passes_over_a_damaged_newest_state(tmp_path, omniglot_root):
    run = tmp_path / "run"
    train_omni(*SMALL, "--epochs", 3, "--save-every", 1, "--data-root", omniglot_root, "--out-dir", run)
    newest = run / "16_8_144_ANML-2.state.pth"
    newest.write_bytes(newest.read_bytes()[:1000])
    result = train_omni("--resume", run, "--epochs", 4, "--data-root", omniglot_root)
    assert "passing over 16_8_144_ANML-2.pth" in result.stderr and "16_8_144_ANML-1.pth at iteration 2" in result.stderr
    assert (run / "16_8_144_ANML-3.pth").is_file()
