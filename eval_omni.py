"""Meta-test a trained ANML on Omniglot's evaluation set:
python eval_omni.py --model trained_anmls/256_112_2304_ANML-29999.pth --classes 10 --lr 0.00085 --runs 10"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import meta_test
import runtime
from checkpoints import atomic_path, check_writable, load_model, read_checkpoint_name
from datasets import find_root, load_split
from model import ANML

SHIPPED_MODEL = Path(__file__).resolve().parent / "trained_anmls" / "256_112_2304_ANML-29999.pth"
# The published table (test accuracy, 10 runs, the 30,000-iteration model) and its learning rates.
PUBLISHED = {10: 0.90, 50: 0.89, 75: 0.86, 100: 0.85, 200: 0.80, 300: 0.76, 400: 0.72, 600: 0.65}
N_EVAL_CLASSES = 659


def published_lr(n_classes: int) -> float:
    return 0.001 if n_classes <= 100 else 0.0008


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", type=Path, default=SHIPPED_MODEL,
                   help="checkpoint (default the shipped trained_anmls/256_112_2304_ANML-29999.pth), or 'scratch': "
                        "a freshly initialised ANML of the default sizes for every run, everything learning")
    p.add_argument("-c", "--classes", type=int, nargs="+", default=list(PUBLISHED),
                   help="class counts (default: the published ones, 10 ... 600)")
    p.add_argument("-l", "--lr", type=float, nargs="+",
                   help="Adam learning rates to sweep (default: the rates chosen for the model, in MODEL.json beside "
                        "it, else the published ones, 0.001 up to 100 classes, else 0.0008)")
    p.add_argument("-r", "--runs", type=int, default=10, help="reported runs per class count and rate (default 10)")
    p.add_argument("--select-runs", type=int, default=5,
                   help="runs per class count and rate that choose the rate, apart from the reported ones (default 5)")
    p.add_argument("-t", "--train-examples", type=int, default=15, help="training drawings per class (default 15)")
    p.add_argument("--order", choices=meta_test.ORDERS, default="sequential",
                   help="sequential: class after class (the continual-learning test, default); iid: the i.i.d. oracle, "
                        "the same drawings and steps in a random order")
    p.add_argument("--epochs", type=int, default=1,
                   help="passes over the training drawings (default 1): the sequence again, or a fresh shuffle")
    p.add_argument("--learn", choices=meta_test.LEARN,
                   help="what learns: fc (the paper's protocol; OML-OLFT; default), inner (what meta-training's inner "
                        "loop adapts: ANML's RLN + fc, OML's PLN) or all (everything; Scratch's, and its default)")
    p.add_argument("--record-every", type=int, default=0, metavar="K",
                   help="sequential, one epoch: also record, every K classes, the test accuracy on the classes "
                        "learned so far (default: only at the end)")
    p.add_argument("-d", "--device", choices=["cpu", "cuda"], help="default: cuda where available, else cpu")
    p.add_argument("--data-root", type=Path, help="folder holding omniglot-py/ (default $OMNIGLOT_ROOT, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never download Omniglot; fail if it is absent")
    p.add_argument("--seed", type=int, default=0, help="seed of every run's classes, splits and fc init (default 0)")
    p.add_argument("--out", type=Path, metavar="FILE.json",
                   help="write every run and the summary as JSON, as they come; never over an existing file")
    p.add_argument("--resume", action="store_true",
                   help="continue the evaluation stopped in --out FILE.json, given the same flags: the runs it "
                        "holds are kept, the rest are run")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="plot test accuracy against classes")
    p.add_argument("--plot-sequence", type=Path, metavar="FILE.png",
                   help="plot test accuracy by a class's position in the sequence, in bins of 10 classes, for each "
                        "class count's reported runs at its chosen rate")
    p.add_argument("--save-rates", action="store_true",
                   help="write the rates chosen on the selection runs beside the model (MODEL.json), for later "
                        "evaluations without --lr")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad input before any work starts; make the output files' folders."""
    for n in args.classes:
        if not 1 <= n <= N_EVAL_CLASSES:
            raise ValueError(f"--classes {n} is outside 1..{N_EVAL_CLASSES}, the classes of the evaluation set")
    if not 1 <= args.train_examples <= 19:
        raise ValueError(f"--train-examples {args.train_examples} is outside 1..19 (each class has 20 drawings)")
    for lr in args.lr or []:
        if not 0 < lr < math.inf:
            raise ValueError(f"--lr {lr} is not a positive finite learning rate")
    if args.runs < 1 or args.select_runs < 1:
        raise ValueError("--runs and --select-runs must be at least 1")
    if args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs} must be at least 1")
    if args.record_every:
        if args.record_every < 0 or args.record_every > min(args.classes):
            raise ValueError(f"--record-every {args.record_every} is outside 1..{min(args.classes)}, the smallest "
                             "--classes: record at least once in every class count")
        if args.order != "sequential" or args.epochs != 1:
            raise ValueError("--record-every records the classes learned so far along one pass of the sequence; it "
                             "means nothing with --order iid or several --epochs: drop one or the other")
    if args.resume and args.out is None:
        raise ValueError("--resume continues the evaluation in --out FILE.json; give --out")
    if args.save_rates and len(args.lr or []) < 2:
        raise ValueError("--save-rates needs several --lr to choose from")
    if is_scratch(args.model):
        if args.learn not in (None, "all"):
            raise ValueError(f"--learn {args.learn} means nothing with --model scratch, whose untrained network learns "
                             "everything (the paper's Scratch); drop --learn")
        if args.save_rates:
            raise ValueError("--save-rates writes beside a model's file, and --model scratch has none; drop it")
    elif args.model.is_dir():
        raise ValueError(f"--model {args.model} is a folder; name a checkpoint in it")
    elif not args.model.is_file():
        raise FileNotFoundError(f"{args.model}: no such checkpoint; check the path")
    else:
        read_checkpoint_name(args.model)
    for flag, path in (("--out", args.out), ("--plot", args.plot), ("--plot-sequence", args.plot_sequence)):
        if path is not None:
            if path.is_dir():
                raise ValueError(f"{flag} {path} is a folder; name a file in it")
            check_writable(path.parent, flag, path)
            path.parent.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")  # where torch.compile looks for the compiler of its CPU kernels
    if runtime.resolve_device(args.device).type == "cpu" and shutil.which(cxx) is None:
        raise FileNotFoundError(f"meta-testing on the CPU compiles its Adam step with torch.compile, which needs a "
                                f"C++ compiler, and {cxx} is not there: install g++ or set CXX to one")


def is_scratch(model: Path) -> bool:
    return str(model) == "scratch"


def learn(args: argparse.Namespace) -> str:
    """What learns at meta-test: --learn, else everything for Scratch and the fc layer for a trained model."""
    return args.learn or ("all" if is_scratch(args.model) else "fc")


def rates_path(model: Path) -> Path:
    """The file beside a model that holds the meta-test rates chosen for it."""
    return model.with_suffix(".json")


def learning_rates(args: argparse.Namespace) -> dict[int, list[float]]:
    """Per class count the rates to run: --lr, else the model's chosen rates where it has them, else the published."""
    if args.lr:
        return {n: args.lr for n in args.classes}
    chosen = {}
    if rates_path(args.model).is_file():
        chosen = {int(n): entry["lr"] for n, entry in json.loads(rates_path(args.model).read_text())["classes"].items()}
    return {n: [chosen.get(n, published_lr(n))] for n in args.classes}


def settings(args: argparse.Namespace, lrs: dict[int, list[float]]) -> dict:
    """What decides an evaluation's runs (`lrs`: learning_rates(args)), as its JSON records them: a stopped one
    resumes only under the same."""
    return {"model": str(args.model), "learn": learn(args), "train_examples": args.train_examples, "order": args.order,
            "epochs": args.epochs, "record_every": args.record_every, "seed": args.seed, "classes": args.classes,
            "rates": {str(n): rates for n, rates in lrs.items()}, "reported_runs": args.runs,
            "selection_runs": args.select_runs}


def stopped_runs(args: argparse.Namespace) -> list[dict]:
    """The runs that --resume keeps from --out (none where it does not exist yet); an existing --out without
    --resume, or one written under other settings, is refused before any work."""
    if args.out is None or not args.out.is_file():
        return []
    if not args.resume:
        raise ValueError(f"--out {args.out} already holds results; continue them with --resume, or give another --out")
    try:
        # as before these existed
        saved = {"order": "sequential", "epochs": 1, "record_every": 0, "learn": "fc",
                 **json.loads(args.out.read_text())}
        runs = saved["runs"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"--out {args.out} is not an evaluation's JSON; give another --out") from None
    ours = settings(args, learning_rates(args))
    if not ours.keys() <= saved.keys():
        raise ValueError(f"--out {args.out} does not record the settings it was evaluated with (an older version wrote "
                         "it), so it cannot be resumed; give another --out")
    differ = [key for key, value in ours.items() if key != "model" and saved[key] != value]
    if Path(saved["model"]).resolve() != args.model.resolve() and saved["model"] != str(args.model):
        differ.insert(0, "model")
    if differ:
        raise ValueError(f"--out {args.out} was evaluated with other {', '.join(differ)}; resume it with the flags it "
                         "was started with, or give another --out")
    return runs


def run_seed(seed: int, purpose: str, n_classes: int, run: int) -> int:
    """A run's seed: the same for every learning rate (paired comparison), apart for selection and report."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}/{n_classes}/{run}".encode()).digest()[:7], "big")


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def evaluate(args: argparse.Namespace, stopped: Sequence[dict] = ()) -> Iterator[dict]:
    """Every run of the sweep, class count after class count, rate after rate; after each rate's selection or reported
    runs, yields the results so far: the runs and, per class count finished, the chosen rate and its figures. The
    runs of a stopped evaluation of the same settings (`stopped`) are kept, not run again."""
    device = runtime.set_up(args.device)  # on CUDA, features as the CPU computes them: no TF32 convolutions
    model = None if is_scratch(args.model) else load_model(args.model, device).eval()
    data = load_split(find_root(args.data_root, download=not args.no_download), "images_evaluation")
    if not args.lr and rates_path(args.model).is_file():
        logging.info("rates chosen for this model on selection runs, from %s (--lr overrides)", rates_path(args.model))
    lrs = learning_rates(args)
    # Frozen features serve the fast path, where the fc layer alone learns.
    features = meta_test.cached_features(args.model, model, data) if learn(args) == "fc" else None
    plan = {n: [(lr, purpose, count) for lr in lrs[n]
                for purpose, count in (("select", args.select_runs if len(lrs[n]) > 1 else 0), ("report", args.runs))
                if count] for n in args.classes}
    results = {**settings(args, lrs), "runs": [], "summary": []}
    with tqdm(total=sum(count for groups in plan.values() for *_, count in groups), desc="meta-test runs") as progress:
        for n, groups in plan.items():
            for lr, purpose, count in groups:
                kept = [r for r in stopped if (r["classes"], r["lr"], r["purpose"]) == (n, lr, purpose)]
                if len(kept) == count:
                    results["runs"] += kept
                else:
                    results["runs"] += run_group(model, features, data, n, lr, purpose, count, args)
                progress.update(count)
                if (lr, purpose, count) == groups[-1]:
                    results["summary"].append(summarise(results["runs"], n, lrs[n]))
                yield results


def run_group(model, features, data, n: int, lr: float, purpose: str, count: int,
              args: argparse.Namespace) -> list[dict]:
    """`count` runs of one class count, rate and purpose: trained together on the frozen features where the fc layer
    alone learns, else one after another on the whole model (for Scratch, a fresh one each, drawn from its seed)."""
    seeds = [run_seed(args.seed, purpose, n, run) for run in range(count)]
    if features is not None:
        fast = meta_test.meta_test_runs(model, features, data, n, lr, seeds, args.train_examples, args.order,
                                        args.epochs, args.record_every)
        runs = zip(fast.test_accuracy.tolist(), fast.train_accuracy.tolist(), fast.test_by_class.tolist(),
                   fast.train_by_class.tolist(), fast.so_far.tolist())
    else:
        runs = []
        for seed in seeds:
            if model is None:  # Scratch: PyTorch's initialisation, from the run's seed
                torch.manual_seed(seed)
                network = ANML().to(runtime.resolve_device(args.device)).eval()
            else:
                network = copy.deepcopy(model)
            run = meta_test.plain_meta_test_run(network, data, n, lr, args.train_examples, seed, args.order,
                                                args.epochs, args.record_every, learn(args))
            runs.append((run.test_accuracy, run.train_accuracy, run.test_by_class, run.train_by_class, run.so_far))
    return [{"classes": n, "lr": lr, "purpose": purpose, "run": run, "seed": seed, "test_accuracy": test,
             "train_accuracy": train, "test_by_class": [round(a, 4) for a in test_by_class],
             "train_by_class": [round(a, 4) for a in train_by_class],
             **({"test_so_far": [round(a, 4) for a in so_far]} if args.record_every else {})}
            for run, (seed, (test, train, test_by_class, train_by_class, so_far)) in enumerate(zip(seeds, runs))]


def summarise(runs: list[dict], n: int, rates: list[float]) -> dict:
    """One class count's figures: the rate chosen on the selection runs (where several were swept) and its
    reported runs' test and train accuracy; with a sweep, also the best rate judged on the reported runs."""
    def figures(lr, purpose, key):
        return mean_std([r[key] for r in runs if (r["classes"], r["lr"], r["purpose"]) == (n, lr, purpose)])

    entry = {"classes": n, "lr": rates[0], "chosen_on": "given", "published": PUBLISHED.get(n)}
    if len(rates) > 1:
        chosen = max(rates, key=lambda lr: figures(lr, "select", "test_accuracy")[0])
        best = max(rates, key=lambda lr: figures(lr, "report", "test_accuracy")[0])
        entry.update(lr=chosen, chosen_on="selection runs",
                     selection={lr: figures(lr, "select", "test_accuracy")[0] for lr in rates},
                     best_of_sweep={"lr": best, "test": figures(best, "report", "test_accuracy")})
    entry.update(test=figures(entry["lr"], "report", "test_accuracy"),
                 train=figures(entry["lr"], "report", "train_accuracy"))
    return entry


def class_lines(results: dict, n: int) -> list[str]:
    """`Classes N Accuracy X (std Y)` for each rate's reported runs of one class count, as the reference prints."""
    lines = []
    for lr in dict.fromkeys(r["lr"] for r in results["runs"] if r["classes"] == n and r["purpose"] == "report"):
        chosen = [r for r in results["runs"] if (r["classes"], r["lr"], r["purpose"]) == (n, lr, "report")]
        test, train = mean_std([r["test_accuracy"] for r in chosen]), mean_std([r["train_accuracy"] for r in chosen])
        lines.append(f"Classes {n} Accuracy {test[0]:.4f} (std {test[1]:.4f})  "
                     f"Train accuracy {train[0]:.4f} (std {train[1]:.4f})  lr {lr:g}")
    return lines


def table(results: dict) -> str:
    """Per class count finished: the rate, test and train accuracy, the published figure; with a sweep, the
    best-of-sweep figure too."""
    swept = any("best_of_sweep" in s for s in results["summary"])
    header = f"{'classes':>7}  {'lr':>8}  {'test (std)':>16}  {'train (std)':>16}  "
    lines = [header + (f"{'best-of-sweep test (lr)':>25}  " if swept else "") + f"{'published':>9}"]
    for s in results["summary"]:
        line = (f"{s['classes']:>7}  {s['lr']:>8g}  {s['test'][0]:>8.4f} ({s['test'][1]:.4f})  "
                f"{s['train'][0]:>8.4f} ({s['train'][1]:.4f})  ")
        if swept:
            best = s.get("best_of_sweep")
            line += (f"{best['test'][0]:>12.4f} ({best['lr']:g})" if best else "-").ljust(25) + "  "
        lines.append(line + f"{s['published']:>9.2f}" if s["published"] else line + f"{'-':>9}")
    if swept:
        lines.append("lr: chosen on separate selection runs where several were given; best-of-sweep: the best rate "
                     "judged on the reported runs themselves (flattering, as published tables did)")
    return "\n".join(lines)


def save_rates(model: Path, results: dict, command: str) -> Path:
    """Write, beside the model, the rate chosen on the selection runs for each class count swept, with its figures;
    entries for other class counts already there stay."""
    path = rates_path(model)
    saved = json.loads(path.read_text())["classes"] if path.is_file() else {}
    for s in results["summary"]:
        if s["chosen_on"] == "selection runs":
            saved[str(s["classes"])] = {"lr": s["lr"], "test": s["test"], "train": s["train"],
                                        "selection_test": {f"{lr:g}": acc for lr, acc in s["selection"].items()},
                                        "command": command, "date": datetime.date.today().isoformat()}
    saved = dict(sorted(saved.items(), key=lambda item: int(item[0])))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"model": model.name, "classes": saved}, indent=1) + "\n")
    return path


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


def plot_sequence(results: dict, path: Path, bin_size: int = 10) -> None:
    """Test accuracy by position in the sequence, a line per class count (its reported runs at its chosen rate): the
    mean over runs of each bin of `bin_size` classes, with a band of one standard deviation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in results["summary"]:
        runs = np.array([r["test_by_class"] for r in results["runs"]
                         if (r["classes"], r["lr"], r["purpose"]) == (s["classes"], s["lr"], "report")])
        bins = [runs[:, i:i + bin_size].mean(1) for i in range(0, runs.shape[1], bin_size)]
        mean, std = np.array([b.mean() for b in bins]), np.array([b.std() for b in bins])
        positions = np.arange(len(bins)) * bin_size + min(bin_size, runs.shape[1]) / 2
        ax.plot(positions, mean, marker=".", label=f"{s['classes']} classes (lr {s['lr']:g})")
        ax.fill_between(positions, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel=f"position of the class in the sequence (bins of {bin_size})", ylabel="meta-test test accuracy",
           ylim=(0, 1), title=f"{Path(results['model']).name}, {results['order']}, {results['epochs']} epoch(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    results = None
    # A batch scheduler's SIGTERM stops the evaluation as Ctrl-C does: with the table so far and how to go on.
    previous_handler = signal.signal(signal.SIGTERM, runtime.raise_stopped)
    try:
        check_args(args)
        printed = 0
        for results in evaluate(args, stopped_runs(args)):
            for summary in results["summary"][printed:]:
                for line in class_lines(results, summary["classes"]):
                    tqdm.write(line)
            printed = len(results["summary"])
            if args.out:  # as the results come: a stopped evaluation keeps what it finished, and --resume goes on
                with atomic_path(args.out) as tmp:
                    tmp.write_text(json.dumps(results, indent=1))
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt as err:  # exits 130 for Ctrl-C, 143 for SIGTERM, as the shell counts a signal's stop
        if results and results["summary"]:
            print("\n" + table(results))
        print(f"interrupted: {len(results['summary']) if results else 0} of {len(args.classes)} class counts finished"
              + (f", the runs done kept in {args.out}; continue with --resume" if args.out and results else ""),
              file=sys.stderr)
        sys.exit(runtime.stop_status(err))
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if args.save_rates:
        logging.info("chosen rates written to %s", save_rates(args.model, results, shlex.join(["python", *sys.argv])))
    if args.plot:
        plot(results, args.plot)
    if args.plot_sequence:
        plot_sequence(results, args.plot_sequence)
    print("\n" + table(results))


if __name__ == "__main__":
    runtime.flush_denormals()  # first, before any parallel work: see its docstring
    main()
