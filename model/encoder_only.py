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

from .add_norm import final_norm_params, norm_layer, norm_params
from .dropout import Dropout
from .embeddings import TokenEmbedding, token_table_params
from .feed_forward import ACTIVATIONS
from .layers import EncoderLayer, encoder_layer_params
from .linear import Linear
from .masks import self_attention_mask
from .output_head import OutputHead, unembedding_params
from .positional import default_positions, embed_positions, position_table_params, positional_encoding
from .stack import LayerStack
from .walk import captured, embedding_formula, norm_name, token_stages


def closed_form_params(cfg: ModelConfig) -> dict[str, int]:
    """BERT: embeddings (tokens, positions, segments) and their norm, N encoder layers, the pooler;
    the MLM head (transform, its norm, the output bias, an untied output table) counted apart, as
    BERT's paper counts the model without it."""
    d, norm = cfg.d_model, norm_params(cfg)
    embeddings = token_table_params(cfg) + position_table_params(cfg) + cfg.type_vocab_size * d + norm
    model = embeddings + cfg.num_layers * encoder_layer_params(cfg) + final_norm_params(cfg) + d * d + d
    head = d * d + d + norm + cfg.vocab_size + unembedding_params(cfg)
    return {"model": model, "mlm_head": head}


class MaskedLMHead(nn.Module):
    """BERT's prediction head: transform each hidden state, then score every vocabulary entry."""

    config: ModelConfig
    shared_embedding: Optional[TokenEmbedding] = None

    @nn.compact
    def __call__(self, hidden: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        h = Linear((cfg.d_model,), (cfg.d_model,), ("embed", "mlp"), True, cfg.init_std, cfg.dtype,
                   cfg.param_dtype, name="transform")(hidden)
        h = norm_layer(cfg, "transform_norm")(ACTIVATIONS[cfg.activation](h))
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
        self.embedding_norm = norm_layer(cfg)
        self.embedding_dropout = Dropout(cfg.dropout_rate)
        self.encoder = LayerStack(cfg, EncoderLayer)
        if cfg.norm_position == "pre":
            self.final_norm = norm_layer(cfg)
        self.pooler = Linear((cfg.d_model,), (cfg.d_model,), ("embed", "mlp"), True, cfg.init_std,
                             cfg.dtype, cfg.param_dtype)
        self.mlm_head = MaskedLMHead(cfg, self.token_embedding if cfg.tie_embeddings else None)

    def encode(self, inputs: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
               segment_ids: Optional[jnp.ndarray] = None, token_types: Optional[jnp.ndarray] = None,
               deterministic: bool = True) -> tuple[jnp.ndarray, jnp.ndarray]:
        """inputs [B, T] -> (hidden states [B, T, d], pooled first-token vector [B, d])."""
        cfg = self.config
        positions = default_positions(inputs) if positions is None else positions
        x, rotary = embed_positions(cfg, self.token_embedding(inputs), positions, None, self.position_embedding)
        if cfg.type_vocab_size:
            types = jnp.zeros_like(inputs) if token_types is None else token_types
            x = x + self.token_type_embedding(types)
        self.sow("intermediates", "embeddings", x)
        x = self.embedding_dropout(self.embedding_norm(x), deterministic=deterministic)
        mask = self_attention_mask(segment_ids, causal=False)
        hidden = self.encoder(x, mask, rotary, deterministic=deterministic)
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


def explain_prelude(cfg: ModelConfig, inter: dict, ids, S) -> tuple[list, object]:
    """`magic explain`'s stages before the walked layer: the embedding sum (with segments) and
    BERT's LayerNorm of it, which is the encoder's input."""
    tokens = captured(inter, "token_embedding", "__call__", 0)
    stages = token_stages(cfg, ids, tokens, captured(inter, "position_embedding", "__call__", 0), S)
    if cfg.type_vocab_size:
        stages.append(S("token type embeddings", "segment A/B table T[type]",
                        captured(inter, "token_type_embedding", "__call__", 0)))
    formula = embedding_formula(cfg, "X = E[ids] + P")
    stages.append(S("embeddings (sum)", formula + (" + T" if cfg.type_vocab_size else ""),
                    captured(inter, "embeddings", 0)))
    normed = captured(inter, "embedding_norm", "__call__", 0)
    norm = norm_name(cfg)
    stages.append(S(f"embedding {norm}", f"{norm}(X): BERT normalizes the embedding sum", normed))
    return stages, normed


def explain_head(cfg: ModelConfig, inter: dict, batch: int, length: int, S) -> list:
    """BERT's prediction-head transform, between the last layer and the output layer."""
    return [S("MLM transform", f"{norm_name(cfg)}(act(h W + b)): BERT's prediction-head transform",
              captured(inter, "mlm_head", "transform_norm", "__call__", 0), 2 * batch * length * cfg.d_model ** 2)]
