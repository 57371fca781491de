"""Meta-train an ANML on Omniglot's background set, or a treatment it is compared with (SANML, OML, Pretrain &
Transfer): python train_omni.py [flags]."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

import anml
import checkpoints
import runtime
import workers
from anml import RunConfig, RunState
from datasets import find_root, load_split
from model import MODELS

DEFAULTS = RunConfig()
# The flags that mean nothing for a treatment, each with why.
MEANINGLESS = {"anml": {"batch_size": "only pretrain trains on batches"},
               "sanml": {"nm": "an SANML has no NM", "mask": "an SANML has no NM", "batch_size": "it meta-trains"},
               "oml": {"nm": "OML has no NM", "mask": "OML has no NM", "batch_size": "it meta-trains",
                       "conv_init": "OML's convs are Kaiming-initialised already"},
               "pretrain": {"inner_lr": "pre-training has no inner loop"}}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    # Run settings default to None so that --resume can tell a flag given from a flag left out.
    p.add_argument("--treatment", choices=list(MODELS),
                   help="anml; sanml: ANML without its NM; oml: OML's network, its PLN adapted in the inner loop; "
                   "pretrain: an ANML trained on i.i.d. batches (default anml)")
    p.add_argument("--rln", type=int, help=f"RLN channels (default {DEFAULTS.rln})")
    p.add_argument("--nm", type=int, help=f"NM channels (default {DEFAULTS.nm})")
    p.add_argument("--mask", type=int, help="gate size, 9 x RLN channels (default 9 x --rln)")
    p.add_argument("--epochs", type=int, help=f"iterations (default {DEFAULTS.epochs}; pretrain: as many batches as "
                   "see the drawings of 30,000 meta-training iterations)")
    p.add_argument("--inner-lr", "--inner_lr", type=float,
                   help=f"inner-loop SGD learning rate (default {DEFAULTS.inner_lr})")
    p.add_argument("--outer-lr", "--outer_lr", type=float,
                   help=f"outer Adam learning rate (default {DEFAULTS.outer_lr})")
    p.add_argument("--batch-size", type=int, help=f"pretrain: drawings per batch (default {DEFAULTS.batch_size})")
    p.add_argument("--outer-lr-schedule", choices=["constant", "cosine"],
                   help="outer rate constant, or cosine-decayed from --outer-lr to 0 over --epochs (default constant)")
    p.add_argument("--conv-init", choices=["default", "kaiming"],
                   help="conv weights of RLN and NM: PyTorch's default init, or Kaiming-normal (default default)")
    p.add_argument("--seed", type=int, nargs="+", help=f"seed for torch, numpy and random (default {DEFAULTS.seed}); "
                   "several: as many runs, trained together (one process, on CUDA a stream each), in OUT_DIR/seed_S")
    p.add_argument("--save-every", type=int, help=f"checkpoint every N iterations (default {DEFAULTS.save_every})")
    p.add_argument("--log-every", type=int, help=f"log every N iterations (default {DEFAULTS.log_every})")
    p.add_argument("--keep-states", type=int, help="keep the resumable state of the newest N checkpoints only, "
                   f"the weights of all (default {DEFAULTS.keep_states})")
    p.add_argument("-d", "--device", choices=["cpu", "cuda"], help="default: cuda where available, else cpu")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on CUDA, run each iteration eagerly instead of replaying it as one CUDA graph")
    p.add_argument("--data-root", type=Path, help="folder holding omniglot-py/ (default $OMNIGLOT_ROOT, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never download Omniglot; fail if it is absent")
    p.add_argument("--out-dir", type=Path, help="where checkpoints and the log go (default runs/, or the resumed "
                   "checkpoint's folder)")
    p.add_argument("--resume", type=Path, nargs="+", metavar="CHECKPOINT",
                   help="continue the run saved as CHECKPOINT (its .state.pth must sit beside it), or a run's folder: "
                   "from its newest checkpoint that has one; several: those runs, trained together, each in its folder")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def run_config(args: argparse.Namespace, saved: RunConfig | None, start: int = 0, seed: int | None = None) -> RunConfig:
    """The flags given, over the resumed run's config (or the defaults); a resumed run keeps its recipe and may
    change only how it is kept (and its length, under the constant rate). `start`: the resumed run's next
    iteration; `seed`: which of the seeds given is this run's (the first, unless given)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if getattr(args, f.name) is not None}
    if args.seed is not None:
        given["seed"] = args.seed[0] if seed is None else seed
    if saved is None:
        return RunConfig(**given)
    # The cosine schedule is drawn over the run's length: a longer run would change the rates already used.
    changeable = {"save_every", "log_every", "keep_states"}
    if saved.outer_lr_schedule == "constant":
        changeable.add("epochs")
    for key, value in given.items():
        if key not in changeable and value != getattr(saved, key):
            raise ValueError(f"{flag(key)} {value} differs from the resumed run's {getattr(saved, key)}; "
                             f"drop {flag(key)} to resume it")
    config = dataclasses.replace(saved, **given)
    if config.epochs <= start:
        raise ValueError(f"the resumed run has done {start} of its {config.epochs} iterations; give --epochs above "
                         f"{start} to go on")
    return config


def out_dirs(args: argparse.Namespace) -> list[Path]:
    """Each run's folder: --out-dir (default runs/, or the resumed checkpoint's folder), OUT_DIR/seed_S for each of
    several seeds, each resumed run's own folder."""
    if args.resume:
        if len(args.resume) > 1 and args.out_dir is not None:
            raise ValueError("several runs resumed together go on each in its own folder; drop --out-dir")
        return [args.out_dir or checkpoint.parent for checkpoint in args.resume]
    out_dir = args.out_dir or Path("runs")
    if args.seed is not None and len(args.seed) > 1:
        return [out_dir / f"seed_{seed}" for seed in args.seed]
    return [out_dir]


def check_args(args: argparse.Namespace, dirs: list[Path]) -> None:
    """Refuse bad flags before any work; a new run must not overwrite another run's log and checkpoints (the
    shipped model's, for one)."""
    for key in ("rln", "nm", "mask", "epochs", "batch_size", "save_every", "log_every", "keep_states"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ValueError(f"{flag(key)} {getattr(args, key)} must be at least 1")
    for key, why in MEANINGLESS.get(args.treatment or "anml", {}).items():
        if getattr(args, key) is not None:
            raise ValueError(f"{flag(key)} means nothing with --treatment {args.treatment or 'anml'}: {why}; drop "
                             f"{flag(key)}")
    for seed in args.seed or []:
        if not 0 <= seed < 2**32:
            raise ValueError(f"--seed {seed} is outside 0..{2**32 - 1}, the seeds numpy accepts")
    if args.seed is not None and len(set(args.seed)) < len(args.seed):
        raise ValueError(f"--seed {' '.join(map(str, args.seed))} repeats a seed; give each run its own")
    if args.resume and args.seed is not None and len(args.seed) > 1:
        raise ValueError("several seeds start new runs; a resumed run keeps its seed: drop --seed")
    if len({d.resolve() for d in dirs}) < len(dirs):
        raise ValueError("two of the runs would share a folder: resume each run once")
    if len(dirs) > 1 and dist.is_torchelastic_launched():
        raise ValueError("under torchrun the workers train one run together; train several runs without torchrun")
    if args.outer_lr is not None and not 0 < args.outer_lr < math.inf:
        raise ValueError(f"--outer-lr {args.outer_lr} is not a positive finite learning rate; the outer step would "
                         "not learn")
    if args.inner_lr is not None and not 0 <= args.inner_lr < math.inf:
        raise ValueError(f"--inner-lr {args.inner_lr} is not a finite learning rate; give 0 (no inner learning) or "
                         "more")
    for out_dir in dirs:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out-dir {out_dir} is a file, not a folder; give another --out-dir")
        checkpoints.check_writable(out_dir, "--out-dir", out_dir)
        if not args.resume and (out_dir / "training_log.csv").exists():
            if any(checkpoints.parse_checkpoint_name(p) for p in out_dir.glob("*.pth")):
                raise ValueError(f"{out_dir} already holds a run (training_log.csv); continue it with --resume "
                                 "CHECKPOINT, or start a new run with another --out-dir")
            logging.info("%s holds no checkpoint, only the log of a run stopped before its first save: a new run "
                         "starts there in its place", out_dir)


def plot_training_log(out_dir: Path, config: RunConfig) -> Path | None:
    """Draw OUT_DIR/training_log.csv as OUT_DIR/training_curve.png: outer loss, accuracy and rate per iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = np.loadtxt(out_dir / "training_log.csv", delimiter=",", skiprows=1, ndmin=2)
    if not len(log):
        return None
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(3, 1, sharex=True, figsize=(7, 6.5),
                                                 gridspec_kw={"height_ratios": [2, 2, 1]})
    for ax, column, label in ((loss_ax, 1, "outer loss"), (acc_ax, 2, "outer accuracy")):
        ax.plot(log[:, 0] + 1, log[:, column], lw=0.5, alpha=0.4)
        window = min(20, len(log))  # a centred running mean shows the trend through the per-task noise
        smooth = np.convolve(log[:, column], np.ones(window) / window, "valid")
        ax.plot(log[window // 2:window // 2 + len(smooth), 0] + 1, smooth, lw=1.5)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    iterations = np.arange(int(log[-1, 0]) + 1)  # the iterations run so far
    lr_ax.plot(iterations + 1, [anml.get_lr(it, config) for it in iterations], lw=1.5)
    lr_ax.set_ylabel("outer lr")
    lr_ax.set_ylim(bottom=0)
    lr_ax.grid(alpha=0.3)
    lr_ax.set_xlabel("meta-training iteration")
    fig.tight_layout()
    path = out_dir / "training_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def resume_command(args: argparse.Namespace, saved: list[Path]) -> str:
    """The command line that continues these runs from their checkpoints `saved`, as the user started them."""
    words = [sys.argv[0] if sys.argv[0].endswith("train_omni.py") else "train_omni.py", "--resume", *map(str, saved)]
    if args.data_root:
        words += ["--data-root", str(args.data_root)]
    if args.no_download:
        words.append("--no-download")
    if args.device:
        words += ["-d", args.device]
    return " ".join(["python", *map(shlex.quote, words)])


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    states, starts, dirs = [], [], []
    finished = False
    try:
        if args.resume:
            args.resume = [checkpoints.newest_resumable(c) if c.is_dir() else c for c in args.resume]
        dirs = out_dirs(args)
        check_args(args, dirs)  # before torchrun's rendezvous, so that no worker can have begun a log yet
        # Before CUDA starts: graphs on several streams hang with cuBLAS workspaces (benchmarks/README.md).
        if len(dirs) > 1:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":0:0")
        device = runtime.set_up(args.device)
        if dist.is_torchelastic_launched():
            device = workers.join(device)
        data = load_split(find_root(args.data_root, download=not args.no_download), "images_background").to(device)
        for checkpoint in args.resume or []:
            resumed = RunState.resume(checkpoint, device)
            states.append(dataclasses.replace(resumed, config=run_config(args, resumed.config, resumed.iteration)))
            logging.info("resuming %s at iteration %d", checkpoint, resumed.iteration)
        if not args.resume:
            states = [RunState.fresh(run_config(args, None, seed=seed), device) for seed in args.seed or [None]]
        starts = [state.iteration for state in states]
        if workers.world_size() > 1:
            logging.info("meta-batch of %d tasks, one per worker", workers.world_size())
        if len(states) > 1:
            logging.info("%d runs together: %s", len(states), ", ".join(map(str, dirs)))
        last = anml.train_together(states, data, dirs, graphed=device.type == "cuda" and not args.no_cuda_graph)
        finished = True
    except (OSError, ValueError, anml.Diverged) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt as err:  # exits 130 for Ctrl-C, 143 for SIGTERM, as the shell counts a signal's stop
        if len(states) < len(dirs) or [state.iteration for state in states] == starts:
            print("interrupted before the first iteration; nothing new was saved", file=sys.stderr)
        else:
            print(f"interrupted after iteration {', '.join(str(state.iteration - 1) for state in states)}; resume "
                  f"with: {resume_command(args, [s.checkpoint(d) for s, d in zip(states, dirs)])}", file=sys.stderr)
        sys.exit(runtime.stop_status(err))
    finally:
        # Only where this process trained: not over the folder of a run that another process holds.
        curves = [plot_training_log(out_dir, state.config) if workers.rank() == 0 and state.iteration > start else None
                  for state, start, out_dir in zip(states, starts, dirs)]
        workers.leave(together=finished)
    for checkpoint, out_dir, curve in zip(last, dirs, curves):
        logging.info("done: %s, log %s, curve %s", checkpoint, out_dir / "training_log.csv", curve)


if __name__ == "__main__":
    main()
