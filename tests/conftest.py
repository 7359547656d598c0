"""Fixtures shared by the test files. The tiny model they train (TINY, TINY_MODEL) and the corpus
writers live in run_helpers.py, which the subprocess helpers import too."""

from __future__ import annotations

import pytest
from run_helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A random-text corpus ({"src"}) and its own data dir ({"data"}), once per test file: the runs of
    one file share the prepared dataset. Files that need another corpus define their own `corpus`."""
    src, data = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("data")
    return {"src": write_corpus(src), "data": str(data)}


# ----------------------------------------------------------------------------- the longest tests start first

# The README and docs walk is by far the longest single test (every documented command, one after
# another), then the notebook. Under `pytest -n auto` a worker that picks one of them up late ends the
# run alone on it: their files go first (the order is otherwise pytest's, each file's tests together,
# so module fixtures are built once per worker), and `--dist worksteal` (pyproject.toml) lets the
# other workers take the queued tests behind them.
LONGEST_FIRST = ("test_readme.py", "test_notebook.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every other test keeps its place
