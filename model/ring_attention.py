"""Ring attention: softmax attention over K/V that arrive one block at a time.

Each context shard keeps its queries and passes its K/V block to the next shard round a ring
(`jax.lax.ppermute`), C steps for C shards, so after the last step every query has met every key
and no device ever held more than one block of K/V (Liu et al. 2023, "Ring Attention with
Blockwise Transformers for Near-Infinite Context").

The softmax over keys it has not seen yet is the online softmax (Milakov & Gimelshein 2018,
"Online normalizer calculation for softmax"; as in FlashAttention, Dao et al. 2022). Per query
row it keeps the running maximum m, the running sum l of exp(s - m) and the running weighted
sum of values acc; a block of scores s updates them:

    m' = max(m, max_k s)        c = exp(m - m')
    l' = c l + sum_k exp(s - m')
    acc' = c acc + sum_k exp(s - m') v_k
and at the end out = acc / l, equal to softmax(s) V over all keys at once.

Masks are applied per block pair from each token's original index (causal) and segment ids
(packed documents), both carried along with their K/V block. Masked scores are MASK_VALUE, as in
attention.py, so a row that sees no key at all attends uniformly, as the matrices path does;
a block with nothing visible is computed (correct, just wasted) rather than skipped. Under the
load-balanced striping of context.py no block pair is fully causally masked: every shard holds
a late chunk, which every early chunk precedes.

`blockwise_attention` is the math on one device (K/V cut into blocks: what the tests compare
with plain softmax attention); `ring_attention` runs it in `jax.shard_map` over the mesh in
context, rotating blocks over the context axis.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from .masks import AttentionMask, combine_masks, segment_mask
from .params import HEADS_ACTIVATION

MASK_VALUE = -1e9  # attention.py's: a fully masked row attends uniformly instead of giving NaN

Block = tuple  # (k [B, Tk, H, d], v [B, Tk, H, d], kv_index [Tk], kv_segments [B, Tk] or None)


def block_mask(q_index: jnp.ndarray, kv_index: jnp.ndarray, q_segments: Optional[jnp.ndarray],
               kv_segments: Optional[jnp.ndarray], causal: bool) -> Optional[jnp.ndarray]:
    """[B or 1, 1, Tq, Tk] visibility of one block pair: causal on the original token indices,
    and same non-padding segment (masks.segment_mask) when segment ids are given."""
    causal_part = (kv_index[None, :] <= q_index[:, None])[None, None] if causal else None
    segments = None if q_segments is None or kv_segments is None else segment_mask(q_segments, kv_segments)
    return combine_masks(causal_part, segments)


def init_state(q: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(m, l, acc) before any key: m = -inf, l = 0 [B, H, Tq]; acc = 0 [B, Tq, H, d] float32."""
    batch, length, heads, d_k = q.shape
    m = jnp.full((batch, heads, length), -jnp.inf, jnp.float32)
    return m, jnp.zeros((batch, heads, length), jnp.float32), jnp.zeros((batch, length, heads, d_k), jnp.float32)


def update(state, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: Optional[jnp.ndarray], dtype):
    """One block of keys into the running softmax (the formulas in the module docstring)."""
    m, total, acc = state
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = jnp.where(mask, scores, MASK_VALUE)
    # The output does not depend on the m chosen (it cancels in acc / l), so no gradient flows through it.
    m_new = jax.lax.stop_gradient(jnp.maximum(m, scores.max(axis=-1)))
    correction = jnp.exp(m - m_new)  # [B, H, Tq]; exp(-inf) = 0 before the first block
    weights = jnp.exp(scores - m_new[..., None])
    total = correction * total + weights.sum(axis=-1)
    values = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), v.astype(dtype),
                        preferred_element_type=jnp.float32)
    acc = correction.transpose(0, 2, 1)[..., None] * acc + values
    return m_new, total, acc


def finish(state, dtype) -> jnp.ndarray:
    """acc / l: the softmax-weighted values, [B, Tq, H, d] in `dtype`."""
    _, total, acc = state
    return (acc / total.transpose(0, 2, 1)[..., None]).astype(dtype)


def _block_step(state, q, q_index, q_segments, block: Block, causal: bool, dtype):
    k, v, kv_index, kv_segments = block
    return update(state, q, k, v, block_mask(q_index, kv_index, q_segments, kv_segments, causal), dtype)


# Rematerialized: the backward pass recomputes a block's scores and mask from its inputs instead of
# keeping C blocks of [Tq, Tk] weights per layer (FlashAttention's recomputation, Dao et al. 2022).
_checkpointed_step = jax.checkpoint(_block_step, static_argnums=(5, 6))


def attend_blocks(q, q_index, q_segments, blocks, causal: bool, dtype) -> jnp.ndarray:
    """softmax(Q K^T / sqrt(d), masked) V over the K/V `blocks` (an iterable of Block), in order."""
    state = init_state(q)
    for block in blocks:
        state = _checkpointed_step(state, q, q_index, q_segments, tuple(block), causal, dtype)
    return finish(state, dtype)


def blockwise_attention(q, k, v, q_index, kv_index, q_segments=None, kv_segments=None, *, causal: bool,
                        num_blocks: int, dtype=jnp.float32) -> jnp.ndarray:
    """The ring's math on one device: K/V [B, Tk, H, d] (with their indices [Tk] and segments
    [B, Tk]) cut into `num_blocks` blocks and fed to the running softmax one by one."""
    split = functools.partial(jnp.split, indices_or_sections=num_blocks, axis=-1)
    k_blocks, v_blocks = jnp.split(k, num_blocks, axis=1), jnp.split(v, num_blocks, axis=1)
    segment_blocks = split(kv_segments) if kv_segments is not None else [None] * num_blocks
    blocks = zip(k_blocks, v_blocks, split(kv_index), segment_blocks)
    return attend_blocks(q, q_index, q_segments, blocks, causal, dtype)


def _ring_blocks(k, v, kv_index, kv_segments, axis, shards: int):
    """This shard's K/V block, then the block of the shard before it, ... (C blocks in all): after
    each use a block moves one step round the ring (shard i sends to i+1), so every shard sees all."""
    ring = [(i, (i + 1) % shards) for i in range(shards)]
    block = (k, v, kv_index, kv_segments)
    for step in range(shards):
        yield block
        if step < shards - 1:  # the last block need not travel on
            block = jax.tree.map(lambda a: jax.lax.ppermute(a, axis, ring), block)


def _local_ring(q, k, v, index, *segments, axis, shards: int, causal: bool, dtype):
    """One shard's part under shard_map: its queries against every shard's K/V, block by block."""
    q_segments, kv_segments = segments if segments else (None, None)
    blocks = _ring_blocks(k, v, index, kv_segments, axis, shards)
    return attend_blocks(q, index, q_segments, blocks, causal, dtype)


def ring_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: AttentionMask, axis, shards: int,
                   dtype) -> jnp.ndarray:
    """Self-attention over a sequence split `shards` ways over mesh axis `axis` (context.py's
    context_split): q, k, v [B, T, H, d] (K/V with as many heads as Q) in striped order, `mask.order`
    [T] their original indices -> [B, T, H, d] in `dtype`. Batch and heads stay split as the rules in
    context split the activations (HEADS_ACTIVATION), as the splash kernel's shard_map does."""
    assert mask.order is not None, "ring attention needs the tokens' original order (AttentionMask.order)"
    spec = nn.logical_to_mesh_axes(HEADS_ACTIVATION)
    assert spec is not None
    rows, index = P(spec[0], spec[1]), P(spec[1])
    segments = () if mask.kv_segments is None else (mask.q_segments, mask.kv_segments)
    if segments and segments[0] is None:  # key ids alone: cross attention, which a split never has
        raise ValueError("ring attention needs the queries' segment ids too (self-attention)")
    local = functools.partial(_local_ring, axis=axis, shards=shards, causal=mask.causal, dtype=dtype)
    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                         in_specs=(spec, spec, spec, index) + (rows,) * len(segments), out_specs=spec,
                         check_vma=False)(q, k, v, mask.order, *segments)
