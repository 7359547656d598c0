"""What makes a checkpoint usable: names, fingerprints and shape compatibility.

Pure functions over pytrees, shared by the checkpointer (train/checkpoint.py) and tests:

* `path_name` gives one name per array for an in-memory TrainState (attribute keys) and
  for orbax's saved metadata tree (dict keys) alike, so the two can be compared.
* `state_fingerprint`: a position-weighted sum of each array's bit pattern mod 2^32,
  computed on device. Integer sums are exact and order-free, so the value does not depend
  on the mesh: a checkpoint written under DP-8 verifies after restoring under FSDP x TP.
  Any single changed 32-bit word changes it (odd weights are invertible mod 2^32).
* `shape_mismatches` / `config_differences` turn "these shapes differ" into a message
  naming the arrays and the config fields, read from metadata before any array is loaded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# ----------------------------------------------------------------------------- paths and fingerprints


def path_name(path) -> str:
    """'params/decoder/layers/...' for a key path; attribute, dict and sequence keys alike,
    so an in-memory TrainState and orbax's saved (dict) metadata tree give the same names."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def flat_by_name(tree, is_leaf=None) -> dict:
    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """sum_i word_i * (2 i + 1) mod 2^32 over the array's bit pattern: any single changed
    word changes it (odd weights are invertible mod 2^32), and it is order-free, so exact
    under any sharding."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    itemsize = np.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif itemsize == 4:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif itemsize < 4:
        words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * itemsize}")).astype(jnp.uint32)
    else:  # 8 bytes -> two uint32 words per element
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    weights = jnp.arange(words.size, dtype=jnp.uint32).reshape(words.shape) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(words * weights, dtype=jnp.uint32)


def _fingerprint_tree(tree):
    return jax.tree.map(_leaf_fingerprint, tree)


@functools.lru_cache(maxsize=8)
def _fingerprints_on(mesh):
    """Jitted fingerprints whose scalars are replicated over `mesh`, so every host can read
    them (a scalar left on some devices only is not fetchable across hosts)."""
    if mesh is None:
        return jax.jit(_fingerprint_tree)
    return jax.jit(_fingerprint_tree, out_shardings=NamedSharding(mesh, PartitionSpec()))


def state_fingerprint(state) -> dict[str, int]:
    """{array name: fingerprint} of a (possibly sharded) pytree; one small device->host copy."""
    meshes = [leaf.sharding.mesh for leaf in jax.tree.leaves(state) if isinstance(getattr(leaf, "sharding", None),
                                                                                NamedSharding)]
    fingerprints = _fingerprints_on(meshes[0] if meshes else None)(state)
    return {name: int(v) for name, v in flat_by_name(jax.device_get(fingerprints)).items()}


def _is_array_metadata(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def shape_mismatches(saved_tree, abstract_tree) -> list[str]:
    """'name: checkpoint (32, 64) float32, this run (64, 64) float32' for every array whose
    shape or dtype differs, plus arrays present on one side only."""
    saved = flat_by_name(saved_tree, is_leaf=_is_array_metadata)
    wanted = flat_by_name(abstract_tree)
    out = []
    for name in sorted(set(saved) | set(wanted)):
        s, w = saved.get(name), wanted.get(name)
        if s is None:
            assert w is not None  # every name comes from one of the two trees
            out.append(f"{name}: missing from the checkpoint (this run {tuple(w.shape)} {w.dtype})")
        elif w is None:
            out.append(f"{name}: in the checkpoint {tuple(s.shape)} {s.dtype}, absent in this run")
        elif tuple(s.shape) != tuple(w.shape) or np.dtype(s.dtype) != np.dtype(w.dtype):
            out.append(f"{name}: checkpoint {tuple(s.shape)} {np.dtype(s.dtype)}, this run {tuple(w.shape)} "
                       f"{np.dtype(w.dtype)}")
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'model.d_model': 32, ...}: a JSON config's leaf fields by dotted name."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """'model.d_model: checkpoint 32, this run 64' for every differing leaf field."""
    a, b = flatten(saved), flatten(current)
    return [f"{k}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


RESUME_FIX = ("rerun with the checkpoint's values (--set), start a new run with another --workdir, or use "
              "--init-from for a model of the same shapes")


def incompatibility_message(directory: str, step: int, mismatches: list[str], config_diffs: list[str],
                            fix: str = RESUME_FIX, limit: int = 12) -> str:
    """Parameters first (they are what the user changed); optimizer-state twins only counted."""
    params = [m for m in mismatches if m.startswith("params/")]
    others = [m for m in mismatches if not m.startswith("params/")]
    shown = (params or others)[:limit]
    rest = len(mismatches) - len(shown)
    lines = "\n  ".join(shown) + (f"\n  ... and {rest} more (optimizer state, step or key)" if rest else "")
    model_diffs = [d for d in config_diffs if d.startswith(("model.", "optimizer."))] or config_diffs
    return (f"checkpoint step {step} in {directory} does not fit this config: {len(mismatches)} array(s) differ:\n  "
            f"{lines}\nconfig fields that differ from the checkpoint's: "
            f"{'; '.join(model_diffs[:limit]) or 'none recorded'}.\nFix: {fix}.")
