"""The gated feed-forward network, SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer").

    FFN(x) = (silu(x W_gate) * (x W_up)) W_down,    silu(z) = z * sigmoid(z)

One projection is passed through the nonlinearity and multiplies the other element
by element, a learned gate on every hidden unit. It has three matrices where the
plain FFN has two, so at equal parameters d_ff shrinks by 2/3: Llama's rule is
d_ff = 256 * ceil((8/3 d_model) / 256) (Touvron et al. 2023, section 2.2; 11008 for
d_model 4096), and Llama 2 70B / Llama 3 state theirs outright (28672 for 8192).
`model.activation=swiglu` selects it; `swiglu_d_ff` computes the rule.
Parameter names follow the plain FFN's: `hidden` is Llama's up_proj, `output` its
down_proj, and `gate` is new.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from matrixmagic.configs import ModelConfig

from .linear import Linear
from .params import EMBED_ACTIVATION, MLP_ACTIVATION, constrain


def swiglu_d_ff(d_model: int, multiple_of: int = 256, multiplier: float = 1.0) -> int:
    """Llama's hidden width: 2/3 of 4 d_model (equal parameters to a 4 d_model plain FFN),
    times an optional multiplier, rounded up to a multiple of `multiple_of`."""
    hidden = int(multiplier * int(2 * 4 * d_model / 3))
    return multiple_of * math.ceil(hidden / multiple_of)


def gated_feed_forward_params(config: ModelConfig) -> int:
    """W_gate and W_up [d, d_ff], W_down [d_ff, d], and their biases."""
    d, f = config.d_model, config.d_ff
    return 3 * d * f + (2 * f + d) * int(config.use_bias)


class GatedFeedForward(nn.Module):
    config: ModelConfig
    out_init_std: Optional[float] = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config

        def up(name: str) -> jnp.ndarray:
            return Linear((cfg.d_model,), (cfg.d_ff,), ("embed", "mlp"), cfg.use_bias, cfg.init_std, cfg.dtype,
                          cfg.param_dtype, name=name)(x)

        gate = constrain(jax.nn.silu(up("gate")), MLP_ACTIVATION)
        hidden = constrain(gate * up("hidden"), MLP_ACTIVATION)
        self.sow("intermediates", "gate_activated", gate)
        self.sow("intermediates", "activated", hidden)
        out = Linear((cfg.d_ff,), (cfg.d_model,), ("mlp", "embed"), cfg.use_bias,
                     self.out_init_std or cfg.init_std, cfg.dtype, cfg.param_dtype, name="output")(hidden)
        return constrain(out, EMBED_ACTIVATION)  # hidden summed: the all-reduce over tensor
