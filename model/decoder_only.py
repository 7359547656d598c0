"""Decoder-only language model (GPT-2 / GPT-3).

tokens -> token embedding + learned positions -> dropout -> N x DecoderLayer
(causal self-attention, no cross attention) -> final LayerNorm (pre-LN) ->
logits over the vocabulary (tied to the token embedding).
Under context parallelism (context.py) the token ids, positions and segment ids are striped on
entry and the final hidden states put back in order before the output head.
Llama is the same model with its options: rotary positions turning Q and K in each
layer instead of a table added here, RMSNorm, SwiGLU, grouped-query attention, no
biases and an untied output layer (configs/presets.py: llama-*).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import linen as nn

from matrixmagic.configs import ModelConfig

from . import context
from .add_norm import final_norm_params, norm_layer
from .dropout import Dropout
from .embeddings import TokenEmbedding, token_table_params
from .layers import DecoderLayer, decoder_layer_params
from .masks import self_attention_mask
from .output_head import OutputHead, unembedding_params
from .positional import default_positions, embed_positions, position_table_params
from .stack import LayerStack
from .stages import Pipeline
from .walk import captured, embedding_formula, final_norm_stages, token_stages


def closed_form_params(cfg: ModelConfig) -> dict[str, int]:
    """GPT: embeddings, N decoder layers (no cross attention), the final norm, the final linear."""
    model = (token_table_params(cfg) + position_table_params(cfg) + cfg.num_layers * decoder_layer_params(cfg, False)
             + final_norm_params(cfg) + unembedding_params(cfg))
    return {"model": model, "mlm_head": 0}


class DecoderOnlyLM(nn.Module):
    config: ModelConfig
    pipeline: Optional[Pipeline] = None  # pipeline parallelism's schedule (model/stages.py)

    @nn.compact
    def __call__(self, inputs: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
                 segment_ids: Optional[jnp.ndarray] = None, deterministic: bool = True,
                 decode: bool = False, logits_at: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """inputs [B, T] token ids -> logits [B, T, vocab] (float32).

        decode=True (generation, mutable=['cache']): self-attention reads and writes the
        KV cache, which masks causally by itself; positions [B, T] must then be given.
        logits_at [B, K] (scoring): logits at those positions only, [B, K, vocab]. The final
        linear is d_model x vocab per position, nearly half of GPT-2 small's FLOPs per token,
        and scoring a continuation needs it at the continuation's positions alone.
        """
        cfg = self.config
        if decode and positions is None:
            raise ValueError("decode=True needs positions= ([B, T] absolute positions of the new tokens, "
                             "equal to each row's cache slots); model/generate.py passes them.")
        positions = default_positions(inputs) if positions is None else positions
        _, shards = (1, 1) if decode else context.context_split()
        order = None
        if shards > 1:  # load-balanced striping: each context shard one early and one late chunk
            order = context.stripe_order(inputs.shape[1], shards)
            inputs, positions = context.stripe(inputs, shards), context.stripe(positions, shards)
            segment_ids = None if segment_ids is None else context.stripe(segment_ids, shards)
        token_embedding = TokenEmbedding(cfg, name="token_embedding")
        tokens = token_embedding(inputs)
        x, rotary = embed_positions(cfg, tokens, positions, "position_embedding")
        self.sow("intermediates", "embeddings", x)
        x = Dropout(cfg.dropout_rate, deterministic)(x)

        mask = None if decode else self_attention_mask(segment_ids, True, order)  # decoding: the cache masks
        stack = LayerStack(cfg, DecoderLayer, layer_kwargs=(("scaled_residual_init", True),),
                           pipeline=self.pipeline, name="decoder")
        x = stack(x, mask, None, None, rotary, deterministic=deterministic, decode=decode)
        if cfg.norm_position == "pre":
            x = norm_layer(cfg, "final_norm")(x)
        x = context.unstripe(x, shards)  # back in order: targets and the loss never see the striping
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        shared = token_embedding if cfg.tie_embeddings else None
        return OutputHead(cfg, shared, name="output_head")(x)


def explain_prelude(cfg: ModelConfig, inter: dict, ids, S) -> tuple[list, object]:
    """`magic explain`'s stages before the walked layer, and that stack's input: E[ids] + P."""
    tokens = captured(inter, "token_embedding", "__call__", 0)
    positions = captured(inter, "position_embedding", "__call__", 0)
    total = captured(inter, "embeddings", 0)
    formula = embedding_formula(cfg, "X = E[ids] + P")
    return token_stages(cfg, ids, tokens, positions, S) + [S("embeddings (sum)", formula, total)], total


def explain_head(cfg: ModelConfig, inter: dict, batch: int, length: int, S) -> list:
    """Stages between the last layer and the final linear."""
    return final_norm_stages(cfg, inter, "final_norm", S)
