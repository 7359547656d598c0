"""Attention masks: which keys each query may see.

The stacks describe a mask by its structure, an `AttentionMask` record: causal or
not, and the segment ids of the queries and of the keys (0 = padding). Its dense
form, `AttentionMask.dense`, is a boolean [B, 1, Q, K] array, True where query q
may attend key k (the head axis is 1 so one mask broadcasts over all heads); the
`matrices` and `fused` attention paths use that, turning False into a large
negative score before the softmax, so masked keys get zero weight. The `splash`
kernel (splash.py) reads the structure itself and never builds the [Q, K] array.
- causal: position t sees positions <= t (decoders: no peeking at the future);
- padding: nobody attends to padding keys;
- segment: packed sequences hold several documents; a token sees only its own;
- cross (encoder-decoder): decoder queries see the encoder's non-padding keys
  of the same segment.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import struct


def causal_mask(length: int, order: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """[1, 1, T, T] lower-triangular; with `order` [T] (each token's original index, when the
    sequence is reordered for context parallelism: context.py) key k is visible to query q when
    order[k] <= order[q]."""
    if order is None:
        return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    return (order[None, :] <= order[:, None])[None, None]


def padding_mask(query_valid: Optional[jnp.ndarray], key_valid: jnp.ndarray) -> jnp.ndarray:
    """query_valid [B, Q], key_valid [B, K] (True = real token) -> [B, 1, Q, K].

    Padding queries keep all keys visible (their outputs are discarded by the loss
    mask); this avoids all-masked rows whose softmax would be undefined.
    """
    del query_valid  # padding queries are harmless; only keys are masked
    return key_valid[:, None, None, :].astype(bool)


def segment_mask(query_segments: jnp.ndarray, key_segments: jnp.ndarray) -> jnp.ndarray:
    """[B, Q], [B, K] segment ids (0 = padding) -> [B, 1, Q, K]: same, non-padding segment."""
    same = query_segments[:, :, None] == key_segments[:, None, :]
    return (same & (key_segments[:, None, :] > 0))[:, None]


def combine_masks(*masks: Optional[jnp.ndarray]) -> Optional[jnp.ndarray]:
    """Logical AND of the masks that are not None (None if all are)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


@struct.dataclass
class AttentionMask:
    """A mask as structure (a pytree, so it passes through nn.scan and remat like an array).

    causal:      query t sees keys <= t (self-attention only: Q = K);
    q_segments:  [B, Q] segment ids of the queries, or None;
    kv_segments: [B, K] segment ids of the keys (0 = padding), or None.
    order:       [T] original index of each token when the sequence is reordered (context
                 parallelism's striping, context.py), or None: plain order. Causal masks compare it.
    Both segment ids: a query sees the keys of its own, non-padding segment. Key ids
    alone: every query sees every non-padding key (cross attention while decoding,
    where the new target tokens carry no segment ids). Neither: no segment masking.
    """

    causal: bool = struct.field(pytree_node=False, default=False)
    q_segments: Optional[jnp.ndarray] = None
    kv_segments: Optional[jnp.ndarray] = None
    order: Optional[jnp.ndarray] = None

    def _check(self, q_len: int, kv_len: int) -> None:
        # Checked where the mask is used, not in __post_init__: jax rebuilds pytrees with placeholder leaves.
        if self.q_segments is not None and self.kv_segments is None:
            raise ValueError("AttentionMask: q_segments need kv_segments (the keys' segment ids) to compare with.")
        if self.causal and q_len != kv_len:
            raise ValueError(f"a causal mask needs as many queries as keys (self-attention), got {q_len} and {kv_len}")

    def dense(self, q_len: int, kv_len: int) -> Optional[jnp.ndarray]:
        """The boolean [B or 1, 1, Q, K] array the matrices and fused paths apply (None: all visible)."""
        self._check(q_len, kv_len)
        if self.kv_segments is None:
            by_segment = None
        elif self.q_segments is None:
            by_segment = padding_mask(None, self.kv_segments > 0)
        else:
            by_segment = segment_mask(self.q_segments, self.kv_segments)
        return combine_masks(causal_mask(q_len, self.order) if self.causal else None, by_segment)

    def kernel_segments(self, batch: int, q_len: int, kv_len: int) -> Optional[tuple[jnp.ndarray, jnp.ndarray]]:
        """(q ids [B, Q], kv ids [B, K]) for a kernel that lets a query see the keys of an EQUAL id
        (splash's SegmentIds), or None without segment ids. Non-padding queries see exactly the
        keys `dense` shows them. A padding query (id 0) sees the padding keys instead of none:
        its output differs from the dense path's (there, uniform over every key), and the loss
        discards it either way. Key ids alone become 1 = real, 0 = padding, with every query 1."""
        self._check(q_len, kv_len)
        if self.kv_segments is None:
            return None
        if self.q_segments is None:
            return jnp.ones((batch, q_len), jnp.int32), (self.kv_segments > 0).astype(jnp.int32)
        return self.q_segments.astype(jnp.int32), self.kv_segments.astype(jnp.int32)


def cross_attention_mask(decoder_segments: Optional[jnp.ndarray],
                         encoder_segments: Optional[jnp.ndarray]) -> AttentionMask:
    """Decoder queries x encoder keys. Without segment ids every key is visible; with the
    encoder's alone, every non-padding key."""
    if encoder_segments is None:
        return AttentionMask()
    return AttentionMask(q_segments=decoder_segments, kv_segments=encoder_segments)


def self_attention_mask(segment_ids: Optional[jnp.ndarray], causal: bool,
                        order: Optional[jnp.ndarray] = None) -> AttentionMask:
    """The mask a stack's self-attention uses: causal (decoders) and/or segment/padding; `order`:
    the tokens' original indices when striped for context parallelism."""
    return AttentionMask(causal, segment_ids, segment_ids, order)
