"""Files: checkpoint names, the weights, the state file that --resume reads, random-number state, atomic writes."""
from __future__ import annotations

import os
import random
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from model import ANML

if sys.platform != "win32":
    import fcntl

CHECKPOINT_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_ANML-(\d+)\.pth$")


def checkpoint_name(rln_chs: int, nm_chs: int, mask_size: int, iteration: int) -> str:
    return f"{rln_chs}_{nm_chs}_{mask_size}_ANML-{iteration}.pth"


def parse_checkpoint_name(path: Path) -> tuple[int, int, int, int]:
    """(rln_chs, nm_chs, mask_size, iteration) from a name such as 256_112_2304_ANML-29999.pth."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: checkpoint name must look like 256_112_2304_ANML-29999.pth "
                         "(RLN_NM_MASK_ANML-ITER.pth); rename it")
    rln, nm, mask, iteration = map(int, match.groups())
    return rln, nm, mask, iteration


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


def load_anml(path: Path, device: torch.device | str = "cpu") -> ANML:
    """An ANML of the sizes in the checkpoint's name, with the checkpoint's weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; check the path, or train one with train_omni.py")
    rln, nm, mask, _ = parse_checkpoint_name(path)
    model = ANML(rln, nm, mask)
    state = _read(path, "an ANML checkpoint", ())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in state.items()}
    mismatch = next((k for k in [*expected, *found] if expected.get(k) != found.get(k)), None)
    if mismatch is not None:
        raise ValueError(f"{path}: weights do not match an ANML({rln}, {nm}, {mask}) as its name says: "
                         f"{mismatch} is {found.get(mismatch, 'missing')}, the model wants "
                         f"{expected.get(mismatch, 'no such key')}")
    model.load_state_dict(state)
    return model.to(device)


def save_run(path: Path, model: ANML, optimizer: dict, rng: list[dict], config: dict, iteration: int) -> None:
    """The weights as a plain state_dict at `path`, and beside them the state file: iteration, optimizer state,
    every worker's random state and the run's config. Both are written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # State first: weights without their state file cannot be resumed; a state file without weights is inert.
    save_atomic({"iteration": iteration, "optimizer": optimizer, "rng": rng, "settings": config}, state_path(path))
    save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def load_run(checkpoint: Path, device: torch.device) -> tuple[ANML, dict]:
    """The weights of a checkpoint and its state file (iteration, optimizer, rng, settings), checked to belong
    together."""
    checkpoint = Path(checkpoint)
    model = load_anml(checkpoint, device)
    if not state_path(checkpoint).is_file():
        raise FileNotFoundError(f"{state_path(checkpoint)} is missing: resuming needs the state file saved beside "
                                "the checkpoint; start a fresh run instead")
    state = _read(state_path(checkpoint), "a run's state file", ("iteration", "optimizer", "rng", "settings"))
    if state["iteration"] != parse_checkpoint_name(checkpoint)[3]:
        raise ValueError(f"{state_path(checkpoint)} belongs to iteration {state['iteration']}, "
                         f"not to {checkpoint.name}")
    return model, state


def remove_temporaries(folder: Path) -> None:
    """Delete the hidden temporary files that a save_atomic stopped by a kill left in `folder`."""
    for tmp in Path(folder).glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


def _state_files(folder: Path) -> list[Path]:
    """The state files of the checkpoints in `folder`, oldest iteration first."""
    matches = [(CHECKPOINT_NAME.match(checkpoint_of(p).name), p) for p in Path(folder).glob("*.state.pth")]
    return [p for _, p in sorted((int(match[4]), p) for match, p in matches if match)]


def newest_resumable(folder: Path) -> Path:
    """The checkpoint of the newest iteration in `folder` that has its state file beside it."""
    states = _state_files(folder)
    if not states:
        raise FileNotFoundError(f"{folder} holds no resumable checkpoint (a NAME.pth with its NAME.state.pth); "
                                "name a checkpoint, or start a new run")
    return checkpoint_of(states[-1])


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
