"""Residual add + layer normalization, in both orders.

    post-LN (Vaswani 2017, BERT):  x <- LayerNorm(x + Dropout(sublayer(x)))
    pre-LN  (GPT-2/3):             x <- x + Dropout(sublayer(LayerNorm(x)))
Pre-LN stacks end with one more LayerNorm after the last layer.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from matrixmagic.configs import ModelConfig

from .params import logical_param


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, computed in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        scale = logical_param(self, "scale", nn.initializers.ones, (cfg.d_model,), ("norm",), cfg.param_dtype)
        bias = logical_param(self, "bias", nn.initializers.zeros, (cfg.d_model,), ("norm",), cfg.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + cfg.layer_norm_eps)
        return (y * scale + bias).astype(cfg.dtype)


def norm_params(config: ModelConfig) -> int:
    """One LayerNorm's parameters: scale and bias over d_model."""
    return 2 * config.d_model


def final_norm_params(config: ModelConfig) -> int:
    """A pre-LN stack ends with one more norm (its residual stream is never normalized otherwise)."""
    return norm_params(config) if config.norm_position == "pre" else 0


def add_and_norm(x: jnp.ndarray, sublayer: Callable[[jnp.ndarray], jnp.ndarray], norm: LayerNorm,
                 dropout: Callable[[jnp.ndarray], jnp.ndarray], norm_position: str) -> jnp.ndarray:
    """Wrap `sublayer` in a residual connection with LayerNorm before or after it."""
    if norm_position == "pre":
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))
