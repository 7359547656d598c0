"""Encoder-decoder Transformer (Vaswani et al. 2017).

source tokens -> shared embedding x sqrt(d_model) + sinusoids -> N x EncoderLayer
target tokens -> same embedding + sinusoids -> N x DecoderLayer, each with
  causal self-attention, cross attention to the encoder output, and an FFN
-> logits through the shared embedding (three-way tying, section 3.4).
`encode` and `decode` are separate methods so generation encodes once.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import linen as nn

from matrixmagic.configs import ModelConfig

from .add_norm import final_norm_params, norm_layer
from .attention import Mask
from .dropout import Dropout
from .embeddings import TokenEmbedding, token_table_params
from .layers import DecoderLayer, EncoderLayer, decoder_layer_params, encoder_layer_params
from .masks import cross_attention_mask, self_attention_mask
from .output_head import OutputHead, unembedding_params
from .positional import default_positions, embed_positions, position_table_params, positional_encoding
from .stack import LayerStack
from .walk import captured, embedding_sum, final_norm_stages, layer_output, token_stages


def closed_form_params(cfg: ModelConfig) -> dict[str, int]:
    """One shared token table and position table, N encoder and N decoder layers (with cross
    attention), a final norm per stack when pre-LN, the final linear unless tied."""
    layers = cfg.num_layers * (encoder_layer_params(cfg) + decoder_layer_params(cfg, True))
    model = (token_table_params(cfg) + position_table_params(cfg) + layers + 2 * final_norm_params(cfg)
             + unembedding_params(cfg))
    return {"model": model, "mlm_head": 0}


class EncoderDecoderLM(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.shared_embedding = TokenEmbedding(cfg)
        self.positional = positional_encoding(cfg, None)
        self.dropout = Dropout(cfg.dropout_rate)
        self.encoder = LayerStack(cfg, EncoderLayer)
        self.decoder = LayerStack(cfg, DecoderLayer, layer_kwargs=(("cross_attention", True),))
        if cfg.norm_position == "pre":
            self.encoder_norm = norm_layer(cfg)
            self.decoder_norm = norm_layer(cfg)
        self.output_head = OutputHead(cfg, self.shared_embedding if cfg.tie_embeddings else None)

    def _embed(self, ids, positions, deterministic):
        positions = default_positions(ids) if positions is None else positions
        x, rotary = embed_positions(self.config, self.shared_embedding(ids), positions, None, self.positional)
        return self.dropout(x, deterministic=deterministic), rotary

    def encode(self, encoder_inputs: jnp.ndarray, encoder_positions: Optional[jnp.ndarray] = None,
               encoder_segment_ids: Optional[jnp.ndarray] = None, deterministic: bool = True) -> jnp.ndarray:
        """source ids [B, S] -> encoder output [B, S, d]."""
        x, rotary = self._embed(encoder_inputs, encoder_positions, deterministic)
        mask = self_attention_mask(encoder_segment_ids, causal=False)
        x = self.encoder(x, mask, rotary, deterministic=deterministic)
        return self.encoder_norm(x) if self.config.norm_position == "pre" else x

    def decode(self, encoded: jnp.ndarray, decoder_inputs: jnp.ndarray,
               decoder_positions: Optional[jnp.ndarray] = None, decoder_segment_ids: Optional[jnp.ndarray] = None,
               encoder_segment_ids: Optional[jnp.ndarray] = None, deterministic: bool = True,
               decode: bool = False) -> jnp.ndarray:
        """encoder output [B, S, d] + target ids [B, T] -> logits [B, T, vocab] (float32).

        decode=True: decoder self-attention uses the KV cache (mutable=['cache']) and
        decoder_positions must be given; cross attention recomputes K, V from `encoded`.
        """
        if decode and decoder_positions is None:
            raise ValueError("decode=True needs decoder_positions= ([B, T] positions of the new target "
                             "tokens); model/generate.py passes them.")
        x, rotary = self._embed(decoder_inputs, decoder_positions, deterministic)
        self_mask = None if decode else self_attention_mask(decoder_segment_ids, causal=True)
        cross_structure = cross_attention_mask(None if decode else decoder_segment_ids, encoder_segment_ids)
        cross_mask: Mask = cross_structure
        if decode:  # a step's few queries: the dense path (attention_impl='splash' needs lengths of 128s)
            cross_mask = cross_structure.dense(decoder_inputs.shape[1], encoded.shape[1])
        x = self.decoder(x, self_mask, encoded, cross_mask, rotary, deterministic=deterministic, decode=decode)
        if self.config.norm_position == "pre":
            x = self.decoder_norm(x)
        return self.output_head(x)

    def __call__(self, encoder_inputs: jnp.ndarray, decoder_inputs: jnp.ndarray,
                 encoder_positions: Optional[jnp.ndarray] = None, decoder_positions: Optional[jnp.ndarray] = None,
                 encoder_segment_ids: Optional[jnp.ndarray] = None, decoder_segment_ids: Optional[jnp.ndarray] = None,
                 deterministic: bool = True) -> jnp.ndarray:
        encoded = self.encode(encoder_inputs, encoder_positions, encoder_segment_ids, deterministic)
        return self.decode(encoded, decoder_inputs, decoder_positions, decoder_segment_ids,
                           encoder_segment_ids, deterministic)


def explain_prelude(cfg: ModelConfig, inter: dict, ids, S) -> tuple[list, object]:
    """`magic explain` walks the decoder: the shared modules' second call embeds its input, the
    encoder's output (the keys and values of cross attention) comes before its layer."""
    tokens = captured(inter, "shared_embedding", "__call__", 1)
    positions = captured(inter, "positional", "__call__", 1)
    # the model adds these inline; the sum is not sown
    total, formula = embedding_sum(cfg, tokens, positions, "X = E[ids] + PE (dropout is off at inference)")
    stages = token_stages(cfg, ids, tokens, positions, S, note="; decoder input = [bos] + source[:-1]")
    stages.append(S("embeddings (sum)", formula, total))
    encoded = (captured(inter, "encoder_norm", "__call__", 0) if cfg.norm_position == "pre"
               else layer_output(inter, "encoder", cfg.num_layers - 1, cfg))
    stages.append(S("encoder output", f"{cfg.num_layers} encoder layers over the source "
                                      "(the keys and values of cross attention)", encoded))
    return stages, total


def explain_head(cfg: ModelConfig, inter: dict, batch: int, length: int, S) -> list:
    """Stages between the decoder's last layer and the final linear."""
    return final_norm_stages(cfg, inter, "decoder_norm", S)
