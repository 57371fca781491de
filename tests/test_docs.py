"""README is the user's manual: every link in it and in docs/ leads somewhere, and every flag is in it."""
import re

import pytest

import eval_omni
import train_omni
from tests.conftest import REPO

PAGES = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    headings = [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} leads nowhere"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: {target} names no heading of {linked.name}"


@pytest.mark.parametrize("command", [train_omni, eval_omni], ids=lambda m: m.__name__)
def test_every_flag_is_in_the_readme(command):
    readme = (REPO / "README.md").read_text()
    for action in command.parser()._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}" in readme, f"{command.__name__}'s {flag} is not in README.md"


def test_the_readme_names_no_path_of_this_projects_machines():
    readme = (REPO / "README.md").read_text()
    assert "../shared" not in readme and "~/anml_runs" not in readme  # a user has --data-root, $OMNIGLOT_ROOT, data/
