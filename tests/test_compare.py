"""compare_omni.py: two evaluations' reported runs, class count by class count, with the Mann-Whitney U test."""
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

import compare_omni
from tests.conftest import REPO, assert_one_line_error

SHIPPED = REPO / "trained_anmls" / "evaluation_results.json"
PREVIOUS = REPO / "docs" / "previous_model" / "evaluation_results.json"


def test_compares_the_reported_runs_at_each_ones_chosen_rate():
    previous, shipped = (compare_omni.read_evaluation(p) for p in (PREVIOUS, SHIPPED))
    rows = compare_omni.compare(previous, shipped)
    assert [r["classes"] for r in rows] == [10, 50, 75, 100, 200, 300, 400, 600]
    row = rows[-1]
    chosen = next(s for s in shipped["summary"] if s["classes"] == 600)
    runs = [r["test_accuracy"] for r in shipped["runs"]
            if (r["classes"], r["lr"], r["purpose"]) == (600, chosen["lr"], "report")]
    assert len(runs) == row["runs_b"] == 10 and row["mean_b"] == pytest.approx(np.mean(runs))
    assert row["mean_b"] == pytest.approx(chosen["test"][0])  # the summary's own figure
    assert row["difference"] == pytest.approx(row["mean_b"] - row["mean_a"])
    assert 0 <= row["u"] <= 100 and 0 < row["p"] < 0.01  # 0.033 apart with stds under 0.01: far beyond chance


def test_an_evaluation_against_itself_differs_by_nothing():
    shipped = compare_omni.read_evaluation(SHIPPED)
    for row in compare_omni.compare(shipped, shipped):
        assert row["difference"] == 0 and row["p"] == pytest.approx(1.0)
        assert row["u"] == pytest.approx(row["runs_a"] * row["runs_b"] / 2)


def test_u_is_scipys_on_a_made_up_pair(tmp_path):
    def evaluation(accuracies):
        return {"model": "m.pth", "summary": [{"classes": 5, "lr": 0.001}],
                "runs": [{"classes": 5, "lr": 0.001, "purpose": "report", "test_accuracy": a} for a in accuracies]
                + [{"classes": 5, "lr": 0.002, "purpose": "report", "test_accuracy": 0.0}]}  # another rate: left out
    a, b = [0.5, 0.6, 0.7], [0.65, 0.8, 0.9, 0.95]
    [row] = compare_omni.compare(evaluation(a), evaluation(b))
    expected = mannwhitneyu(a, b, alternative="two-sided")
    assert (row["u"], row["p"]) == pytest.approx((expected.statistic, expected.pvalue))
    assert (row["runs_a"], row["runs_b"]) == (3, 4)


@pytest.mark.parametrize("files, words", [
    (["README.md", str(SHIPPED)], ["README.md is not an evaluation's JSON"]),
    (["nowhere.json", str(SHIPPED)], ["nowhere.json: no such file"]),
])
def test_bad_input_is_one_line(files, words):
    result = subprocess.run([sys.executable, "compare_omni.py", *files], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert_one_line_error(result, *words)


def test_no_class_count_in_common_is_one_line(tmp_path):
    shipped = json.loads(SHIPPED.read_text())
    shipped["summary"] = [s for s in shipped["summary"] if s["classes"] == 10]
    other = json.loads(SHIPPED.read_text())
    other["summary"] = [s for s in other["summary"] if s["classes"] == 600]
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, results in zip(paths, (shipped, other)):
        path.write_text(json.dumps(results))
    result = subprocess.run([sys.executable, "compare_omni.py", *map(str, paths)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert_one_line_error(result, "no class count in common")
