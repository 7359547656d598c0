"""Token embeddings: a [vocab, d_model] table whose row i represents token id i.

The same table can serve as the output layer (`attend`: hidden @ table^T), which
ties input and output embeddings as GPT-2/3, BERT and Vaswani et al. do.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import linen as nn

from matrixmagic.configs import ModelConfig

from .params import EMBED_ACTIVATION, constrain, logical_param, normal


def token_table_params(cfg: ModelConfig) -> int:
    """The [vocab, d_model] input table."""
    return cfg.vocab_size * cfg.d_model


class TokenEmbedding(nn.Module):
    config: ModelConfig
    num_embeddings: int | None = None  # default: config.vocab_size; BERT token types use 2
    axes: tuple[str, str] = ("vocab", "embed")

    def setup(self):
        cfg = self.config
        rows = self.num_embeddings or cfg.vocab_size
        self.embedding = logical_param(self, "embedding", normal(cfg.init_std), (rows, cfg.d_model),
                                       self.axes, cfg.param_dtype)

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        """ids [B, T] -> vectors [B, T, d_model]; scaled by sqrt(d_model) if configured (Vaswani 3.4)."""
        table = constrain(self.embedding, (self.axes[0], None))  # FSDP: gather d_model before the row lookup
        x = jnp.take(table, ids, axis=0).astype(self.config.dtype)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.d_model)
        return constrain(x, EMBED_ACTIVATION)

    def attend(self, x: jnp.ndarray) -> jnp.ndarray:
        """hidden [B, T, d] -> logits [B, T, vocab] with the transposed table."""
        dtype = self.config.dtype
        return x.astype(dtype) @ self.embedding.astype(dtype).T
