"""ANML: meta-training (a differentiable inner loop with `higher`, an Adam outer step) and meta-testing."""
from __future__ import annotations

import csv
import ctypes
import logging
import os
import random
import signal
from pathlib import Path

import higher
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from datasets import Omniglot, sample_meta_train
from model import ANML, Plastic, checkpoint_name, load_anml, parse_checkpoint_name

log = logging.getLogger(__name__)


def resolve_device(name: str | None) -> torch.device:
    """cuda where available unless told otherwise; asking for a missing CUDA is an error, not a fallback."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not one of cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("-d cuda was asked for, but PyTorch sees no CUDA device here; use -d cpu")
    return torch.device(name)


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of handing large blocks back to the OS.

    A meta-step allocates and frees activations of tens of MB; by default glibc maps each afresh and the
    page faults cost about a sixth of a CPU step. Elsewhere than glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap-backed blocks
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never trim the heap


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def lobotomize(model: ANML, cls: int) -> None:
    """Re-draw the fc row of one class so the network cannot have memorised it."""
    with torch.no_grad():
        nn.init.kaiming_normal_(model.fc.weight[cls].unsqueeze(0))


def meta_step(model: ANML, outer_opt: torch.optim.Optimizer,
              traj_ims: torch.Tensor, traj_labels: torch.Tensor,
              remember_ims: torch.Tensor, remember_labels: torch.Tensor,
              inner_lr: float = 0.1) -> tuple[float, float]:
    """One meta-training iteration (after the lobotomy); returns the outer loss and accuracy.

    Inner loop: one SGD step on RLN + fc per trajectory drawing, kept differentiable. Outer step: the
    adapted network's loss on trajectory + remember set, back-propagated through the inner loop into
    NM, RLN and fc, then one step of `outer_opt`.
    """
    ims = torch.cat([traj_ims, remember_ims])
    labels = torch.cat([traj_labels, remember_labels])
    # The inner loop does not update the NM, so each image's gate is the same at every step: compute it
    # once, outside the differentiable copy. Its gradient still reaches the NM through the gates, while
    # each inner step differentiates only RLN + fc, not the whole unrolled history.
    gates = model.nm(ims)
    plastic = Plastic(model)
    inner_opt = torch.optim.SGD(plastic.parameters(), lr=inner_lr)
    with higher.innerloop_ctx(plastic, inner_opt, copy_initial_weights=False) as (fplastic, diffopt):
        for i in range(len(traj_ims)):
            step = slice(i, i + 1)
            diffopt.step(F.cross_entropy(fplastic(traj_ims[step], gates[step]), traj_labels[step]))
        logits = fplastic(ims, gates)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
    outer_opt.step()
    outer_opt.zero_grad()
    return loss.item(), (logits.argmax(1) == labels).float().mean().item()


def state_path(checkpoint: Path) -> Path:
    """The optimizer/iteration/RNG file that sits beside a checkpoint."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".pth") + ".state.pth")


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)), "numpy_pos": int(numpy_state[2]),
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    random.setstate(state["python"])


def save_checkpoint(model: ANML, outer_opt: torch.optim.Optimizer, out_dir: Path, iteration: int,
                    settings: dict) -> Path:
    """The weights as a plain state_dict, and beside them what --resume needs; both written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / checkpoint_name(settings["rln"], settings["nm"], settings["mask"], iteration)
    # State first: weights without their state file cannot be resumed, a state file without weights is inert.
    _save_atomic({"iteration": iteration, "optimizer": outer_opt.state_dict(), "rng": _rng_state(),
                  "settings": settings}, state_path(path))
    _save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path


def load_resume(checkpoint: Path, device: torch.device) -> tuple[ANML, torch.optim.Optimizer, int, dict]:
    """The model, outer optimizer, next iteration and settings of a run saved by save_checkpoint.

    Restores the random-number generators too, so the run continues exactly as if it had not stopped.
    """
    checkpoint = Path(checkpoint)
    model = load_anml(checkpoint, device)
    if not state_path(checkpoint).is_file():
        raise FileNotFoundError(f"{state_path(checkpoint)} is missing: --resume needs the state file saved beside "
                                "the checkpoint; start a fresh run instead")
    state = torch.load(state_path(checkpoint), map_location="cpu", weights_only=True)
    if state["iteration"] != parse_checkpoint_name(checkpoint)[3]:
        raise ValueError(f"{state_path(checkpoint)} belongs to iteration {state['iteration']}, not to {checkpoint.name}")
    outer_opt = torch.optim.Adam(model.parameters(), lr=state["settings"]["outer_lr"])
    outer_opt.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return model, outer_opt, state["iteration"] + 1, state["settings"]


def _open_log(path: Path, start: int):
    """The CSV log, opened for appending, without the rows past `start` that a run left when it stopped unsaved."""
    rows = []
    if path.is_file():
        with path.open(newline="") as f:
            rows = [r for r in list(csv.reader(f))[1:] if int(r[0]) < start]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["iteration", "outer_loss", "outer_accuracy"], *rows])
    return path.open("a", newline="")


def train(model: ANML, outer_opt: torch.optim.Optimizer, data: Omniglot, out_dir: Path, settings: dict,
          start: int = 0) -> Path:
    """Meta-train from iteration `start` to settings["epochs"]; returns the last checkpoint.

    settings: rln, nm, mask, epochs, inner_lr, outer_lr, save_every, log_every (and seed, kept for the
    record). Ctrl-C finishes the current iteration, saves, then raises KeyboardInterrupt.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = _open_log(out_dir / "training_log.csv", start)
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    window, last = [], None
    try:
        bar = tqdm(range(start, settings["epochs"]), initial=start, total=settings["epochs"], desc="meta-train")
        for it in bar:
            traj, remember = sample_meta_train(data)
            traj_ims, traj_labels = data.batch(traj)
            remember_ims, remember_labels = data.batch(remember)
            lobotomize(model, int(traj_labels[0]))
            window.append(meta_step(model, outer_opt, traj_ims, traj_labels, remember_ims, remember_labels,
                                    settings["inner_lr"]))
            if (it + 1) % settings["log_every"] == 0:
                loss, acc = np.mean(window, axis=0)
                log_file.write(f"{it},{loss:.5f},{acc:.5f}\n")
                log_file.flush()
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
                window = []
            if (it + 1) % settings["save_every"] == 0 or it + 1 == settings["epochs"] or interrupted:
                last = save_checkpoint(model, outer_opt, out_dir, it, settings)
                log.info("saved %s", last)
            if interrupted:
                raise KeyboardInterrupt(f"stopped after iteration {it}; resume with --resume {last}")
    finally:
        log_file.close()
        signal.signal(signal.SIGINT, previous_handler)
    return last
