"""From a ModelConfig to a Flax module, its inputs and its parameters.

`abstract_variables` runs `model.init` under `jax.eval_shape`: shapes, dtypes and
logical axis names of every parameter, with no memory allocated. That is how
GPT-3 175B is counted on a laptop and how sharding/ derives partition specs.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from matrixmagic.configs import ModelConfig

from .families import family_of
from .stages import Pipeline


def build_model(config: ModelConfig, pipeline: Optional[Pipeline] = None) -> nn.Module:
    """The family's model; `pipeline` (decoder-only: configs/pipeline.py checks) runs its layer
    stack as pipeline stages (stages.py) in training, with the same params."""
    if pipeline is None:
        return family_of(config).model(config)
    return family_of(config).model(config, pipeline=pipeline)


def example_inputs(config: ModelConfig, batch: int = 1, length: int | None = None) -> dict:
    """Zero token ids of the right shapes, as keyword arguments of the model's __call__."""
    length = length or min(config.max_len, 8)
    ids = jnp.zeros((batch, length), jnp.int32)
    return {key: ids for key in family_of(config).token_inputs}


def init_variables(config: ModelConfig, rng: jax.Array, batch: int = 1, length: int | None = None):
    """Variables with logical-axis metadata (boxed nn.Partitioned leaves). The parameters do not
    depend on how attention is computed, so a splash model initializes through the dense path:
    the kernel's blocks need lengths of 128s, the example inputs are short."""
    model = build_model(config.replace(attention_impl="matrices") if config.attention_impl == "splash" else config)
    return model.init({"params": rng, "dropout": rng}, **example_inputs(config, batch, length))


def abstract_variables(config: ModelConfig):
    """jax.ShapeDtypeStruct of every variable, boxed with logical axes: no memory allocated."""
    return jax.eval_shape(lambda rng: init_variables(config, rng), jax.random.key(0))


def init_params(config: ModelConfig, rng: jax.Array):
    """Plain pytree (nested dicts of arrays) of parameters."""
    return nn.meta.unbox(init_variables(config, rng)["params"])
