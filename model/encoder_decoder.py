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

from .add_norm import LayerNorm
from .dropout import Dropout
from .embeddings import TokenEmbedding
from .layers import DecoderLayer, EncoderLayer
from .masks import cross_attention_mask, self_attention_mask
from .output_head import OutputHead
from .positional import default_positions, positional_encoding
from .stack import LayerStack


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
            self.encoder_norm = LayerNorm(cfg)
            self.decoder_norm = LayerNorm(cfg)
        self.output_head = OutputHead(cfg, self.shared_embedding if cfg.tie_embeddings else None)

    def _embed(self, ids, positions, deterministic):
        positions = default_positions(ids) if positions is None else positions
        x = self.shared_embedding(ids) + self.positional(positions)
        return self.dropout(x, deterministic=deterministic)

    def encode(self, encoder_inputs: jnp.ndarray, encoder_positions: Optional[jnp.ndarray] = None,
               encoder_segment_ids: Optional[jnp.ndarray] = None, deterministic: bool = True) -> jnp.ndarray:
        """source ids [B, S] -> encoder output [B, S, d]."""
        x = self._embed(encoder_inputs, encoder_positions, deterministic)
        mask = self_attention_mask(encoder_segment_ids, causal=False)
        x = self.encoder(x, mask, deterministic=deterministic)
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
        x = self._embed(decoder_inputs, decoder_positions, deterministic)
        self_mask = None if decode else self_attention_mask(decoder_segment_ids, causal=True)
        cross_mask = cross_attention_mask(None if decode else decoder_segment_ids, encoder_segment_ids)
        if decode:  # a step's few queries: the dense path (attention_impl='splash' needs lengths of 128s)
            cross_mask = cross_mask.dense(decoder_inputs.shape[1], encoded.shape[1])
        x = self.decoder(x, self_mask, encoded, cross_mask, deterministic=deterministic, decode=decode)
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
