"""Parameter creation with logical axis names.

Every weight is declared with names such as ('embed', 'heads', 'kv') instead of
mesh axes. sharding/ maps those names to device-mesh axes with one rule table,
so the model code never mentions a mesh.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn


def logical_param(module: nn.Module, name: str, init, shape: tuple, axes: tuple, dtype) -> jnp.ndarray:
    """module.param(...) whose value carries logical axis names for sharding."""
    if len(shape) != len(axes):
        raise ValueError(f"param {name!r}: shape {shape} and axes {axes} differ in rank")
    # unbox=True is the default; spelled out, it selects flax's overload that types the result as the
    # array rather than the LogicallyPartitioned box the initializer returns.
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(dtype), unbox=True)


def normal(std: float):
    return nn.initializers.normal(stddev=std)


# Logical names of activations (sharding/rules.py maps them; weights use their own names).
# The residual stream [batch, length, d_model] names its length apart from the blocks' inputs, so a
# rule table can split it further between the blocks (sequence parallelism) than inside them.
EMBED_ACTIVATION = ("activation_batch", "activation_residual_length", "activation_embed")
HEADS_ACTIVATION = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
MLP_ACTIVATION = ("activation_batch", "activation_length", "activation_mlp")
VOCAB_ACTIVATION = ("activation_batch", "activation_length", "activation_vocab")


def constrain(x: jnp.ndarray, axes: tuple) -> jnp.ndarray:
    """Pin an activation's layout by logical names, so XLA keeps the batch split and
    splits heads/MLP over `tensor` (Megatron) instead of guessing. A no-op unless a
    rule table and a mesh are in context (train/run.py provides both (sharding/partition.py: with_rules))."""
    return nn.with_logical_constraint(x, axes)
