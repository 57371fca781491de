"""Meta-train an ANML on Omniglot's background set: python train_omni.py [flags]."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import anml
from datasets import find_root, load_split

DEFAULTS = {"rln": 256, "nm": 112, "mask": 2304, "epochs": 30000, "inner_lr": 0.1, "outer_lr": 0.003,
            "seed": 0, "save_every": 1000, "log_every": 10}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    # Run settings default to None so that --resume can tell a flag given from a flag left out.
    p.add_argument("--rln", type=int, help=f"RLN channels (default {DEFAULTS['rln']})")
    p.add_argument("--nm", type=int, help=f"NM channels (default {DEFAULTS['nm']})")
    p.add_argument("--mask", type=int, help=f"gate size, 9 x RLN channels (default {DEFAULTS['mask']})")
    p.add_argument("--epochs", type=int, help=f"meta-training iterations (default {DEFAULTS['epochs']})")
    p.add_argument("--inner-lr", type=float, help=f"inner-loop SGD learning rate (default {DEFAULTS['inner_lr']})")
    p.add_argument("--outer-lr", type=float, help=f"outer Adam learning rate (default {DEFAULTS['outer_lr']})")
    p.add_argument("--seed", type=int, help=f"seed for torch, numpy and random (default {DEFAULTS['seed']})")
    p.add_argument("--save-every", type=int, help=f"checkpoint every N iterations (default {DEFAULTS['save_every']})")
    p.add_argument("--log-every", type=int, help=f"log every N iterations (default {DEFAULTS['log_every']})")
    p.add_argument("-d", "--device", choices=["cpu", "cuda"], help="default: cuda where available, else cpu")
    p.add_argument("--data-root", type=Path, help="folder holding omniglot-py/ (default $OMNIGLOT_ROOT, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never download Omniglot; fail if it is absent")
    p.add_argument("--out-dir", type=Path, default=Path("runs"), help="where checkpoints and the log go (default runs/)")
    p.add_argument("--resume", type=Path, metavar="CHECKPOINT",
                   help="continue the run saved as CHECKPOINT (its .state.pth must sit beside it)")
    return p.parse_args(argv)


def run_settings(args: argparse.Namespace, saved: dict | None) -> dict:
    """The flags given, over the resumed run's settings (or the defaults); a resumed run keeps its recipe."""
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    if saved is None:
        return {**DEFAULTS, **given}
    for key, value in given.items():
        if key != "epochs" and value != saved[key]:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} {value} differs from the resumed run's {saved[key]}; drop {flag} to resume it")
    return {**saved, **given}


def check_new_out_dir(out_dir: Path) -> None:
    """A new run must not overwrite another run's log and checkpoints (the shipped model's, for one)."""
    if (out_dir / "training_log.csv").exists():
        raise ValueError(f"{out_dir} already holds a run (training_log.csv); continue it with --resume CHECKPOINT, "
                         f"or start a new run with another --out-dir")


def plot_training_log(out_dir: Path) -> Path | None:
    """Draw OUT_DIR/training_log.csv as OUT_DIR/training_curve.png: outer loss and accuracy per iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    log = np.loadtxt(out_dir / "training_log.csv", delimiter=",", skiprows=1, ndmin=2)
    if not len(log):
        return None
    fig, (loss_ax, acc_ax) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    for ax, column, label in ((loss_ax, 1, "outer loss"), (acc_ax, 2, "outer accuracy")):
        ax.plot(log[:, 0] + 1, log[:, column], lw=0.5, alpha=0.4)
        window = min(20, len(log))  # a centred running mean shows the trend through the per-task noise
        smooth = np.convolve(log[:, column], np.ones(window) / window, "valid")
        ax.plot(log[window // 2:window // 2 + len(smooth), 0] + 1, smooth, lw=1.5)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    acc_ax.set_xlabel("meta-training iteration")
    fig.tight_layout()
    path = out_dir / "training_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def init_distributed(device: torch.device) -> torch.device:
    """Under torchrun, join the process group (gloo on CPU, nccl on CUDA) and return this worker's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # A worker that dies makes the others' next collective fail after this long instead of waiting forever.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=5))
    if dist.get_rank() > 0:
        logging.getLogger().setLevel(logging.WARNING)
    return device


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    started = False
    try:
        if not args.resume:  # before torchrun's rendezvous, so that no worker can have begun the log yet
            check_new_out_dir(args.out_dir)
        device = anml.resolve_device(args.device)
        if dist.is_torchelastic_launched():
            device = init_distributed(device)
        data = load_split(find_root(args.data_root, download=not args.no_download), "images_background").to(device)
        if args.resume:
            model, outer_opt, start, saved = anml.load_resume(args.resume, device)
            settings = run_settings(args, saved)
            logging.info("resuming %s at iteration %d", args.resume, start)
        else:
            settings = run_settings(args, None)
            model, outer_opt = anml.new_run(settings, device)
            start = 0
        anml.keep_freed_memory()
        if anml.world_size() > 1:
            logging.info("meta-batch of %d tasks, one per worker", anml.world_size())
        started = True
        last = anml.train(model, outer_opt, data, args.out_dir, settings, start)
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt as stop:
        sys.exit(f"interrupted: {stop}")
    finally:
        if started and anml.rank() == 0 and (args.out_dir / "training_log.csv").is_file():
            plot_training_log(args.out_dir)
        if dist.is_initialized():
            dist.destroy_process_group()
    logging.info("done: %s", last)


if __name__ == "__main__":
    main()
