"""Rotary position embeddings, RoPE (Su et al. 2021, "RoFormer", section 3.4).

Instead of adding a position vector to the token, RoPE turns each query and key
inside attention: the head's dimensions form pairs, and pair i at position m is
rotated by the angle m * w_i, with w_i = theta^(-2i / d_k):

    [x_i', x_{i+d/2}'] = [x_i cos(m w_i) - x_{i+d/2} sin(m w_i),
                          x_{i+d/2} cos(m w_i) + x_i sin(m w_i)]

A rotation preserves length, and the dot product of a query turned by m and a key
turned by n depends on m - n alone: attention sees relative positions, with no
weights to learn. Pairs are (i, i + d_k/2), the "rotate half" layout of GPT-NeoX
and Hugging Face's Llama, so their checkpoints load without permuting W_q, W_k.

Llama 3.1 stretches the slow frequencies for long contexts (`rope_scaling=llama3`,
Meta's Llama 3 reference code, `apply_scaling`): wavelengths longer than
original_max_len / low_freq_factor are divided by `factor`, those shorter than
original_max_len / high_freq_factor are kept, and the band between is blended.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from matrixmagic.configs import ModelConfig


class Rotary(NamedTuple):
    """The angles' cosines and sines for a batch of positions, each [B, T, d_k / 2] float32."""

    cos: jnp.ndarray
    sin: jnp.ndarray


def llama3_scaling(inv_freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float,
                   original_max_len: int) -> np.ndarray:
    """Llama 3.1's frequency scaling: slow frequencies / factor, fast kept, a smooth blend between."""
    wavelen = 2 * np.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelen < high_freq_wavelen, inv_freq,
                    np.where(wavelen > low_freq_wavelen, inv_freq / factor, blended))


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """w_i = theta^(-2i / d_k) for i < d_k / 2 (float32), scaled as the config says."""
    d_k = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, d_k, 2, dtype=np.float32) / d_k)
    if cfg.rope_scaling == "llama3":
        inv_freq = llama3_scaling(inv_freq, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
                                  cfg.rope_high_freq_factor, cfg.rope_original_max_len)
    return inv_freq.astype(np.float32)


def rotary_angles(cfg: ModelConfig, positions: jnp.ndarray) -> Rotary:
    """positions [B, T] -> cos and sin of m w_i, each [B, T, d_k / 2], in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(cfg))
    return Rotary(jnp.cos(angles), jnp.sin(angles))


def apply_rotary(x: jnp.ndarray, rotary: Rotary) -> jnp.ndarray:
    """Turn x [B, T, H, d_k] (queries or keys) by its positions' angles; returns x's dtype."""
    half = x.shape[-1] // 2
    cos, sin = rotary.cos[:, :, None, :], rotary.sin[:, :, None, :]  # broadcast over heads
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RotaryEmbedding(nn.Module):
    """The positional module for `positional=rope`: no weights, and nothing added to the
    embeddings; it returns the angles every self-attention sublayer turns Q and K by."""

    config: ModelConfig

    @nn.compact
    def __call__(self, positions: jnp.ndarray) -> Rotary:
        return rotary_angles(self.config, positions)
