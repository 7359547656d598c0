"""Attention masks: boolean [B, 1, Q, K] arrays, True where query q may attend to key k.

The head axis is 1 so one mask broadcasts over all heads. The attention module
turns False into a large negative score before the softmax, so masked keys get
zero weight.
- causal: position t sees positions <= t (decoders: no peeking at the future);
- padding: nobody attends to padding keys;
- segment: packed sequences hold several documents; a token sees only its own;
- cross (encoder-decoder): decoder queries see the encoder's non-padding keys
  of the same segment.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp


def causal_mask(length: int) -> jnp.ndarray:
    """[1, 1, T, T] lower-triangular."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def padding_mask(query_valid: jnp.ndarray, key_valid: jnp.ndarray) -> jnp.ndarray:
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


def cross_attention_mask(decoder_segments: Optional[jnp.ndarray],
                         encoder_segments: Optional[jnp.ndarray]) -> Optional[jnp.ndarray]:
    """Decoder queries x encoder keys. Without segment ids every key is visible."""
    if encoder_segments is None:
        return None
    if decoder_segments is None:
        return padding_mask(None, encoder_segments > 0)
    return segment_mask(decoder_segments, encoder_segments)


def combine_masks(*masks: Optional[jnp.ndarray]) -> Optional[jnp.ndarray]:
    """Logical AND of the masks that are not None (None if all are)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def self_attention_mask(segment_ids: Optional[jnp.ndarray], length: int, causal: bool) -> Optional[jnp.ndarray]:
    """The mask a stack's self-attention uses: causal (decoders) and/or segment/padding."""
    return combine_masks(causal_mask(length) if causal else None,
                         segment_mask(segment_ids, segment_ids) if segment_ids is not None else None)
