"""Compare two meta-test evaluations (eval_omni.py --out FILE.json) class count by class count, as the ANML paper
compares treatments: the two-sided Mann-Whitney U test on the reported runs' test accuracies at each one's chosen rate.

    python compare_omni.py trained_anmls/evaluation_results.json other.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("evaluations", type=Path, nargs=2, metavar="FILE.json", help="two evaluations' JSON: A, then B")
    return p.parse_args(argv)


def read_evaluation(path: Path) -> dict:
    """An evaluation's JSON, refused in one line where it is not one."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file; give the --out FILE.json of an eval_omni.py run")
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = None
    if not isinstance(results, dict) or not {"model", "runs", "summary"} <= results.keys():
        raise ValueError(f"{path} is not an evaluation's JSON (eval_omni.py --out writes one); give another")
    return results


def reported_accuracies(results: dict) -> dict[int, tuple[float, list[float]]]:
    """Per class count finished: the rate chosen for it and its reported runs' test accuracies at that rate."""
    return {s["classes"]: (s["lr"], [r["test_accuracy"] for r in results["runs"]
                                      if (r["classes"], r["lr"], r["purpose"]) == (s["classes"], s["lr"], "report")])
            for s in results["summary"]}


def compare(a: dict, b: dict) -> list[dict]:
    """Per class count that both evaluations finished: each one's rate, mean and runs, B - A, Mann-Whitney's U (of A)
    and its two-sided p-value."""
    ours, theirs = reported_accuracies(a), reported_accuracies(b)
    rows = []
    for n in sorted(ours.keys() & theirs.keys()):
        (lr_a, runs_a), (lr_b, runs_b) = ours[n], theirs[n]
        test = mannwhitneyu(runs_a, runs_b, alternative="two-sided")
        rows.append({"classes": n, "lr_a": lr_a, "lr_b": lr_b, "mean_a": float(np.mean(runs_a)),
                     "mean_b": float(np.mean(runs_b)), "difference": float(np.mean(runs_b) - np.mean(runs_a)),
                     "u": float(test.statistic), "p": float(test.pvalue), "runs_a": len(runs_a), "runs_b": len(runs_b)})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'classes':>7}  {'A (lr)':>17}  {'B (lr)':>17}  {'B - A':>7}  {'U':>6}  {'p':>7}  {'runs':>7}"]
    for r in rows:
        a, b = (f"{r['mean_' + side]:.4f} ({r['lr_' + side]:g})" for side in "ab")
        runs = f"{r['runs_a']}/{r['runs_b']}"
        lines.append(f"{r['classes']:>7}  {a:>17}  {b:>17}  {r['difference']:>+7.4f}  {r['u']:>6.1f}  {r['p']:>7.4f}  "
                     f"{runs:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        a, b = (read_evaluation(path) for path in args.evaluations)
        rows = compare(a, b)
        if not rows:
            raise ValueError(f"{args.evaluations[0]} and {args.evaluations[1]} finished no class count in common; "
                             "compare evaluations of the same class counts")
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(f"A: {args.evaluations[0]} ({a['model']})\nB: {args.evaluations[1]} ({b['model']})")
    print("test accuracy of the reported runs at each one's chosen rate; U: Mann-Whitney's, of A; p: two-sided")
    print(table(rows))


if __name__ == "__main__":
    main()
