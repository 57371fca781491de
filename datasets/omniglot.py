"""Omniglot in torchvision's extracted layout, preprocessed once and cached, and the ANML task samplers."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from checkpoints import read_cache, save_atomic

log = logging.getLogger(__name__)

SPLITS = ("images_background", "images_evaluation")
ARCHIVE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{}.zip"
ARCHIVE_MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
               "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "data"
IMAGE_SIZE = 28
DRAWINGS_PER_CLASS = 20
# Part of the cache key: change it whenever the preprocessing below changes.
PREPROCESSING = f"L-lanczos-{IMAGE_SIZE}-uint8-v1"


@dataclass
class Omniglot:
    """One split: images as uint8 [N, 1, 28, 28] (divide by 255 for [0, 1]), class labels [N].

    Class k is the k-th character in (alphabet, character) sorted order; its drawings are
    consecutive, in sorted file-name order.
    """

    images: torch.Tensor
    labels: torch.Tensor
    key: str = ""  # identifies the files and preprocessing these images came from

    @property
    def n_classes(self) -> int:
        return int(self.labels.max()) + 1

    def class_indices(self, cls: int) -> torch.Tensor:
        return (self.labels == cls).nonzero().flatten()

    def to(self, device: torch.device | str) -> "Omniglot":
        """The images on `device`; the labels stay on the CPU, where the samplers read them without waiting for it."""
        return Omniglot(self.images.to(device), self.labels, self.key)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and labels at the given (CPU) indices, on the images' device."""
        labels = self.labels[indices]
        if self.images.is_cuda:  # pinned and non-blocking: the copies queue behind the device's work, no wait
            indices, labels = (t.pin_memory().to(self.images.device, non_blocking=True) for t in (indices, labels))
        return self.images[indices].float() / 255, labels


class DataNotFoundError(FileNotFoundError):
    """Omniglot is not where it was looked for, and could not or may not be downloaded."""


def find_root(data_root: str | Path | None = None, download: bool = True) -> Path:
    """The folder holding omniglot-py/: `data_root`, else $OMNIGLOT_ROOT, else ./data; fetched there if absent."""
    root = Path(data_root or os.environ.get("OMNIGLOT_ROOT") or DEFAULT_ROOT).expanduser()
    missing = [s for s in SPLITS if not (root / "omniglot-py" / s).is_dir()]
    if not missing:
        return root
    hint = f"Omniglot not found under {root}/omniglot-py ({', '.join(missing)} missing)"
    fix = "set OMNIGLOT_ROOT or --data-root to the folder holding omniglot-py/"
    if not download:
        raise DataNotFoundError(f"{hint}, and downloading was not allowed; {fix}, or drop --no-download to fetch it")
    from torchvision.datasets.utils import download_and_extract_archive

    for split in missing:
        log.info("downloading %s into %s", split, root / "omniglot-py")
        try:
            download_and_extract_archive(ARCHIVE_URL.format(split), root / "omniglot-py", md5=ARCHIVE_MD5[split])
        except Exception as err:  # urllib, ssl, zip and md5 failures alike mean: no data here
            raise DataNotFoundError(f"{hint}; downloading it failed ({type(err).__name__}: {err}); {fix}") from None
    return root


def _image_files(split_dir: Path) -> list[tuple[int, Path]]:
    files = []
    characters = [c for a in sorted(split_dir.iterdir()) if a.is_dir() for c in sorted(a.iterdir()) if c.is_dir()]
    for cls, character in enumerate(characters):
        drawings = sorted(character.glob("*.png"))
        if len(drawings) != DRAWINGS_PER_CLASS:
            raise ValueError(f"{character} holds {len(drawings)} drawings, not {DRAWINGS_PER_CLASS}: the data set "
                             "is incomplete; extract it again")
        files += [(cls, f) for f in drawings]
    return files


def _cache_key(split_dir: Path, files: list[tuple[int, Path]]) -> str:
    digest = hashlib.sha256(PREPROCESSING.encode())
    for cls, f in files:
        st = f.stat()
        digest.update(f"{cls}:{f.relative_to(split_dir)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "anml"


def preprocess(path: Path) -> np.ndarray:
    """Grayscale, Lanczos-resized to 28x28, uint8 (white background 255, dark strokes)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS))


def load_split(root: Path, split: str) -> Omniglot:
    """A split ("images_background" or "images_evaluation"), from the cache when it is current."""
    split_dir = Path(root) / "omniglot-py" / split
    files = _image_files(split_dir)
    if not files:
        raise FileNotFoundError(f"no PNG drawings under {split_dir}; is the data set extracted there?")
    key = _cache_key(split_dir, files)
    cache = cache_dir() / f"omniglot-{split}-{key}.pt"
    data = read_cache(cache)
    if isinstance(data, dict) and {"images", "labels"} <= data.keys():
        return Omniglot(data["images"], data["labels"], key)
    images = np.stack([preprocess(f) for _, f in tqdm(files, desc=f"decoding {split}", unit="img")])
    data = {"images": torch.from_numpy(images).unsqueeze(1), "labels": torch.tensor([c for c, _ in files])}
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(data, cache)
    return Omniglot(data["images"], data["labels"], key)


def sample_meta_train(data: Omniglot, n_remember: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of one meta-training task: a random class's drawings in stored order, and a remember set
    drawn uniformly without replacement from the whole split. Uses torch's global generator."""
    cls = int(torch.randint(data.n_classes, ()))
    trajectory = data.class_indices(cls)
    remember = torch.randperm(len(data.labels))[:n_remember]
    return trajectory, remember


def sample_meta_test(data: Omniglot, n_classes: int, n_train: int = 15,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [n_classes, n_train] and [n_classes, rest] for one meta-test run: distinct random classes in
    random order, each class's drawings split at random, training drawings in random order."""
    if not 1 <= n_classes <= data.n_classes:
        raise ValueError(f"class count {n_classes} is outside 1..{data.n_classes}, the classes of this split")
    per_class = int((data.labels == 0).sum())
    if not 1 <= n_train < per_class:
        raise ValueError(f"{n_train} training drawings per class is outside 1..{per_class - 1} "
                         f"(each class has {per_class} drawings)")
    classes = torch.randperm(data.n_classes, generator=generator)[:n_classes]
    train, test = [], []
    for cls in classes.tolist():
        drawings = data.class_indices(cls)[torch.randperm(per_class, generator=generator)]
        train.append(drawings[:n_train])
        test.append(drawings[n_train:])
    return torch.stack(train), torch.stack(test)
