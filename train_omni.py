"""Meta-train an ANML on Omniglot's background set: python train_omni.py [flags]."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

import anml
import runtime
import workers
from anml import RunConfig, RunState
from datasets import DataNotFoundError, find_root, load_split

RECIPE = RunConfig()  # the defaults


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    # Run settings default to None so that --resume can tell a flag given from a flag left out.
    p.add_argument("--rln", type=int, help=f"RLN channels (default {RECIPE.rln})")
    p.add_argument("--nm", type=int, help=f"NM channels (default {RECIPE.nm})")
    p.add_argument("--mask", type=int, help=f"gate size, 9 x RLN channels (default {RECIPE.mask})")
    p.add_argument("--epochs", type=int, help=f"meta-training iterations (default {RECIPE.epochs})")
    p.add_argument("--inner-lr", type=float, help=f"inner-loop SGD learning rate (default {RECIPE.inner_lr})")
    p.add_argument("--outer-lr", type=float, help=f"outer Adam learning rate (default {RECIPE.outer_lr})")
    p.add_argument("--outer-lr-schedule", choices=["constant", "cosine"],
                   help="outer rate constant, or cosine-decayed from --outer-lr to 0 over --epochs (default constant)")
    p.add_argument("--conv-init", choices=["default", "kaiming"],
                   help="conv weights of RLN and NM: PyTorch's default init, or Kaiming-normal (default default)")
    p.add_argument("--seed", type=int, help=f"seed for torch, numpy and random (default {RECIPE.seed})")
    p.add_argument("--save-every", type=int, help=f"checkpoint every N iterations (default {RECIPE.save_every})")
    p.add_argument("--log-every", type=int, help=f"log every N iterations (default {RECIPE.log_every})")
    p.add_argument("-d", "--device", choices=["cpu", "cuda"], help="default: cuda where available, else cpu")
    p.add_argument("--data-root", type=Path, help="folder holding omniglot-py/ (default $OMNIGLOT_ROOT, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never download Omniglot; fail if it is absent")
    p.add_argument("--out-dir", type=Path, default=Path("runs"), help="where checkpoints and the log go (default runs/)")
    p.add_argument("--resume", type=Path, metavar="CHECKPOINT",
                   help="continue the run saved as CHECKPOINT (its .state.pth must sit beside it)")
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, saved: RunConfig | None) -> RunConfig:
    """The flags given, over the resumed run's config (or the defaults); a resumed run keeps its recipe."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if getattr(args, f.name) is not None}
    if saved is None:
        return RunConfig(**given)
    # The cosine schedule is drawn over the run's length: a longer run would change the rates already used.
    extendable = {"epochs"} if saved.outer_lr_schedule == "constant" else set()
    for key, value in given.items():
        if key not in extendable and value != getattr(saved, key):
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} {value} differs from the resumed run's {getattr(saved, key)}; "
                             f"drop {flag} to resume it")
    return dataclasses.replace(saved, **given)


def check_new_out_dir(out_dir: Path) -> None:
    """A new run must not overwrite another run's log and checkpoints (the shipped model's, for one)."""
    if (out_dir / "training_log.csv").exists():
        raise ValueError(f"{out_dir} already holds a run (training_log.csv); continue it with --resume CHECKPOINT, "
                         f"or start a new run with another --out-dir")


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
    iterations = np.arange(config.epochs)
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


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    state = None
    try:
        if not args.resume:  # before torchrun's rendezvous, so that no worker can have begun the log yet
            check_new_out_dir(args.out_dir)
        device = runtime.resolve_device(args.device)
        if dist.is_torchelastic_launched():
            device = workers.join(device)
        data = load_split(find_root(args.data_root, download=not args.no_download), "images_background").to(device)
        if args.resume:
            resumed = RunState.resume(args.resume, device)
            state = dataclasses.replace(resumed, config=run_config(args, resumed.config))
            logging.info("resuming %s at iteration %d", args.resume, state.iteration)
        else:
            state = RunState.fresh(run_config(args, None), device)
        runtime.keep_freed_memory()
        if workers.world_size() > 1:
            logging.info("meta-batch of %d tasks, one per worker", workers.world_size())
        last = anml.train(state, data, args.out_dir)
    except DataNotFoundError as err:
        sys.exit(f"error: {err}; point --data-root or OMNIGLOT_ROOT at the folder holding omniglot-py/"
                 + (", or drop --no-download to fetch it" if args.no_download else ""))
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt as stop:
        sys.exit(f"interrupted: {stop}")
    finally:
        if state is not None and workers.rank() == 0 and (args.out_dir / "training_log.csv").is_file():
            plot_training_log(args.out_dir, state.config)
        if dist.is_initialized():
            dist.destroy_process_group()
    logging.info("done: %s", last)


if __name__ == "__main__":
    main()
