"""Context parallelism: the sequence split over the mesh's `context` axis.

With `mesh.context` = C > 1 the rule table (sharding/rules.py) maps 'activation_length' to
`context`, so the residual stream, the norms, the FFN, the output head and the loss each run on
T / C tokens per device. Only attention needs keys from other shards; two ways
(`mesh.context_attention`):
- all_gather: every shard gathers the whole K and V (and their segment ids and token order)
  and attends its own queries to them (Llama 3, Dubey et al. 2024, section 3.3.2). Here that
  is a sharding constraint: K and V are pinned to an unsplit length and XLA inserts the
  all-gather; attention itself is the ordinary matrices / fused path.
- ring: K/V blocks travel round the context shards by `ppermute` while each shard keeps a
  running softmax (ring_attention.py; Liu et al. 2023, "Ring Attention with Blockwise
  Transformers"). No shard ever holds all keys.

Load-balanced causal striping. Split in plain order, the last shard's queries see every key
and the first shard's almost none: causal work grows with the shard index. Instead the
sequence is cut into 2C chunks and shard i holds chunks i and 2C-1-i (one early, one late), so
every shard does the same causal work (Llama 3 section 3.3.2; MaxText's load-balanced
reordering does the same). The decoder reorders its token ids, positions and segment ids on
entry (`stripe`) and puts the final hidden states back in order before the output head
(`unstripe`): callers, targets and the loss never see the striped order, so the labels need not
move. Positions (rope, learned, sinusoidal) come from the positions array and so are the
original ones; the causal mask compares each token's original index (`stripe_order`), carried
by masks.AttentionMask.order.

The model never names a mesh: it reads the mesh in context (`jax.sharding.get_abstract_mesh`)
and the rule table in context (`nn.logical_axis_rules`), both entered by
sharding/partition.py's `with_rules`, which also sets the attention kind (`using`). Without them
(one device, generation, tests) there is no split and nothing here runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Optional, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from .params import constrain

MeshAxes = Union[str, tuple[str, ...]]

# Logical names of gathered keys/values: batch and heads split as the queries', length whole.
GATHERED_KV = ("activation_batch", None, "activation_heads", "activation_kv")
GATHERED_GROUPED_KV = ("activation_batch", None, None, "activation_kv")  # GQA heads keep their weights' layout

_KIND: contextvars.ContextVar[str] = contextvars.ContextVar("context_attention", default="all_gather")


@contextlib.contextmanager
def using(kind: str) -> Iterator[None]:
    """Trace attention over a context split as `kind` ('all_gather' or 'ring') inside the block."""
    token = _KIND.set(kind)
    try:
        yield
    finally:
        _KIND.reset(token)


def attention_kind() -> str:
    return _KIND.get()


def context_split() -> tuple[Optional[MeshAxes], int]:
    """(mesh axes that split 'activation_length', how many shards) under the mesh and rules in
    context; (None, 1) without a mesh, without rules or when the axes have size 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, 1
    axes = nn.logical_to_mesh_axes(("activation_length",))
    axis = None if axes is None else axes[0]
    if axis is None or axis is jax.sharding.PartitionSpec.UNCONSTRAINED:
        return None, 1
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    shards = math.prod(mesh.shape[name] for name in names)
    return (axis, shards) if shards > 1 else (None, 1)


def stripe(x: jnp.ndarray, shards: int, axis: int = 1) -> jnp.ndarray:
    """Plain order -> striped along `axis`: cut into 2C chunks, shard i (the i-th of C equal
    parts of the result) gets chunks i and 2C-1-i. shards=1: x unchanged."""
    if shards == 1:
        return x
    length = x.shape[axis]
    chunks = x.reshape(x.shape[:axis] + (2, shards, length // (2 * shards)) + x.shape[axis + 1:])
    early = jnp.take(chunks, 0, axis=axis)  # chunks 0 .. C-1
    late = jnp.flip(jnp.take(chunks, 1, axis=axis), axis=axis)  # chunks 2C-1 .. C
    return jnp.stack([early, late], axis=axis + 1).reshape(x.shape)  # [.., C, 2, chunk, ..]


def unstripe(x: jnp.ndarray, shards: int, axis: int = 1) -> jnp.ndarray:
    """The inverse of `stripe`: striped order -> plain order along `axis`."""
    if shards == 1:
        return x
    length = x.shape[axis]
    pairs = x.reshape(x.shape[:axis] + (shards, 2, length // (2 * shards)) + x.shape[axis + 1:])
    early = jnp.take(pairs, 0, axis=axis + 1)
    late = jnp.flip(jnp.take(pairs, 1, axis=axis + 1), axis=axis)
    return jnp.concatenate([early, late], axis=axis).reshape(x.shape)


def stripe_order(length: int, shards: int) -> jnp.ndarray:
    """[T] int32: the original index of each token in striped order (what causal masks compare)."""
    return stripe(jnp.arange(length, dtype=jnp.int32)[None], shards)[0]


def gather_keys_values(k: jnp.ndarray, v: jnp.ndarray, grouped: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """all_gather context attention: K and V [B, T, G, d_k] pinned to an unsplit length, so XLA
    all-gathers them over `context` while the queries stay split (their rows of the scores too)."""
    names = GATHERED_GROUPED_KV if grouped else GATHERED_KV
    return constrain(k, names), constrain(v, names)
