"""Positional encodings: attention is order-blind, so each position gets a vector.

Three kinds. Two are added element-wise to the token embeddings:
- fixed sinusoids (Vaswani et al. 2017, section 3.5):
    PE[pos, 2i] = sin(pos / 10000^(2i/d)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/d));
- a learned [max_len, d_model] table (GPT-2/3, BERT).
The third, rotary (rotary.py: Llama), adds nothing: it turns queries and keys inside
every self-attention sublayer, so `embed_positions` hands its angles to the layers.
All take explicit positions, so packed documents can restart at 0.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union, cast

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from matrixmagic.configs import ModelConfig
from matrixmagic.configs.model_config import POSITIONAL

from .params import EMBED_ACTIVATION, constrain, logical_param, normal
from .rotary import Rotary, RotaryEmbedding, rope_frequencies


def sinusoidal_encoding(max_len: int, d_model: int) -> np.ndarray:
    """The [max_len, d_model] table of section 3.5: sines in even columns, cosines in odd."""
    positions = np.arange(max_len, dtype=np.float64)[:, None]
    div = np.power(10000.0, np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    table = np.zeros((max_len, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(positions / div)
    table[:, 1::2] = np.cos(positions / div[: d_model // 2])
    return table.astype(np.float32)


class SinusoidalPositionalEncoding(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, positions: jnp.ndarray) -> jnp.ndarray:
        table = jnp.asarray(sinusoidal_encoding(self.config.max_len, self.config.d_model))
        return jnp.take(table, positions, axis=0).astype(self.config.dtype)


class LearnedPositionalEmbedding(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, positions: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        table = logical_param(self, "embedding", normal(cfg.init_std), (cfg.max_len, cfg.d_model),
                              ("position", "embed"), cfg.param_dtype)
        table = constrain(table, ("position", None))  # FSDP: gather d_model before the row lookup
        return constrain(jnp.take(table, positions, axis=0).astype(cfg.dtype), EMBED_ACTIVATION)


@dataclasses.dataclass(frozen=True)
class PositionalKind:
    """What one `model.positional` value owns, so accounting, explain and the plots ask it
    instead of branching on the name: a new kind is one record here."""

    module: type  # the flax module, built as module(config, name=...)
    learned_rows: Callable[[ModelConfig], int]  # rows of its trained [rows, d_model] table (0: no weights)
    formula: str  # how explain shows it
    fixed_table: Optional[Callable[[ModelConfig], np.ndarray]] = None  # a table known without weights
    additive: bool = True  # added to the token embeddings (else: rotary angles for the attention sublayers)
    table_axis: str = ""  # the fixed table's column meaning and its picture's title (model/plots.py)
    table_title: str = ""


POSITIONAL_KINDS: dict[str, PositionalKind] = {
    "learned": PositionalKind(LearnedPositionalEmbedding, lambda cfg: cfg.max_len,
                              "learned table P[pos], [max_len, d_model]"),
    "sinusoidal": PositionalKind(SinusoidalPositionalEncoding, lambda cfg: 0,
                                 "sinusoids PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...)",
                                 lambda cfg: sinusoidal_encoding(cfg.max_len, cfg.d_model),
                                 table_axis="embedding dimension i (even: sin, odd: cos)",
                                 table_title="sinusoidal positional encoding PE[pos, i], d_model={d_model}"),
    "rope": PositionalKind(RotaryEmbedding, lambda cfg: 0,
                           "rotary: Q and K pairs (i, i + d_k/2) turned by pos * theta^(-2i/d_k) in every self-attention",
                           lambda cfg: np.cos(np.arange(cfg.max_len)[:, None] * rope_frequencies(cfg)),
                           additive=False, table_axis="rotated pair i (frequency theta^(-2i/d_k), fast to slow)",
                           table_title="rotary angles cos(pos * w_i), head_dim={head_dim}, theta={rope_theta:g}"),
}


def positional_kind(config: ModelConfig) -> PositionalKind:
    return POSITIONAL_KINDS[config.positional]


def position_table_params(config: ModelConfig) -> int:
    """Trained position parameters (a lookup: they cost memory, not matmul FLOPs)."""
    return positional_kind(config).learned_rows(config) * config.d_model


def positional_encoding(config: ModelConfig, name: Optional[str]) -> nn.Module:
    return positional_kind(config).module(config, name=name)


def embed_positions(config: ModelConfig, tokens: jnp.ndarray, positions: jnp.ndarray, name: Optional[str],
                    module: Optional[nn.Module] = None) -> tuple[jnp.ndarray, Optional[Rotary]]:
    """(the stack's input, the rotary angles or None): token embeddings plus the position
    vectors of an additive kind, or the tokens alone and the angles for attention (rope).
    `module`: an already built positional module (setup-style models), else one named `name`."""
    encoded: Union[jnp.ndarray, Rotary] = (module or positional_encoding(config, name))(positions)
    if positional_kind(config).additive:  # the record says which, as it does for explain and accounting
        return tokens + cast(jnp.ndarray, encoded), None
    return tokens, cast(Rotary, encoded)


def default_positions(ids: jnp.ndarray) -> jnp.ndarray:
    """0..T-1 for every row: the positions of an unpacked batch."""
    return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)


assert tuple(sorted(POSITIONAL_KINDS)) == tuple(sorted(POSITIONAL)), \
    "one PositionalKind per configs.model_config.Positional"
