"""Shared by tests/test_hf*.py: the golden fixtures and variants of them written on the fly.

The fixtures (tests/fixtures/hf/) were written once by transformers; see
tests/fixtures/make_hf_fixtures.py for how. Variants (other tensor names, dtypes, shards,
missing or damaged tensors) are rewritten here from those same tensors with our writer,
whose output the `safetensors` library itself reads back in test_hf.py.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from matrixmagic.train.hf.api import import_hf
from matrixmagic.train.hf.errors import HFError
from matrixmagic.train.hf.tensorfile import Planned, read, read_checkpoint, write_checkpoint

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
GOLDEN = os.path.join(FIXTURES, "golden.npz")


def golden() -> dict:
    with np.load(GOLDEN) as g:
        return {k: g[k] for k in g.files}


def keys() -> dict:
    with open(os.path.join(FIXTURES, "keys.json")) as f:
        return json.load(f)


def tensors(directory: str) -> dict[str, np.ndarray]:
    return {name: read(info) for name, info in read_checkpoint(directory).items()}


def variant(source: str, target: str, *, rename=None, drop=(), add=None, dtype=None, max_shard_bytes=None,
            config=None) -> str:
    """A copy of fixture `source` (a name under FIXTURES or a path) at `target` whose tensors are
    renamed / dropped / added / cast, possibly sharded, and whose config.json is updated."""
    source = source if os.path.isabs(source) else os.path.join(FIXTURES, source)
    os.makedirs(target)
    for name in os.listdir(source):
        if not name.endswith(".safetensors") and not name.endswith(".index.json") and os.path.isfile(
                os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), target)
    values = {(rename(n) if rename else n): v for n, v in tensors(source).items() if n not in drop}
    values.update(add or {})
    if dtype is not None:
        values = {n: v.astype(dtype) for n, v in values.items()}
    planned = [Planned(n, v.shape, v.dtype) for n, v in sorted(values.items())]
    write_checkpoint(target, planned, lambda t: values[t.name], max_shard_bytes)
    if config:
        with open(os.path.join(target, "config.json")) as f:
            merged = {**json.load(f), **config}
        with open(os.path.join(target, "config.json"), "w") as f:
            json.dump(merged, f)
    return target


def rejected(source, tmp_path, match: str, **kwargs) -> str:
    """The import of `source` fails with an HFError matching `match` and leaves nothing behind."""
    target = tmp_path / "run"
    with pytest.raises(HFError, match=match) as err:
        import_hf(str(source), str(target), **kwargs)
    assert not target.exists(), "nothing is left behind"
    assert not [p for p in os.listdir(tmp_path) if p.startswith("run.importing")]
    return str(err.value)


def with_config(tmp_path, source: str, **fields) -> str:
    return variant(source, str(tmp_path / "src"), config=fields)
