"""Files: checkpoint names, the weights, the state file that --resume reads, random-number state, atomic writes."""
from __future__ import annotations

import logging
import os
import random
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from model import Network, build_model

if sys.platform != "win32":
    import fcntl

log = logging.getLogger(__name__)

# Each treatment's checkpoint name: its sizes (model.model_sizes), its name, the iteration. ANML's is the published one.
CHECKPOINT_NAMES = {"anml": (re.compile(r"^(\d+)_(\d+)_(\d+)_ANML-(\d+)\.pth$"), "{}_{}_{}_ANML-{}.pth"),
                    "sanml": (re.compile(r"^(\d+)_SANML-(\d+)\.pth$"), "{}_SANML-{}.pth"),
                    "oml": (re.compile(r"^(\d+)_OML-(\d+)\.pth$"), "{}_OML-{}.pth"),
                    "pretrain": (re.compile(r"^(\d+)_(\d+)_(\d+)_PRETRAIN-(\d+)\.pth$"), "{}_{}_{}_PRETRAIN-{}.pth")}


class CheckpointName(NamedTuple):
    treatment: str
    sizes: tuple[int, ...]
    iteration: int


def checkpoint_name(treatment: str, sizes: tuple[int, ...], iteration: int) -> str:
    """The file name of a treatment's checkpoint, e.g. 256_112_2304_ANML-29999.pth or 256_SANML-29999.pth."""
    return CHECKPOINT_NAMES[treatment][1].format(*sizes, iteration)


def parse_checkpoint_name(path: Path) -> CheckpointName | None:
    """The treatment, sizes and iteration that a checkpoint's name gives; None for a name that is no checkpoint's."""
    for treatment, (pattern, _) in CHECKPOINT_NAMES.items():
        match = pattern.match(Path(path).name)
        if match:
            *sizes, iteration = map(int, match.groups())
            return CheckpointName(treatment, tuple(sizes), iteration)
    return None


def read_checkpoint_name(path: Path) -> CheckpointName:
    """parse_checkpoint_name, refusing a name that is no checkpoint's."""
    name = parse_checkpoint_name(path)
    if name is None:
        raise ValueError(f"{path}: checkpoint name must look like 256_112_2304_ANML-29999.pth (RLN_NM_MASK_ANML-ITER"
                         ".pth), 256_SANML-29999.pth, 256_OML-24999.pth or 256_112_2304_PRETRAIN-12187.pth; rename it")
    return name


def state_path(checkpoint: Path) -> Path:
    """The optimizer/iteration/RNG file that sits beside a checkpoint."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".pth") + ".state.pth")


def checkpoint_of(state: Path) -> Path:
    """The checkpoint that a state file sits beside: state_path's inverse."""
    return state.with_name(state.name.removesuffix(".state.pth") + ".pth")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A hidden temporary name to write `path`'s contents to, renamed to `path` when done: a stop never leaves a
    half-written file under `path` (remove_temporaries clears what a kill leaves)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    yield tmp
    tmp.replace(path)


def check_writable(folder: Path, flag: str, given: Path) -> None:
    """Refuse now, naming `flag` and its value, a folder (or, until it exists, its nearest existing parent) that takes
    no file, rather than after the work whose results it was to hold."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {given}: {existing} is a file, not a folder; give another {flag}")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise ValueError(f"{flag} {given}: no file can be written in {existing} ({err.strerror}); "
                         f"give another {flag}") from None


@contextmanager
def sole_writer(folder: Path) -> Iterator[None]:
    """Hold folder/.lock while a run writes to folder: a second process training into it (a resume started twice)
    would cut the first one's log back to its own start and mix their checkpoints. The lock goes with the process,
    however it ends. Not on Windows, which lacks flock."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        if sys.platform != "win32":
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"another process is training into {folder}; let it finish, or stop it (Ctrl-C "
                                 "saves) and resume it once") from None
        yield


def save_atomic(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_cache(path: Path) -> object | None:
    """A cache entry that torch.save wrote, or None where there is none or it is damaged (truncated, or another
    file): a cache is a copy, so the caller computes it again and rewrites it, with one line here saying so."""
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: not a file that torch.save finished
        log.warning("cache %s is damaged (%s); computing it again", path, type(err).__name__)
        return None


def _read(path: Path, what: str, keys: tuple[str, ...]) -> dict:
    """torch.load of a dict holding `keys`; anything else (text, a truncated file, another object) is an error
    that names the file."""
    try:
        with warnings.catch_warnings():  # a junk file can make the unpickler warn before it fails
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike mean: not a file that torch.save wrote
        raise ValueError(f"{path} is not {what} that PyTorch can read ({type(err).__name__}); "
                         "it may be truncated or another file: use another one") from None
    missing = [k for k in keys if k not in obj] if isinstance(obj, dict) else ["a dict"]
    if missing:
        raise ValueError(f"{path} is not {what}: it holds no {', '.join(missing)}; use another one")
    return obj


def load_model(path: Path, device: torch.device | str = "cpu") -> Network:
    """The network of the treatment and sizes in the checkpoint's name, with the checkpoint's weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; check the path, or train one with train_omni.py")
    name = read_checkpoint_name(path)
    model = build_model(name.treatment, name.sizes)
    described = f"{type(model).__name__}({', '.join(map(str, name.sizes))})"
    state = _read(path, f"{'an' if type(model).__name__[0] in 'AO' else 'a'} {type(model).__name__} checkpoint", ())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in state.items()}
    mismatch = next((k for k in [*expected, *found] if expected.get(k) != found.get(k)), None)
    if mismatch is not None:
        raise ValueError(f"{path}: weights do not match an {described} as its name says: "
                         f"{mismatch} is {found.get(mismatch, 'missing')}, the model wants "
                         f"{expected.get(mismatch, 'no such key')}")
    bad = first_non_finite(state)
    if bad is not None:
        raise ValueError(f"{path}: {bad} holds non-finite values (NaN or inf): the run that saved it diverged; use an "
                         "earlier checkpoint of it")
    model.load_state_dict(state)
    return model.to(device)


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, else None."""
    return next((name for name, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()), None)


def save_run(path: Path, model: Network, optimizer: dict, rng: list[dict], config: dict, iteration: int) -> None:
    """The weights as a plain state_dict at `path`, and beside them the state file: iteration, optimizer state,
    every worker's random state and the run's config. Both are written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # State first: weights without their state file cannot be resumed; a state file without weights is inert.
    save_atomic({"iteration": iteration, "optimizer": optimizer, "rng": rng, "settings": config}, state_path(path))
    save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def load_run(checkpoint: Path, device: torch.device) -> tuple[Network, dict]:
    """The weights of a checkpoint and its state file (iteration, optimizer, rng, settings), checked to belong
    together."""
    checkpoint = Path(checkpoint)
    model = load_model(checkpoint, device)
    if not state_path(checkpoint).is_file():
        raise FileNotFoundError(f"{state_path(checkpoint)} is missing: resuming needs the state file saved beside "
                                "the checkpoint; start a fresh run instead")
    state = _read(state_path(checkpoint), "a run's state file", ("iteration", "optimizer", "rng", "settings"))
    if state["iteration"] != read_checkpoint_name(checkpoint).iteration:
        raise ValueError(f"{state_path(checkpoint)} belongs to iteration {state['iteration']}, "
                         f"not to {checkpoint.name}")
    return model, state


def remove_temporaries(folder: Path) -> None:
    """Delete the hidden temporary files that a save_atomic stopped by a kill left in `folder`."""
    for tmp in Path(folder).glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


def _state_files(folder: Path) -> list[Path]:
    """The state files of the checkpoints in `folder`, oldest iteration first."""
    names = [(parse_checkpoint_name(checkpoint_of(p)), p) for p in Path(folder).glob("*.state.pth")]
    return [p for _, p in sorted((name.iteration, p) for name, p in names if name)]


def newest_resumable(folder: Path) -> Path:
    """The checkpoint of the newest iteration in `folder` whose weights and state file both load; a newer one that
    does not (a damaged file) is passed over with a warning naming it and why."""
    states = _state_files(folder)
    if not states:
        raise FileNotFoundError(f"{folder} holds no resumable checkpoint (a NAME.pth with its NAME.state.pth); "
                                "name a checkpoint, or start a new run")
    for state in reversed(states):
        try:
            load_run(checkpoint_of(state), torch.device("cpu"))
            return checkpoint_of(state)
        except (OSError, ValueError) as err:
            log.warning("passing over %s: %s", checkpoint_of(state).name, err)
    raise ValueError(f"{folder}: none of its {len(states)} resumable checkpoints loads (see the warnings above); "
                     "start a new run")


def prune_states(folder: Path, keep: int) -> None:
    """Delete the state files of all but the newest `keep` checkpoints in `folder`; every checkpoint's weights stay."""
    for old in _state_files(folder)[:-keep]:
        old.unlink()


def rng_state() -> dict:
    """Every generator a run draws from: torch (CPU and CUDA), numpy and Python's."""
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)), "numpy_pos": int(numpy_state[2]),
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    random.setstate(state["python"])
