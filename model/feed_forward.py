"""Position-wise feed-forward network: FFN(x) = act(x W1 + b1) W2 + b2.

The same two-layer MLP is applied to every position independently; d_ff is
usually 4 x d_model. ReLU in Vaswani 2017, GELU in BERT and GPT-2/3.
`activation=swiglu` swaps in the gated network of gated_ffn.py (Llama);
`feed_forward` builds whichever the config names and `feed_forward_params` counts it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from matrixmagic.configs import ModelConfig
from matrixmagic.configs.model_config import ACTIVATIONS as ACTIVATION_NAMES

from .gated_ffn import GatedFeedForward, gated_feed_forward_params
from .linear import Linear
from .params import EMBED_ACTIVATION, MLP_ACTIVATION, constrain

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT: exact erf form
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2: tanh approximation
    "swiglu": jax.nn.silu,  # the gate's nonlinearity (elsewhere, e.g. BERT's head transform: silu alone)
}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES, "one function per configs.model_config.Activation"
GATED = ("swiglu",)  # activations that build GatedFeedForward instead of FeedForward


def feed_forward_params(config: ModelConfig) -> int:
    """W_1 [d, d_ff], W_2 [d_ff, d] and their biases (the gated network: its own count)."""
    if config.activation in GATED:
        return gated_feed_forward_params(config)
    d, f = config.d_model, config.d_ff
    return 2 * d * f + (f + d) * int(config.use_bias)


def up_width(config: ModelConfig) -> int:
    """Output columns of the FFN's input-side matrices: d_ff, or 2 d_ff when gated (W_gate and W_up)."""
    return config.d_ff * (2 if config.activation in GATED else 1)


def feed_forward(config: ModelConfig, out_init_std: Optional[float], name: str) -> nn.Module:
    """The FFN sublayer the config asks for."""
    module = GatedFeedForward if config.activation in GATED else FeedForward
    return module(config, out_init_std, name=name)


class FeedForward(nn.Module):
    config: ModelConfig
    out_init_std: Optional[float] = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        hidden = Linear((cfg.d_model,), (cfg.d_ff,), ("embed", "mlp"), cfg.use_bias, cfg.init_std,
                        cfg.dtype, cfg.param_dtype, name="hidden")(x)
        hidden = constrain(ACTIVATIONS[cfg.activation](hidden), MLP_ACTIVATION)
        self.sow("intermediates", "activated", hidden)
        out = Linear((cfg.d_ff,), (cfg.d_model,), ("mlp", "embed"), cfg.use_bias,
                     self.out_init_std or cfg.init_std, cfg.dtype, cfg.param_dtype, name="output")(hidden)
        return constrain(out, EMBED_ACTIVATION)  # hidden summed: the all-reduce over tensor
