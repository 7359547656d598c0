"""One Transformer layer of each kind, built from the sublayers.

EncoderLayer: self-attention (bidirectional) -> FFN. Used by BERT and by the
  encoder of the encoder-decoder.
DecoderLayer: masked self-attention -> [cross attention to the encoder] -> FFN.
  Used by GPT (no cross attention) and by the encoder-decoder's decoder.
Every sublayer is wrapped by `add_and_norm` (residual + norm, pre or post).
`rotary` (positional=rope: the angles of rotary.py) turns the self-attention's
queries and keys; cross attention relates two sequences and is not rotated.
Layers return (x, None) so `nn.scan` can stack them.
"""

from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
from flax import linen as nn

from matrixmagic.configs import ModelConfig

from .add_norm import add_and_norm, norm_layer, norm_params
from .attention import Mask, MultiHeadAttention, attention_params
from .dropout import Dropout
from .feed_forward import feed_forward, feed_forward_params
from .params import EMBED_ACTIVATION, constrain
from .rotary import Rotary


def residual_init_std(cfg: ModelConfig, scaled: bool) -> Optional[float]:
    """GPT-2 (Radford et al. 2019, section 2.3) scales residual-path weights by 1/sqrt(N),
    N = 2 x layers (two residual sublayers each); a model that does not keeps init_std (None)."""
    return cfg.init_std / math.sqrt(2 * cfg.num_layers) if scaled else None


def encoder_layer_params(cfg: ModelConfig) -> int:
    """Self-attention and FFN, each with its norm."""
    return attention_params(cfg) + feed_forward_params(cfg) + 2 * norm_params(cfg)


def decoder_layer_params(cfg: ModelConfig, cross_attention: bool) -> int:
    """An encoder layer's parts, plus cross attention and its norm when the decoder reads an encoder."""
    return encoder_layer_params(cfg) + (attention_params(cfg) + norm_params(cfg) if cross_attention else 0)


class _Layer(nn.Module):
    config: ModelConfig
    deterministic: bool = True
    scaled_residual_init: bool = False  # GPT-2's 1/sqrt(2 N) on the residual-path outputs

    def sublayer(self, name: str, x: jnp.ndarray, fn) -> jnp.ndarray:
        cfg = self.config
        norm = norm_layer(cfg, f"{name}_norm")
        dropout = Dropout(cfg.dropout_rate, self.deterministic)
        return constrain(add_and_norm(x, fn, norm, dropout, cfg.norm_position), EMBED_ACTIVATION)


class EncoderLayer(_Layer):
    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: Mask, rotary: Optional[Rotary] = None):
        cfg, det = self.config, self.deterministic
        residual_std = residual_init_std(cfg, self.scaled_residual_init)
        attention = MultiHeadAttention(cfg, det, residual_std, name="self_attention")
        x = self.sublayer("self_attention", x, lambda h: attention(h, h, mask, rotary))
        ffn = feed_forward(cfg, residual_std, "feed_forward")
        x = self.sublayer("feed_forward", x, ffn)
        return x, None


class DecoderLayer(_Layer):
    cross_attention: bool = False
    decode: bool = False  # KV-cached self-attention for generation (cross attention recomputes)

    @nn.compact
    def __call__(self, x: jnp.ndarray, self_mask: Mask, encoded: Optional[jnp.ndarray] = None,
                 cross_mask: Mask = None, rotary: Optional[Rotary] = None):
        cfg, det = self.config, self.deterministic
        residual_std = residual_init_std(cfg, self.scaled_residual_init)
        attention = MultiHeadAttention(cfg, det, residual_std, self.decode, name="self_attention")
        x = self.sublayer("self_attention", x, lambda h: attention(h, h, self_mask, rotary))
        if self.cross_attention:
            if encoded is None:  # the attention below would fail on None: say why instead
                raise ValueError("a DecoderLayer with cross_attention=True needs encoded= (the encoder output)")
            # Queries from the decoder, keys and values from the encoder output.
            cross = MultiHeadAttention(cfg, det, name="cross_attention")
            x = self.sublayer("cross_attention", x, lambda h: cross(h, encoded, cross_mask))
        ffn = feed_forward(cfg, residual_std, "feed_forward")
        x = self.sublayer("feed_forward", x, ffn)
        return x, None
