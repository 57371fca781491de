"""How well a meta-training checkpoint's own fc rows recognise the background classes, by how long before it the
lobotomy last re-drew each class's row: what the outer loss of a run measures beside the RLN's transfer.

    OMNIGLOT_ROOT=../shared/omniglot python tools/lobotomy_age.py ~/anml_runs/B_outer_lr_0.003_cosine 24999

It replays the run's task draws and lobotomies from its seed (training's own meta_iteration, without the meta-step)
to learn when each row was last re-drawn and what it was re-drawn to, then classifies every background drawing with
the checkpoint's weights as they are (no inner loop). The replay is checked against the checkpoint: the row re-drawn
at its last iteration must still be that draw but for one outer step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoints  # noqa: E402
from anml import RunConfig, RunState, meta_iteration  # noqa: E402
from datasets import Omniglot, find_root, load_split  # noqa: E402
from model import ANML  # noqa: E402

AGES = [0, 250, 500, 1000, 2000, 5000]


def run_config(run: Path) -> RunConfig:
    """The recipe of the run trained into folder `run`, from its newest state file."""
    _, saved = checkpoints.load_run(checkpoints.newest_resumable(run), torch.device("cpu"))
    if len(saved["rng"]) != 1:
        raise ValueError(f"{run} was trained by {len(saved['rng'])} torchrun workers; only a single-process run's "
                         "draws can be replayed")
    return RunConfig(**saved["settings"])


def checkpoint_path(run: Path, config: RunConfig, iteration: int) -> Path:
    return run / checkpoints.checkpoint_name(config.treatment, config.sizes, iteration)


def redraws(config: RunConfig, data: Omniglot, iteration: int) -> tuple[np.ndarray, torch.Tensor]:
    """Replays iterations 0 to `iteration` of the run of `config`: the iteration at which each class's fc row was
    last re-drawn (-1 if never) and the row it was re-drawn to then."""
    model = RunState.fresh(config, torch.device("cpu")).model
    last = np.full(data.n_classes, -1)
    rows = torch.zeros(data.n_classes, model.fc.weight.shape[1])
    def record(traj_ims, traj_labels, *remember):  # in place of the meta-step: the task's class, just re-drawn
        cls = int(traj_labels[0])
        last[cls], rows[cls] = it, model.fc.weight[cls].detach()

    for it in range(iteration + 1):
        meta_iteration(model, data, record)
    return last, rows


@torch.no_grad()
def moved(old: ANML, new: ANML) -> dict[str, float]:
    """How far the NM's and the RLN's parameters moved from `old` to `new`, relative to their size in `old`."""
    change = {}
    for part in ("rln", "nm"):
        before, after = (parameters_to_vector(getattr(net, part).parameters()) for net in (old, new))
        change[part] = float((after - before).norm() / before.norm())
    return change


@torch.no_grad()
def direct_accuracy(model: ANML, data: Omniglot) -> np.ndarray:
    """Each background class's accuracy under the model's own weights, over all its drawings."""
    correct = torch.cat([model(ims).argmax(1) == labels
                         for ims, labels in map(data.batch, torch.arange(len(data.labels)).split(500))])
    return (torch.bincount(data.labels, correct.double()) / torch.bincount(data.labels)).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a meta-training run's folder (it holds a resumable checkpoint)")
    p.add_argument("iteration", type=int, help="the iteration of the checkpoint to look at")
    p.add_argument("--data-root", help="Omniglot's folder (default: $OMNIGLOT_ROOT, else data/)")
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        config = run_config(args.run)
        model = checkpoints.load_model(checkpoint_path(args.run, config, args.iteration))
        data = load_split(find_root(args.data_root, download=False), "images_background")
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    earlier = checkpoint_path(args.run, config, args.iteration - 1000)
    if earlier.is_file():  # the RLN's and NM's own pace, for comparison
        print(f"moved over the 1,000 iterations to {args.iteration}, relative to their size: " +
              ", ".join(f"{part} {d:.3f}" for part, d in moved(checkpoints.load_model(earlier), model).items()))
    last, rows = redraws(config, data, args.iteration)
    weight = model.fc.weight.detach()[:data.n_classes]
    newest = int(last.argmax())
    off = float((weight[newest] - rows[newest]).abs().max())
    if off > 10 * config.outer_lr:  # one Adam step moves an entry by about the rate; another draw, by 0.1 or more
        sys.exit(f"error: the replay re-drew class {newest}'s row at {args.iteration}, but the checkpoint's is "
                 f"{off:.2g} from that draw: this run drew its tasks otherwise (other code?), so its rows' ages cannot "
                 "be told")
    print(f"replay check: class {newest}'s row, re-drawn at {args.iteration}, is its draw within {off:.2g} (one step)")
    acc = direct_accuracy(model, data)
    distance = (weight - rows).norm(dim=1).numpy()
    age = args.iteration - last
    print(f"{args.run.name} at {args.iteration}: accuracy of its own weights over the background set {acc.mean():.3f}")
    print("re-drawn (iterations before) | classes | accuracy | distance of the row from its draw")
    for lo, hi in zip(AGES, AGES[1:] + [args.iteration + 1]):
        sel = (last >= 0) & (age >= lo) & (age < hi)
        if sel.any():
            print(f"{lo:>6} to {hi:<6} | {sel.sum():4d} | {acc[sel].mean():.3f} | {distance[sel].mean():.2f}")
    if (last < 0).any():
        print(f"never re-drawn | {(last < 0).sum():4d} | {acc[last < 0].mean():.3f} |")


if __name__ == "__main__":
    main()
