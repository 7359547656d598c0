"""Residual add + layer normalization, in both orders.

    post-LN (Vaswani 2017, BERT):  x <- LayerNorm(x + Dropout(sublayer(x)))
    pre-LN  (GPT-2/3):             x <- x + Dropout(sublayer(LayerNorm(x)))
Pre-LN stacks end with one more LayerNorm after the last layer.
`model.norm=rmsnorm` puts RMSNorm (rms_norm.py) in every one of those places;
`norm_layer` builds whichever the config names and `norm_params` counts it.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from matrixmagic.configs import ModelConfig
from matrixmagic.configs.model_config import NORMS as NORM_NAMES

from .params import logical_param
from .rms_norm import RMSNorm, rms_norm_params


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


def layer_norm_params(config: ModelConfig) -> int:
    """One LayerNorm's parameters: scale and bias over d_model."""
    return 2 * config.d_model


# model.norm -> (the module, one norm's parameter count)
NORMS = {"layernorm": (LayerNorm, layer_norm_params), "rmsnorm": (RMSNorm, rms_norm_params)}
assert tuple(NORMS) == NORM_NAMES, "one norm per configs.model_config.Norm"


def norm_layer(config: ModelConfig, name: Optional[str] = None) -> nn.Module:
    """The normalization the config names (LayerNorm or RMSNorm)."""
    return NORMS[config.norm][0](config, name=name)


def norm_params(config: ModelConfig) -> int:
    """One norm's parameters."""
    return NORMS[config.norm][1](config)


def final_norm_params(config: ModelConfig) -> int:
    """A pre-LN stack ends with one more norm (its residual stream is never normalized otherwise)."""
    return norm_params(config) if config.norm_position == "pre" else 0


def add_and_norm(x: jnp.ndarray, sublayer: Callable[[jnp.ndarray], jnp.ndarray], norm: nn.Module,
                 dropout: Callable[[jnp.ndarray], jnp.ndarray], norm_position: str) -> jnp.ndarray:
    """Wrap `sublayer` in a residual connection with LayerNorm before or after it."""
    if norm_position == "pre":
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))
