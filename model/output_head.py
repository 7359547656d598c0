"""The final linear layer and softmax over the vocabulary.

logits = h W_out (W_out = the token embedding table transposed when tied);
p(next token) = softmax(logits). Padding rows of the vocabulary (ids >=
num_valid_tokens) get a large negative logit so they are never predicted.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from matrixmagic.configs import ModelConfig

from .attention import MASK_VALUE
from .embeddings import TokenEmbedding
from .linear import Linear
from .params import VOCAB_ACTIVATION, constrain, logical_param


def unembedding_params(cfg: ModelConfig) -> int:
    """The final linear's own weights: none when tied to the token embedding (it reuses E^T)."""
    return 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model


def mask_padding_vocab(logits: jnp.ndarray, num_valid_tokens: Optional[int]) -> jnp.ndarray:
    if num_valid_tokens is None or num_valid_tokens >= logits.shape[-1]:
        return logits
    valid = jnp.arange(logits.shape[-1]) < num_valid_tokens
    return jnp.where(valid, logits, MASK_VALUE)


def vocab_softmax(logits: jnp.ndarray) -> jnp.ndarray:
    """Probabilities over the vocabulary, in float32."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


class OutputHead(nn.Module):
    config: ModelConfig
    shared_embedding: Optional[TokenEmbedding] = None  # tie to this table when given
    use_bias: bool = False  # GPT and Vaswani have none; BERT's MLM decoder has one

    @nn.compact
    def __call__(self, hidden: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        if self.shared_embedding is not None:
            logits = self.shared_embedding.attend(hidden)
        else:
            logits = Linear((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), False, cfg.init_std,
                            cfg.dtype, cfg.param_dtype, name="unembedding")(hidden)
        if self.use_bias:
            bias = logical_param(self, "bias", nn.initializers.zeros, (cfg.vocab_size,), ("vocab",), cfg.param_dtype)
            logits = logits + bias.astype(logits.dtype)
        logits = mask_padding_vocab(constrain(logits.astype(jnp.float32), VOCAB_ACTIVATION), cfg.num_valid_tokens)
        self.sow("intermediates", "logits", logits)
        return logits
