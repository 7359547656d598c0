"""Multi-head attention written as the matrices it is.

For each head h (d_k = d_model / num_heads):
    Q_h = X W_q[h],  K_h = Y W_k[h],  V_h = Y W_v[h]           projections
    S_h = Q_h K_h^T / sqrt(d_k)                                 scores [Tq, Tk]
    S_h = where(mask, S_h, -large)                              masking
    A_h = softmax(S_h) (rows sum to 1, computed in float32)     attention weights
    O_h = A_h V_h                                               weighted sum of values
    out = concat(O_1 .. O_H) W_o                                heads concatenated, projected
X = Y gives self-attention; Y = the encoder output gives cross attention.
Each intermediate is `sow`n under 'intermediates' so `magic explain` can show
the real matrices of a forward pass.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from configs import ModelConfig
from model.dropout import Dropout
from model.linear import Linear

# Large but finite, so a fully masked row gives a uniform softmax rather than NaN.
MASK_VALUE = -1e9


def attention_weights(q: jnp.ndarray, k: jnp.ndarray, mask: Optional[jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """q [B, Tq, H, d_k], k [B, Tk, H, d_k] -> (scores, softmax weights), both [B, H, Tq, Tk] float32."""
    d_k = q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d_k)
    if mask is not None:
        scores = jnp.where(mask, scores, MASK_VALUE)
    return scores, jax.nn.softmax(scores, axis=-1)


class MultiHeadAttention(nn.Module):
    config: ModelConfig
    deterministic: bool = True
    out_init_std: Optional[float] = None  # GPT-2 scales residual projections by 1/sqrt(2L)

    @nn.compact
    def __call__(self, inputs_q: jnp.ndarray, inputs_kv: jnp.ndarray, mask: Optional[jnp.ndarray] = None):
        cfg = self.config
        heads, d_k = cfg.num_heads, cfg.head_dim

        def projection(name: str) -> Linear:
            return Linear((cfg.d_model,), (heads, d_k), ("embed", "heads", "kv"), cfg.use_bias,
                          cfg.init_std, cfg.dtype, cfg.param_dtype, name=name)

        q = projection("query")(inputs_q)  # [B, Tq, H, d_k]
        k = projection("key")(inputs_kv)  # [B, Tk, H, d_k]
        v = projection("value")(inputs_kv)  # [B, Tk, H, d_k]
        scores, weights = attention_weights(q, k, mask)
        for name, value in (("q", q), ("k", k), ("v", v), ("scores", scores), ("weights", weights)):
            self.sow("intermediates", name, value)

        weights = Dropout(cfg.attention_dropout_rate, self.deterministic)(weights)
        values = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(cfg.dtype), v.astype(cfg.dtype))
        concatenated = values.reshape(values.shape[:2] + (heads * d_k,))  # [B, Tq, d_model]
        self.sow("intermediates", "heads_concatenated", concatenated)
        out = Linear((heads, d_k), (cfg.d_model,), ("heads", "kv", "embed"), cfg.use_bias,
                     self.out_init_std or cfg.init_std, cfg.dtype, cfg.param_dtype, name="output")(concatenated)
        self.sow("intermediates", "output", out)
        return out
