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
