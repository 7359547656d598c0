"""Encoder-only model (BERT, Devlin et al. 2019).

tokens -> token + position + token-type (segment A/B) embeddings -> LayerNorm ->
dropout -> N x EncoderLayer (bidirectional self-attention, post-LN) -> hidden
states. Two heads on top:
  pooler:   tanh(h[CLS] W + b), the sentence vector for classification;
  MLM head: dense -> GELU -> LayerNorm -> tied output layer + bias, the logits
            for masked-token prediction, BERT's pre-training objective.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import linen as nn

from matrixmagic.configs import ModelConfig

from .add_norm import LayerNorm
from .dropout import Dropout
from .embeddings import TokenEmbedding
from .feed_forward import ACTIVATIONS
from .layers import EncoderLayer
from .linear import Linear
from .masks import self_attention_mask
from .output_head import OutputHead
from .positional import default_positions, positional_encoding
from .stack import LayerStack


class MaskedLMHead(nn.Module):
    """BERT's prediction head: transform each hidden state, then score every vocabulary entry."""

    config: ModelConfig
    shared_embedding: Optional[TokenEmbedding] = None

    @nn.compact
    def __call__(self, hidden: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        h = Linear((cfg.d_model,), (cfg.d_model,), ("embed", "mlp"), True, cfg.init_std, cfg.dtype,
                   cfg.param_dtype, name="transform")(hidden)
        h = LayerNorm(cfg, name="transform_norm")(ACTIVATIONS[cfg.activation](h))
        return OutputHead(cfg, self.shared_embedding, use_bias=True, name="output_head")(h)


class EncoderOnlyLM(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.token_embedding = TokenEmbedding(cfg)
        self.position_embedding = positional_encoding(cfg, None)
        if cfg.type_vocab_size:
            self.token_type_embedding = TokenEmbedding(cfg, num_embeddings=cfg.type_vocab_size,
                                                       axes=("token_type", "embed"))
        self.embedding_norm = LayerNorm(cfg)
        self.embedding_dropout = Dropout(cfg.dropout_rate)
        self.encoder = LayerStack(cfg, EncoderLayer)
        if cfg.norm_position == "pre":
            self.final_norm = LayerNorm(cfg)
        self.pooler = Linear((cfg.d_model,), (cfg.d_model,), ("embed", "mlp"), True, cfg.init_std,
                             cfg.dtype, cfg.param_dtype)
        self.mlm_head = MaskedLMHead(cfg, self.token_embedding if cfg.tie_embeddings else None)

    def encode(self, inputs: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
               segment_ids: Optional[jnp.ndarray] = None, token_types: Optional[jnp.ndarray] = None,
               deterministic: bool = True) -> tuple[jnp.ndarray, jnp.ndarray]:
        """inputs [B, T] -> (hidden states [B, T, d], pooled first-token vector [B, d])."""
        cfg = self.config
        positions = default_positions(inputs) if positions is None else positions
        x = self.token_embedding(inputs) + self.position_embedding(positions)
        if cfg.type_vocab_size:
            types = jnp.zeros_like(inputs) if token_types is None else token_types
            x = x + self.token_type_embedding(types)
        self.sow("intermediates", "embeddings", x)
        x = self.embedding_dropout(self.embedding_norm(x), deterministic=deterministic)
        mask = self_attention_mask(segment_ids, causal=False)
        hidden = self.encoder(x, mask, deterministic=deterministic)
        if cfg.norm_position == "pre":
            hidden = self.final_norm(hidden)
        pooled = jnp.tanh(self.pooler(hidden[:, 0]))
        return hidden, pooled

    def __call__(self, inputs: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
                 segment_ids: Optional[jnp.ndarray] = None, token_types: Optional[jnp.ndarray] = None,
                 deterministic: bool = True) -> jnp.ndarray:
        """inputs [B, T] -> masked-LM logits [B, T, vocab] (float32)."""
        hidden, pooled = self.encode(inputs, positions, segment_ids, token_types, deterministic)
        self.sow("intermediates", "pooled", pooled)
        return self.mlm_head(hidden)
