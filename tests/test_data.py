import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import datasets.omniglot as omniglot
from datasets import find_root, load_split, sample_meta_test, sample_meta_train
from tests.conftest import REPO


def test_class_counts_and_order(background, evaluation, omniglot_root):
    for data, n in ((background, 964), (evaluation, 659)):
        assert data.images.shape == (n * 20, 1, 28, 28)
        assert data.n_classes == n
        assert torch.equal(torch.bincount(data.labels), torch.full((n,), 20))
        # class k's drawings are consecutive, classes in ascending order
        assert torch.equal(data.labels, torch.arange(n).repeat_interleave(20))
    # class 0 is the first character of the first alphabet; the last is the last of the last
    bg = omniglot_root / "omniglot-py" / "images_background"
    first = sorted((bg / "Alphabet_of_the_Magi" / "character01").glob("*.png"))[0]
    last = sorted((bg / "Tifinagh" / "character55").glob("*.png"))[-1]
    assert np.array_equal(background.images[0, 0].numpy(), omniglot.preprocess(first))
    assert np.array_equal(background.images[-1, 0].numpy(), omniglot.preprocess(last))


def test_preprocessing(background, omniglot_root):
    x, _ = background.batch(torch.arange(40))
    assert x.dtype == torch.float32 and x.shape == (40, 1, 28, 28)
    assert x.min() >= 0 and x.max() <= 1
    assert x.mean() > 0.8  # white background, dark strokes
    character = omniglot_root / "omniglot-py" / "images_background" / "Alphabet_of_the_Magi" / "character01"
    path = sorted(character.glob("*.png"))[0]
    with Image.open(path) as im:
        grey = im.convert("L")
        lanczos = np.asarray(grey.resize((28, 28), Image.LANCZOS))
        bilinear = np.asarray(grey.resize((28, 28), Image.BILINEAR))
    assert np.array_equal(background.images[0, 0].numpy(), lanczos)
    assert not np.array_equal(lanczos, bilinear)


def test_meta_train_sampler(background):
    torch.manual_seed(0)
    classes = set()
    for _ in range(20):
        traj, remember = sample_meta_train(background)
        labels = background.labels[traj]
        assert len(traj) == 20 and (labels == labels[0]).all()
        assert torch.equal(traj, traj.sort().values)  # stored order
        classes.add(int(labels[0]))
        assert len(remember) == 64 and len(remember.unique()) == 64
        assert remember.min() >= 0 and remember.max() < 19280
    assert len(classes) > 15


def test_meta_test_sampler(evaluation):
    g = torch.Generator().manual_seed(3)
    train, test = sample_meta_test(evaluation, 50, 15, g)
    assert train.shape == (50, 15) and test.shape == (50, 5)
    for tr, te in zip(train, test):
        cls = evaluation.labels[tr[0]]
        assert (evaluation.labels[tr] == cls).all() and (evaluation.labels[te] == cls).all()
        assert len(set(tr.tolist()) | set(te.tolist())) == 20
    assert len(evaluation.labels[train[:, 0]].unique()) == 50
    again = sample_meta_test(evaluation, 50, 15, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
    with pytest.raises(ValueError, match="outside 1..659"):
        sample_meta_test(evaluation, 660)
    with pytest.raises(ValueError, match="outside 1..19"):
        sample_meta_test(evaluation, 5, 20)


def small_copy(omniglot_root, dest):
    """Two characters of each split, the real files."""
    for split in omniglot.SPLITS:
        src = omniglot_root / "omniglot-py" / split
        alphabet = sorted(src.iterdir())[0]
        for character in sorted(alphabet.iterdir())[:2]:
            shutil.copytree(character, dest / "omniglot-py" / split / alphabet.name / character.name)
    return dest


def test_cache_is_used_and_never_stale(omniglot_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = small_copy(omniglot_root, tmp_path / "data")
    first = load_split(root, "images_background")
    assert len(list((tmp_path / "cache" / "anml").glob("*.pt"))) == 1
    monkeypatch.setattr(omniglot, "preprocess", lambda path: pytest.fail("decoded although cached"))
    cached = load_split(root, "images_background")
    assert torch.equal(first.images, cached.images) and torch.equal(first.labels, cached.labels)
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # replace one drawing by another: the cache key changes and the new pixels are served
    character = sorted((root / "omniglot-py" / "images_background").glob("*/*"))[0]
    drawings = sorted(character.glob("*.png"))
    shutil.copy(drawings[1], drawings[0])
    time.sleep(0.01)
    changed = load_split(root, "images_background")
    assert torch.equal(changed.images[0], first.images[1])
    assert len(list((tmp_path / "cache" / "anml").glob("*.pt"))) == 2


def test_a_damaged_cache_is_computed_again(omniglot_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = small_copy(omniglot_root, tmp_path / "data")
    first = load_split(root, "images_background")
    [cache] = (tmp_path / "cache" / "anml").glob("*.pt")
    cache.write_bytes(cache.read_bytes()[:1000])  # a copy cut short, as a full disk or a kill leaves one
    again = load_split(root, "images_background")
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert f"cache {cache} is damaged" in caplog.text
    assert torch.equal(torch.load(cache, weights_only=True)["images"], first.images)  # rewritten whole


def test_missing_data_offline(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="downloading was not allowed"):
        find_root(tmp_path, download=False)

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", no_network)
    with pytest.raises(FileNotFoundError, match=f"not found under {tmp_path}.*downloading it failed"):
        find_root(tmp_path, download=True)


def test_suite_without_data_stops_with_the_reason(tmp_path):
    """Where Omniglot cannot be had, the tests that need it do not skip quietly: the run stops, saying why."""
    unreachable = "http://127.0.0.1:9"  # a refused proxy: no download can succeed, and none waits
    env = {**os.environ, "OMNIGLOT_ROOT": str(tmp_path / "nowhere"), "https_proxy": unreachable,
           "HTTPS_PROXY": unreachable}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_data.py::test_meta_test_sampler"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert "error: Omniglot not found under" in result.stdout and "set OMNIGLOT_ROOT" in result.stdout
