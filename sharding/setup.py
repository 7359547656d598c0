"""Sharded init and jit-compiled steps for a TrainConfig.

Sharded init, as in Flax's lm1b: `jax.eval_shape` gives the state's shapes and
logical axes -> the rule table turns them into NamedShardings -> `jax.jit(init,
out_shardings=...)` creates every array directly in its shards, so no device
ever holds a whole unsharded copy.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import jax
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from model.build import abstract_variables
from sharding.mesh import make_mesh
from sharding.rules import logical_rules
from train.state import TrainState, create_train_state


@dataclasses.dataclass
class ShardedRun:
    mesh: Any
    rules: tuple
    state_shardings: Any
    batch_sharding: NamedSharding
    abstract_state: Any  # ShapeDtypeStructs carrying their shardings (for restore / AOT)
    init_state: Callable
    train_step: Callable
    eval_step: Callable

    def put_batch(self, batch: dict) -> dict:
        """Global arrays from this process's rows of the batch."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}


def param_shardings(model_config, mesh, rules):
    specs = nn.get_partition_spec(abstract_variables(model_config)["params"])
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def state_shardings(model_config, tx: optax.GradientTransformation, mesh, rules) -> TrainState:
    params = param_shardings(model_config, mesh, rules)
    replicated = NamedSharding(mesh, P())
    abstract = jax.eval_shape(lambda: create_train_state(model_config, tx, jax.random.PRNGKey(0)))
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, params,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params, opt_state=opt, rng=replicated)


def shard_run(config, tx, step_fn, eval_fn) -> ShardedRun:
    mesh = make_mesh(config.mesh)
    rules = logical_rules(config.mesh.layout)
    shardings = state_shardings(config.model, tx, mesh, rules)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    abstract = jax.eval_shape(lambda: create_train_state(config.model, tx, jax.random.PRNGKey(0)))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    def with_rules(fn):
        def wrapped(*args):
            with nn.logical_axis_rules(rules):
                return fn(*args)
        return wrapped

    init = jax.jit(partial(create_train_state, config.model, tx), out_shardings=shardings)
    train = jax.jit(with_rules(step_fn), in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, None), donate_argnums=0)
    evaluate = jax.jit(with_rules(partial(eval_fn, config=config)),
                       in_shardings=(shardings.params, batch_sharding))
    return ShardedRun(mesh, rules, shardings, batch_sharding, abstract, init, train, evaluate)
