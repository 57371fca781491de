"""Meta-test a trained ANML on Omniglot's evaluation set:
python eval_omni.py --model trained_anmls/256_112_2304_ANML-29999.pth --classes 10 --lr 0.00085 --runs 10"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

import meta_test
import runtime
from checkpoints import load_anml, parse_checkpoint_name
from datasets import DataNotFoundError, find_root, load_split

SHIPPED_MODEL = Path("trained_anmls/256_112_2304_ANML-29999.pth")
# The published table (test accuracy, 10 runs, the 30,000-iteration model) and its learning rates.
PUBLISHED = {10: 0.90, 50: 0.89, 75: 0.86, 100: 0.85, 200: 0.80, 300: 0.76, 400: 0.72, 600: 0.65}
N_EVAL_CLASSES = 659


def published_lr(n_classes: int) -> float:
    return 0.001 if n_classes <= 100 else 0.0008


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", type=Path, default=SHIPPED_MODEL, help=f"checkpoint (default {SHIPPED_MODEL})")
    p.add_argument("-c", "--classes", type=int, nargs="+", default=list(PUBLISHED),
                   help="class counts (default: the published ones, 10 ... 600)")
    p.add_argument("-l", "--lr", type=float, nargs="+",
                   help="Adam learning rates to sweep (default: the published rate, 0.001 up to 100 classes, else 0.0008)")
    p.add_argument("-r", "--runs", type=int, default=10, help="reported runs per class count and rate (default 10)")
    p.add_argument("--select-runs", type=int, default=5,
                   help="runs per class count and rate that choose the rate, apart from the reported ones (default 5)")
    p.add_argument("-t", "--train-examples", type=int, default=15, help="training drawings per class (default 15)")
    p.add_argument("-d", "--device", choices=["cpu", "cuda"], help="default: cuda where available, else cpu")
    p.add_argument("--data-root", type=Path, help="folder holding omniglot-py/ (default $OMNIGLOT_ROOT, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never download Omniglot; fail if it is absent")
    p.add_argument("--seed", type=int, default=0, help="seed of every run's classes, splits and fc init (default 0)")
    p.add_argument("--out", type=Path, metavar="FILE.json", help="write every run and the summary as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="plot test accuracy against classes")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad input before any work starts."""
    for n in args.classes:
        if not 1 <= n <= N_EVAL_CLASSES:
            raise ValueError(f"--classes {n} is outside 1..{N_EVAL_CLASSES}, the classes of the evaluation set")
    if not 1 <= args.train_examples <= 19:
        raise ValueError(f"--train-examples {args.train_examples} is outside 1..19 (each class has 20 drawings)")
    for lr in args.lr or []:
        if not lr > 0:
            raise ValueError(f"--lr {lr} is not a positive learning rate")
    if args.runs < 1 or args.select_runs < 1:
        raise ValueError("--runs and --select-runs must be at least 1")
    parse_checkpoint_name(args.model)
    if not args.model.is_file():
        raise FileNotFoundError(f"{args.model}: no such checkpoint; check the path")
    cxx = os.environ.get("CXX", "g++")  # where torch.compile looks for the compiler of its CPU kernels
    if runtime.resolve_device(args.device).type == "cpu" and shutil.which(cxx) is None:
        raise FileNotFoundError(f"meta-testing on the CPU compiles its Adam step with torch.compile, which needs a "
                                f"C++ compiler, and {cxx} is not there: install g++ or set CXX to one")


def run_seed(seed: int, purpose: str, n_classes: int, run: int) -> int:
    """A run's seed: the same for every learning rate (paired comparison), apart for selection and report."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}/{n_classes}/{run}".encode()).digest()[:7], "big")


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def evaluate(args: argparse.Namespace) -> dict:
    """Every run of the sweep, and per class count the chosen rate and its figures."""
    device = runtime.resolve_device(args.device)
    runtime.keep_freed_memory()
    model = load_anml(args.model, device).eval()
    data = load_split(find_root(args.data_root, download=not args.no_download), "images_evaluation")
    features = meta_test.cached_features(args.model, model, data)
    lrs = {n: args.lr or [published_lr(n)] for n in args.classes}
    plan = [(n, lr, purpose, count) for n in args.classes for lr in lrs[n]
            for purpose, count in (("select", args.select_runs if len(lrs[n]) > 1 else 0), ("report", args.runs))
            if count]
    runs = []
    with tqdm(total=sum(count for *_, count in plan), desc="meta-test runs") as progress:
        for n, lr, purpose, count in plan:
            seeds = [run_seed(args.seed, purpose, n, run) for run in range(count)]
            result = meta_test.meta_test_runs(model, features, data, n, lr, seeds, args.train_examples)
            for run, (seed, test, train) in enumerate(zip(seeds, result.test_accuracy.tolist(),
                                                          result.train_accuracy.tolist())):
                runs.append({"classes": n, "lr": lr, "purpose": purpose, "run": run, "seed": seed,
                             "test_accuracy": test, "train_accuracy": train})
            progress.update(count)
    return {"model": str(args.model), "train_examples": args.train_examples, "seed": args.seed,
            "runs": runs, "summary": summarise(runs, lrs)}


def summarise(runs: list[dict], lrs: dict[int, list[float]]) -> list[dict]:
    def figures(n, lr, purpose, key):
        return mean_std([r[key] for r in runs if (r["classes"], r["lr"], r["purpose"]) == (n, lr, purpose)])

    summary = []
    for n, rates in lrs.items():
        chosen = max(rates, key=lambda lr: figures(n, lr, "select", "test_accuracy")[0]) if len(rates) > 1 else rates[0]
        best = max(rates, key=lambda lr: figures(n, lr, "report", "test_accuracy")[0])
        summary.append({"classes": n, "lr": chosen, "chosen_on": "selection runs" if len(rates) > 1 else "given",
                        "test": figures(n, chosen, "report", "test_accuracy"),
                        "train": figures(n, chosen, "report", "train_accuracy"),
                        "best_of_sweep": {"lr": best, "test": figures(n, best, "report", "test_accuracy")},
                        "published": PUBLISHED.get(n)})
    return summary


def report(results: dict) -> str:
    lines = []
    for n, lr in dict.fromkeys((r["classes"], r["lr"]) for r in results["runs"] if r["purpose"] == "report"):
        chosen = [r for r in results["runs"] if (r["classes"], r["lr"], r["purpose"]) == (n, lr, "report")]
        test, train = mean_std([r["test_accuracy"] for r in chosen]), mean_std([r["train_accuracy"] for r in chosen])
        lines.append(f"Classes {n} Accuracy {test[0]:.4f} (std {test[1]:.4f})  "
                     f"Train accuracy {train[0]:.4f} (std {train[1]:.4f})  lr {lr:g}")
    lines += ["", f"{'classes':>7}  {'lr':>8}  {'test (std)':>16}  {'train (std)':>16}  "
                  f"{'best-of-sweep test (lr)':>25}  {'published':>9}"]
    for s in results["summary"]:
        best = s["best_of_sweep"]
        published = f"{s['published']:.2f}" if s["published"] else "-"
        lines.append(f"{s['classes']:>7}  {s['lr']:>8g}  {s['test'][0]:>8.4f} ({s['test'][1]:.4f})  "
                     f"{s['train'][0]:>8.4f} ({s['train'][1]:.4f})  "
                     f"{best['test'][0]:>12.4f} ({best['lr']:g})".ljust(25) + f"  {published:>9}")
    lines.append("lr: chosen on separate selection runs where several were given; best-of-sweep: the best rate "
                 "judged on the reported runs themselves (flattering, as published tables did)")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    reported = [r for r in results["runs"] if r["purpose"] == "report"]
    for lr in sorted({r["lr"] for r in reported}):
        classes = sorted({r["classes"] for r in reported if r["lr"] == lr})
        stats = np.array([mean_std([r["test_accuracy"] for r in reported if (r["classes"], r["lr"]) == (n, lr)])
                          for n in classes])
        ax.plot(classes, stats[:, 0], marker="o", label=f"lr {lr:g}")
        ax.fill_between(classes, stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1], alpha=0.2)
    ax.plot(list(PUBLISHED), list(PUBLISHED.values()), "k--", marker="x", label="published")
    ax.set(xlabel="classes learned in sequence", ylabel="meta-test test accuracy", ylim=(0, 1),
           title=Path(results["model"]).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        check_args(args)
        results = evaluate(args)
    except DataNotFoundError as err:
        sys.exit(f"error: {err}; point --data-root or OMNIGLOT_ROOT at the folder holding omniglot-py/"
                 + (", or drop --no-download to fetch it" if args.no_download else ""))
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    # Files first: a closed pipe on stdout (| head) must not lose them.
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    print(report(results))


if __name__ == "__main__":
    main()
