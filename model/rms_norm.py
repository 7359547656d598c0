"""RMSNorm: normalize by the root mean square alone (Zhang & Sennrich 2019).

    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * scale

LayerNorm subtracts the mean, divides by the standard deviation, then scales and
shifts. RMSNorm keeps only the division and the scale: no mean, no bias, one
reduction instead of two. Llama, Mistral and Qwen use it (`model.norm=rmsnorm`);
`model.layer_norm_eps` is its eps too. Computed in float32 like LayerNorm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from matrixmagic.configs import ModelConfig

from .params import logical_param


def rms_normalize(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        scale = logical_param(self, "scale", nn.initializers.ones, (cfg.d_model,), ("norm",), cfg.param_dtype)
        return (rms_normalize(x, cfg.layer_norm_eps) * scale).astype(cfg.dtype)


def rms_norm_params(config: ModelConfig) -> int:
    """One RMSNorm's parameters: the scale over d_model."""
    return config.d_model
