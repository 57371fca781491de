import copy
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval_omni
import meta_test
import runtime
from checkpoints import checkpoint_name, load_model
from model import ANML, OML, SANML
from tests.conftest import REPO, assert_one_line_error
from tests.test_shipped_model import run_features, shipped_model

SIZES = (32, 16, 288)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(5)
    return ANML(*SIZES).eval()


@pytest.fixture(scope="module")
def small_features(small_model, evaluation):
    return meta_test.gated_features(small_model, evaluation)


def test_gated_features_are_the_models(small_model, small_features, evaluation):
    x, _ = evaluation.batch(torch.tensor([0, 777, 13179]))
    with torch.no_grad():
        torch.testing.assert_close(small_features[[0, 777, 13179]], small_model.features(x))


def test_fast_runs_match_the_plain_protocol(small_model, small_features, evaluation):
    """Same classes, splits, orders and init: the same fc weights and accuracies, run by run of a batch."""
    for n_classes, lr in ((3, 0.001), (6, 0.003)):
        fast = meta_test.meta_test_runs(small_model, small_features, evaluation, n_classes, lr, seeds=[11, 12])
        for run, seed in enumerate([11, 12]):
            test, train, fc, *_ = meta_test.plain_meta_test_run(copy.deepcopy(small_model), evaluation, n_classes,
                                                                lr, seed=seed)
            for a, b in ((fast.weight[run], fc.weight), (fast.bias[run], fc.bias)):
                assert (a - b).norm() / b.norm() < 1e-4
            assert (fast.test_accuracy[run].item(), fast.train_accuracy[run].item()) == pytest.approx((test, train),
                                                                                                       abs=1e-6)
        assert not torch.equal(fast.weight[0], small_model.fc.weight)


@pytest.mark.parametrize("network", [SANML(16), OML(16)], ids=["sanml", "oml"])
def test_fast_runs_match_the_plain_protocol_for_the_treatments(network, evaluation):
    """SANML and OML learn their last layer as ANML does (OML's: OML-OLFT), on the features it reads."""
    network.eval()
    features = meta_test.gated_features(network, evaluation)
    fast = meta_test.meta_test_runs(network, features, evaluation, 4, 0.002, seeds=[21])
    test, train, fc, *_ = meta_test.plain_meta_test_run(copy.deepcopy(network), evaluation, 4, 0.002, seed=21)
    assert (fast.weight[0] - fc.weight).norm() / fc.weight.norm() < 1e-4
    assert (fast.test_accuracy[0].item(), fast.train_accuracy[0].item()) == pytest.approx((test, train), abs=1e-6)


def test_fc_adam_step_is_torch_adam_on_the_cross_entropy():
    g = torch.Generator().manual_seed(0)
    fc, lr = torch.nn.Linear(8, 1000), 0.01
    xs, ys = torch.rand(4, 1, 8, generator=g), torch.tensor([[3], [3], [7], [1]])
    weight, bias = fc.weight.detach().clone().unsqueeze(0), fc.bias.detach().clone().unsqueeze(0)
    start = weight.clone()
    moments = tuple(torch.zeros_like(t) for t in (weight, weight, bias, bias))
    opt = torch.optim.Adam(fc.parameters(), lr=lr)
    logits = fc(xs[0]).detach()
    for t in range(3):
        step = t + 1
        logits = meta_test.fc_adam_step(weight, bias, moments, logits, xs[t], ys[t], xs[t + 1],
                                   torch.tensor(lr / (1 - 0.9 ** step)), torch.tensor((1 - 0.999 ** step) ** 0.5))
        opt.zero_grad()
        F.cross_entropy(fc(xs[t]), ys[t]).backward()
        opt.step()
        torch.testing.assert_close(weight[0], fc.weight.detach())
        torch.testing.assert_close(bias[0], fc.bias.detach())
        torch.testing.assert_close(logits, fc(xs[t + 1]).detach())
    assert (weight - start).abs().max() > lr


def test_runs_trained_together_equal_runs_trained_alone(small_features):
    """The batched path that CUDA takes, checked here against one run at a time (the CPU path)."""
    g = torch.Generator().manual_seed(0)
    features = small_features[torch.randperm(len(small_features), generator=g)[:3 * 4 * 15]].view(3, 4, 15, -1)
    labels = torch.randint(0, 1000, (3, 4), generator=g)
    weight, bias = torch.randn(3, 1000, SIZES[2], generator=g) * 0.05, torch.randn(3, 1000, generator=g) * 0.05
    alone_weight, alone_bias = weight.clone(), bias.clone()
    meta_test.train_fc(weight, bias, features, labels, 0.002)
    for run in range(3):
        part = slice(run, run + 1)
        meta_test.train_fc(alone_weight[part], alone_bias[part], features[part], labels[part], 0.002)
    torch.testing.assert_close(weight, alone_weight)
    torch.testing.assert_close(bias, alone_bias)
    assert not torch.equal(weight[0], weight[1])
    alone = [meta_test.fc_accuracy(alone_weight[r:r + 1], alone_bias[r:r + 1], features[r:r + 1], labels[r:r + 1])
             for r in range(3)]
    torch.testing.assert_close(meta_test.fc_accuracy(weight, bias, features, labels), torch.cat(alone))


def test_runs_trained_together_compile_once_for_every_class_count():
    """A sweep on CUDA trains its runs together: its class counts must share one compiled step per batch size.
    They did not (each count's slices had other strides), and a full table hit dynamo's recompile limit."""
    g = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            for n_classes in (2, 3, 5):
                weight, bias = torch.zeros(2, 1000, 16), torch.zeros(2, 1000)
                meta_test.train_fc(weight, bias, torch.rand(2, n_classes, 15, 16, generator=g),
                                torch.randint(0, 1000, (2, n_classes), generator=g), 0.001)
                assert weight.abs().sum() > 0
    finally:
        torch._dynamo.reset()


def test_fc_bias_stays_as_loaded_and_weight_is_redrawn(small_model, small_features, evaluation):
    g = torch.Generator().manual_seed(0)
    weight = meta_test.fresh_fc_weight(small_model, g)
    assert not torch.equal(weight, small_model.fc.weight)
    assert abs(weight.std().item() - (2 / SIZES[2]) ** 0.5) < 0.05 * (2 / SIZES[2]) ** 0.5
    untrained = meta_test.meta_test_runs(small_model, small_features, evaluation, 3, lr=1e-30, seeds=[0])
    torch.testing.assert_close(untrained.bias[0], small_model.fc.bias.detach())


def halved_smallest_normals() -> torch.Tensor:
    """2**-127, a denormal, a million times over: enough elements that every OpenMP worker computes some."""
    return torch.full((1 << 20,), 2.0 ** -126) * 0.5


@pytest.mark.parametrize("flush", [True, False])
def test_a_new_thread_flushes_denormals_as_told(flush):
    nonzero = runtime.call_in_new_thread(lambda: halved_smallest_normals().count_nonzero().item(), flush)
    assert nonzero == (0 if flush else 1 << 20)


def test_eval_omni_flushes_denormals_in_every_thread():
    """eval_omni.py as a command, in a process of its own (stopped by bad input before any work): the OpenMP workers
    made after it flush denormals too."""
    code = ("import runpy, sys, torch; sys.argv = ['eval_omni.py', '-c', '0']\n"
            "try: runpy.run_path('eval_omni.py', run_name='__main__')\n"
            "except SystemExit as stop: print(stop, file=sys.stderr)\n"
            "torch.set_num_threads(2); print((torch.full((1 << 20,), 2.0 ** -126) * 0.5).count_nonzero().item())")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "--classes 0" in result.stderr and result.stdout.split() == ["0"], result.stderr


def test_flushing_denormals_changes_no_run(evaluation):
    """The shipped model's runs end as they do with denormals kept (they are what flushing makes 4.6x faster)."""
    model = load_model(shipped_model()).eval()
    features = run_features(model, evaluation, 50, seed=3)
    run = lambda: meta_test.meta_test_runs(model, features, evaluation, 50, 0.001, [3])
    flushed, kept = (runtime.call_in_new_thread(run, flush) for flush in (True, False))
    torch.testing.assert_close(flushed.weight, kept.weight)
    torch.testing.assert_close(flushed.bias, kept.bias)
    assert flushed.test_accuracy.item() == pytest.approx(kept.test_accuracy.item(), abs=1e-6)


def test_fc_accuracy_is_per_class():
    weight, bias = torch.zeros(2, 1000, 2), torch.zeros(2, 1000)
    bias[0, 4] = 1  # run 0 always predicts class 4
    bias[1, 9] = 1  # run 1 always predicts class 9
    features = torch.zeros(2, 3, 5, 2)
    labels = torch.tensor([[4, 9, 9], [4, 9, 9]])
    assert meta_test.fc_accuracy(weight, bias, features, labels).tolist() == [[1, 0, 0], [0, 1, 1]]


@pytest.mark.parametrize("order, epochs", [("iid", 1), ("sequential", 2), ("iid", 3)])
def test_orders_and_epochs_match_the_plain_protocol(order, epochs, small_model, small_features, evaluation):
    """The i.i.d. oracle and several epochs: the same drawings and Adam, the steps in the run's order, on the fast
    path and on the whole model alike; per class, the accuracies average to the run's."""
    fast = meta_test.meta_test_runs(small_model, small_features, evaluation, 4, 0.002, seeds=[31], order=order,
                                    epochs=epochs)
    test, train, fc, *_ = meta_test.plain_meta_test_run(copy.deepcopy(small_model), evaluation, 4, 0.002, seed=31,
                                                       order=order, epochs=epochs)
    assert (fast.weight[0] - fc.weight).norm() / fc.weight.norm() < 1e-4
    assert (fast.test_accuracy[0].item(), fast.train_accuracy[0].item()) == pytest.approx((test, train), abs=1e-6)
    assert fast.test_by_class.shape == (1, 4) and fast.test_by_class.mean().item() == pytest.approx(test, abs=1e-6)
    sequential = meta_test.meta_test_runs(small_model, small_features, evaluation, 4, 0.002, seeds=[31])
    assert not torch.equal(fast.weight, sequential.weight)  # another order, or more steps, learns otherwise


def test_accuracy_so_far_matches_the_plain_protocol(small_model, small_features, evaluation):
    fast = meta_test.meta_test_runs(small_model, small_features, evaluation, 6, 0.002, seeds=[41, 42], record_every=2)
    for run, seed in enumerate([41, 42]):
        test, *_, so_far = meta_test.plain_meta_test_run(copy.deepcopy(small_model), evaluation, 6, 0.002, seed=seed,
                                                         record_every=2)
        assert len(so_far) == 3 and fast.so_far[run].tolist() == pytest.approx(so_far, abs=1e-6)
        assert so_far[-1] == pytest.approx(test, abs=1e-6)  # after the last class: the run's own figure


@pytest.mark.parametrize("learn, changed", [("fc", {"fc."}), ("inner", {"fc.", "rln."}),
                                            ("all", {"fc.", "rln.", "nm."})])
def test_what_learns_learns_and_nothing_else(learn, changed, small_model, evaluation):
    model = copy.deepcopy(small_model)
    before = copy.deepcopy(model.state_dict())
    run = meta_test.plain_meta_test_run(model, evaluation, 3, 0.002, seed=5, learn=learn)
    moved = {name.split(".")[0] + "." for name, value in model.state_dict().items()
             if not torch.equal(value, before[name]) and not name.endswith("conv.bias")}  # (no gradient: the norm)
    assert moved == changed
    assert len(run.test_by_class) == 3 and run.test_accuracy == pytest.approx(np.mean(run.test_by_class))


def test_scratch_draws_a_fresh_network_a_run_and_learns_everything(omniglot_root, monkeypatch):
    args = eval_omni.parse_args(["-m", "scratch", "-c", "3", "-l", "0.002", "-r", "2", "-d", "cpu", "--data-root",
                                 str(omniglot_root)])
    eval_omni.check_args(args)
    learned, starts = [], []
    real = meta_test.plain_meta_test_run

    def spy(network, *rest):
        starts.append(network.nm.fc.weight.detach().clone())
        learned.append(rest[-1])
        return real(network, *rest)
    monkeypatch.setattr(meta_test, "plain_meta_test_run", spy)
    results = [*eval_omni.evaluate(args)][-1]
    assert results["learn"] == "all" and learned == ["all", "all"]
    assert not torch.equal(*starts)  # each run its own network, from its own seed
    again = [*eval_omni.evaluate(args)][-1]
    assert [r["test_by_class"] for r in again["runs"]] == [r["test_by_class"] for r in results["runs"]]


def test_training_orders():
    g = torch.Generator().manual_seed(0)
    assert meta_test.training_order(2, 3).tolist() == [0, 1, 2, 3, 4, 5]
    assert meta_test.training_order(2, 3, "sequential", 2).tolist() == [0, 1, 2, 3, 4, 5] * 2
    shuffled = meta_test.training_order(20, 15, "iid", 2, g)
    first, second = shuffled[:300], shuffled[300:]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(300))  # each drawing once an epoch
    assert not torch.equal(first, second) and not torch.equal(first, torch.arange(300))


def test_features_cache_is_keyed_by_checkpoint(small_model, evaluation, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / checkpoint_name("anml", SIZES, 0)
    torch.save(small_model.state_dict(), path)
    first = meta_test.cached_features(path, small_model, evaluation)
    real = meta_test.gated_features
    monkeypatch.setattr(meta_test, "gated_features", lambda *a: pytest.fail("recomputed although cached"))
    torch.testing.assert_close(meta_test.cached_features(path, small_model, evaluation), first)
    other = ANML(*SIZES)
    torch.save(other.state_dict(), path)
    monkeypatch.setattr(meta_test, "gated_features", real)
    assert not torch.equal(meta_test.cached_features(path, other, evaluation), first)


def test_a_damaged_features_cache_is_computed_again(small_model, small_features, evaluation, tmp_path, monkeypatch,
                                                    caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / checkpoint_name("anml", SIZES, 0)
    torch.save(small_model.state_dict(), path)
    meta_test.cached_features(path, small_model, evaluation)
    [cache] = (tmp_path / "cache" / "anml").glob("features-*.pt")
    cache.write_bytes(cache.read_bytes()[:5000])
    torch.testing.assert_close(meta_test.cached_features(path, small_model, evaluation), small_features)
    assert f"cache {cache} is damaged" in caplog.text
    torch.testing.assert_close(torch.load(cache, weights_only=True), small_features)


def test_non_finite_weights_are_one_line(small_model, tmp_path):
    weights = small_model.state_dict()
    weights["nm.convBlock1.conv.weight"] = weights["nm.convBlock1.conv.weight"].clone()
    weights["nm.convBlock1.conv.weight"][3, 0, 1, 1] = float("inf")
    path = tmp_path / checkpoint_name("anml", SIZES, 4)
    torch.save(weights, path)
    result = eval_cli("-m", path, "-c", "5", "--data-root", tmp_path / "nowhere")
    assert_one_line_error(result, "nm.convBlock1.conv.weight holds non-finite values")


@pytest.fixture(scope="module")
def checkpoint(small_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / checkpoint_name("anml", SIZES, 9)
    torch.save(small_model.state_dict(), path)
    return path


def eval_cli(*args):
    return subprocess.run([sys.executable, "eval_omni.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_end_to_end_with_sweep_json_and_plot(checkpoint, omniglot_root, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    result = eval_cli("-m", checkpoint, "-c", 5, 8, "-l", 0.001, 0.01, "-r", 2, "--select-runs", 2, "-d", "cpu",
                      "--data-root", omniglot_root, "--out", out, "--plot", png)
    assert result.returncode == 0, result.stderr
    assert "Classes 5 Accuracy" in result.stdout and "Classes 8 Accuracy" in result.stdout
    results = json.loads(out.read_text())
    assert len(results["runs"]) == 2 * 2 * (2 + 2)
    for run in results["runs"]:
        assert 0 <= run["test_accuracy"] <= 1 and 0 <= run["train_accuracy"] <= 1
    selection = {r["seed"] for r in results["runs"] if r["purpose"] == "select"}
    reported = {r["seed"] for r in results["runs"] if r["purpose"] == "report"}
    assert not selection & reported
    assert [s["classes"] for s in results["summary"]] == [5, 8]
    for s in results["summary"]:
        assert s["lr"] in (0.001, 0.01) and s["chosen_on"] == "selection runs"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oracle_and_epochs_keep_every_class_by_position(checkpoint, omniglot_root, tmp_path):
    common = ["-m", str(checkpoint), "-c", "12", "-l", "0.002", "-r", "2", "-d", "cpu", "--data-root",
              str(omniglot_root)]
    sequential = [*eval_omni.evaluate(eval_omni.parse_args(common))][-1]
    oracle = [*eval_omni.evaluate(eval_omni.parse_args([*common, "--order", "iid", "--epochs", "2"]))][-1]
    assert (oracle["order"], oracle["epochs"], sequential["order"], sequential["epochs"]) == ("iid", 2, "sequential", 1)
    for a, b in zip(sequential["runs"], oracle["runs"]):
        assert a["seed"] == b["seed"]  # paired: the same classes and splits, learned in another order
        assert len(b["test_by_class"]) == len(b["train_by_class"]) == 12
        assert np.mean(b["test_by_class"]) == pytest.approx(b["test_accuracy"], abs=1e-4)
    assert [r["test_by_class"] for r in sequential["runs"]] != [r["test_by_class"] for r in oracle["runs"]]
    recorded = [*eval_omni.evaluate(eval_omni.parse_args([*common, "--record-every", "4"]))][-1]
    for a, b in zip(sequential["runs"], recorded["runs"]):  # recording changes nothing it records
        assert len(b["test_so_far"]) == 3 and b["test_so_far"][-1] == pytest.approx(a["test_accuracy"], abs=1e-4)
        assert b["test_by_class"] == a["test_by_class"] and "test_so_far" not in a
    png = tmp_path / "sequence.png"
    eval_omni.plot_sequence(oracle, png)
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "r.json"
    out.write_text(json.dumps(sequential))
    with pytest.raises(ValueError, match="other order, epochs"):
        eval_omni.stopped_runs(eval_omni.parse_args([*common, "--order", "iid", "--epochs", "2", "--out", str(out),
                                                     "--resume"]))


def test_seed_reproduces_runs(small_model, checkpoint, omniglot_root):
    args = ["-m", str(checkpoint), "-c", "4", "-l", "0.002", "-r", "2", "-d", "cpu", "--data-root", str(omniglot_root)]
    first, again, other = ([*eval_omni.evaluate(eval_omni.parse_args([*args, "--seed", seed]))][-1]["runs"]
                           for seed in ("1", "1", "2"))
    assert first == again
    assert [r["seed"] for r in first] != [r["seed"] for r in other]


@pytest.mark.parametrize("args, words", [
    (["-c", "660"], ["--classes 660", "1..659"]),
    (["-c", "0"], ["--classes 0"]),
    (["-t", "20"], ["--train-examples 20", "1..19"]),
    (["-l", "0"], ["--lr 0.0", "positive"]),
    (["-l", "inf"], ["--lr inf", "finite"]),
    (["-l", "nan"], ["--lr nan", "finite"]),
    (["--epochs", "0"], ["--epochs 0 must be at least 1"]),
    (["-m", "scratch", "--learn", "fc"], ["--learn fc means nothing with --model scratch"]),
    (["-m", "scratch", "-l", "0.1", "0.2", "--save-rates"], ["--save-rates", "scratch has none"]),
    (["-c", "10", "50", "--record-every", "20"], ["--record-every 20 is outside 1..10"]),
    (["-c", "10", "--record-every", "5", "--order", "iid"], ["--record-every", "means nothing with --order iid"]),
    (["--out", "README.md/r.json"], ["--out README.md/r.json", "README.md is a file"]),
    (["-m", "trained_anmls/256_112_2304_ANML-12345.pth"], ["no such checkpoint"]),
    (["-m", "README.md"], ["checkpoint name"]),
    (["-m", "trained_anmls"], ["--model trained_anmls is a folder"]),
    (["--out", "tests"], ["--out tests is a folder"]),
    (["--out", "/proc/r.json"], ["--out /proc/r.json: no file can be written in /proc"]),
])
def test_bad_input_is_one_line_before_work(args, words, tmp_path):
    result = eval_cli(*args, "--data-root", tmp_path / "nowhere")  # data is never reached
    assert_one_line_error(result, *words)


def test_missing_compiler_is_one_line_before_work(checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "eval_omni.py", "-m", str(checkpoint), "-d", "cpu", "--data-root",
                             str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CXX": "/nowhere/g++"})
    assert_one_line_error(result, "C++ compiler", "/nowhere/g++")


def test_checkpoint_of_other_sizes_is_one_line(tmp_path):
    wrong = tmp_path / "32_8_288_ANML-1.pth"
    torch.save(ANML(*SIZES).state_dict(), wrong)
    result = eval_cli("-m", wrong, "-c", "5", "--data-root", tmp_path / "nowhere")
    assert_one_line_error(result, "do not match an ANML(32, 8, 288)")


def test_not_a_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "32_16_288_ANML-1.pth"
    path.write_text("not weights")
    assert_one_line_error(eval_cli("-m", path, "--data-root", tmp_path / "nowhere"), "is not an ANML checkpoint")


def test_default_model_is_found_from_any_folder(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "eval_omni.py"), "-c", "5", "-d", "cpu", "--no-download",
                             "--data-root", str(tmp_path / "nowhere")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert_one_line_error(result, "Omniglot not found", "--data-root")  # past the model: the data is missing


def test_results_come_class_count_by_class_count(checkpoint, omniglot_root, tmp_path, monkeypatch, capsys):
    """Each class count's line as soon as its runs finish, the JSON as results come; Ctrl-C keeps them."""
    out = tmp_path / "new" / "folder" / "r.json"
    real = meta_test.meta_test_runs

    def interrupt_the_second_count(model, features, data, n_classes, *args):
        if n_classes == 4:
            raise KeyboardInterrupt
        return real(model, features, data, n_classes, *args)
    monkeypatch.setattr(meta_test, "meta_test_runs", interrupt_the_second_count)
    args = ["-m", str(checkpoint), "-c", "3", "4", "-l", "0.002", "-r", "2", "-d", "cpu",
            "--data-root", str(omniglot_root), "--out", str(out)]
    with pytest.raises(SystemExit) as stop:
        eval_omni.main(args)
    assert stop.value.code == 130  # the shell's status for Ctrl-C
    printed, said = capsys.readouterr()
    assert said.strip().splitlines()[-1] == (f"interrupted: 1 of 2 class counts finished, the runs done kept in {out}; "
                                             "continue with --resume")
    assert "Classes 3 Accuracy" in printed and "Classes 4" not in printed
    assert "best-of-sweep" not in printed  # one rate: nothing was swept
    assert [s["classes"] for s in json.loads(out.read_text())["summary"]] == [3]

    ran = []
    monkeypatch.setattr(meta_test, "meta_test_runs", lambda model, features, data, n, *rest:
                        ran.append(n) or real(model, features, data, n, *rest))
    eval_omni.main([*args, "--resume"])
    assert ran == [4]  # the stopped evaluation's runs of 3 classes are kept, not run again
    eval_omni.main([*args[:-1], str(tmp_path / "straight.json")])
    resumed, straight = (json.loads(path.read_text()) for path in (out, tmp_path / "straight.json"))
    assert resumed["runs"] == straight["runs"] and resumed["summary"] == straight["summary"]


def test_sigterm_stops_as_ctrl_c_does(checkpoint, omniglot_root, monkeypatch, capsys):
    real = meta_test.meta_test_runs

    def terminate_at_the_second_count(model, features, data, n_classes, *args):
        if n_classes == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, features, data, n_classes, *args)
    monkeypatch.setattr(meta_test, "meta_test_runs", terminate_at_the_second_count)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        eval_omni.main(["-m", str(checkpoint), "-c", "3", "4", "-l", "0.002", "-r", "1", "-d", "cpu",
                        "--data-root", str(omniglot_root)])
    assert stop.value.code == 143  # the shell's status for SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted: 1 of 2 class counts finished"
    assert signal.getsignal(signal.SIGTERM) is handler  # eval's own handler is gone again


def test_an_existing_out_goes_on_only_with_resume_and_the_same_flags(checkpoint, tmp_path):
    out = tmp_path / "r.json"
    common = ["-m", checkpoint, "-c", 3, "-l", 0.002, "-d", "cpu", "--data-root", tmp_path / "nowhere"]
    args = eval_omni.parse_args(list(map(str, common)))
    stopped = eval_omni.settings(args, eval_omni.learning_rates(args))
    out.write_text(json.dumps({**stopped, "runs": [], "summary": []}))
    assert_one_line_error(eval_cli(*common, "--out", out), "already holds results", "--resume")
    assert_one_line_error(eval_cli(*common, "-r", 3, "--out", out, "--resume"), "other reported_runs",
                          "flags it was started with")
    assert_one_line_error(eval_cli(*common, "--resume"), "--resume", "give --out")
    out.write_text(json.dumps({"runs": [], "summary": []}))
    assert_one_line_error(eval_cli(*common, "--out", out, "--resume"), "does not record the settings")
    out.write_text("[1, 2]")
    assert_one_line_error(eval_cli(*common, "--out", out, "--resume"), "is not an evaluation's JSON")
    assert out.read_text() == "[1, 2]"


def test_rates_chosen_for_a_model_are_its_default(checkpoint, omniglot_root, tmp_path):
    model = tmp_path / checkpoint.name
    shutil.copy(checkpoint, model)
    common = ["-m", model, "-r", 1, "-d", "cpu", "--data-root", omniglot_root]
    sweep = eval_cli(*common, "-c", 3, "-l", 0.0005, 0.02, "--select-runs", 2, "--save-rates")
    assert sweep.returncode == 0, sweep.stderr
    assert "best-of-sweep" in sweep.stdout
    chosen = json.loads(model.with_suffix(".json").read_text())["classes"]["3"]
    assert chosen["lr"] in (0.0005, 0.02) and set(chosen["selection_test"]) == {"0.0005", "0.02"}
    again = eval_cli(*common, "-c", 3, 5, "--out", tmp_path / "r.json")
    assert again.returncode == 0, again.stderr
    assert "rates chosen for this model" in again.stderr
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert {r["lr"] for r in runs if r["classes"] == 3} == {chosen["lr"]}
    assert {r["lr"] for r in runs if r["classes"] == 5} == {0.001}  # no rate chosen for 5 classes: the published


def test_the_shipped_model_brings_its_chosen_rates():
    """python eval_omni.py with no flags evaluates at the rates chosen for the shipped model, not the published."""
    lrs = eval_omni.learning_rates(eval_omni.parse_args([]))
    assert lrs == {10: [0.003], 50: [0.0012], 75: [0.0008], 100: [0.001], 200: [0.0008], 300: [0.0008],
                   400: [0.001], 600: [0.001]}
