import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from datasets import DataNotFoundError, find_root, load_split  # noqa: E402


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """Omniglot found as the programs find it ($OMNIGLOT_ROOT, else data/, downloaded there where the network
    allows); without it the whole run stops with the reason, rather than skipping the tests that need it."""
    try:
        return find_root()
    except DataNotFoundError as err:
        pytest.exit(f"error: {err}", returncode=1)


@pytest.fixture(scope="session")
def background(omniglot_root):
    return load_split(omniglot_root, "images_background")


@pytest.fixture(scope="session")
def evaluation(omniglot_root):
    return load_split(omniglot_root, "images_evaluation")


def assert_one_line_error(result, *words):
    """A command line refused its input: non-zero exit, one line on stderr naming the problem."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0]
