"""Per-device bytes of a sharded pytree, from shapes and shardings alone.

Why from shard shapes: it needs no allocation and no compile, so a laptop can
say what GPT-3 occupies per chip under each layout (benchmarks/bench_sharding.py).
A shard of an array split N ways over a dimension of size D holds ceil(D / N)
rows of it; replicated arrays count in full on every device.
"""

from __future__ import annotations

import math

import jax
import numpy as np


def shard_bytes(leaf) -> int:
    """Bytes one device holds of a ShapeDtypeStruct/Array that carries `.sharding`."""
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.shape else ()
    return math.prod(shape) * np.dtype(leaf.dtype).itemsize


def full_bytes(leaf) -> int:
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def tree_bytes(tree, per_device: bool = True) -> int:
    """Total bytes of a pytree of sharded leaves: one device's share, or the whole."""
    count = shard_bytes if per_device else full_bytes
    return sum(count(leaf) for leaf in jax.tree.leaves(tree))


def state_bytes(abstract_state) -> dict[str, int]:
    """{'params', 'opt_state', 'total'} bytes per device, plus 'unsharded' (the whole state)."""
    params = tree_bytes(abstract_state.params)
    opt = tree_bytes(abstract_state.opt_state)
    return {"params": params, "opt_state": opt, "total": tree_bytes(abstract_state),
            "unsharded": tree_bytes(abstract_state, per_device=False)}
