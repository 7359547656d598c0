"""Sharded init and jit-compiled steps for a TrainConfig.

Sharded init, as in Flax's lm1b: `jax.eval_shape` gives the state's shapes and
logical axes -> the rule table turns them into NamedShardings -> `jax.jit(init,
out_shardings=...)` creates every array directly in its shards, so no device
ever holds a whole unsharded copy.

Activation constraints (`nn.with_logical_constraint` in the model) need two
things at trace time: the rule table (`nn.logical_axis_rules`) and a mesh.
`jax.set_mesh` is not allowed inside jit, so the traced step enters
`jax.sharding.use_abstract_mesh`; without either (single-device callers, tests)
the constraints are no-ops.
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
from sharding.rules import mesh_axes_of, rules_for
from sharding.validate import validate_mesh
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
        """Global arrays from this process's rows of the batch (batch_size / process_count of
        them: the pipeline's slice for this host); each device keeps only its own rows."""
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


def sharded_abstract_state(model_config, tx, shardings) -> TrainState:
    """ShapeDtypeStructs of the whole state with their shardings: no memory allocated."""
    abstract = jax.eval_shape(lambda: create_train_state(model_config, tx, jax.random.PRNGKey(0)))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batch_sharding_for(mesh, rules) -> NamedSharding:
    """Rows of every batch array split over the mesh axes of the 'batch' rule."""
    axes = mesh_axes_of("batch", rules)
    return NamedSharding(mesh, P(axes if axes else None))


def with_rules(fn, mesh, rules):
    """fn traced with the rule table and the mesh in context, so the model's
    logical activation constraints become sharding constraints."""
    def wrapped(*args):
        with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)
    return wrapped


def shard_run(config, tx, step_fn, eval_fn, devices=None) -> ShardedRun:
    """Mesh, shardings and jitted init/train/eval steps for `config`.

    `devices`: None for jax.devices(); a subset (tests) or TPU topology devices to
    AOT-compile (sharding/aot.py). Mesh errors are raised here, before compiling.
    """
    devices = jax.devices() if devices is None else list(devices)
    validate_mesh(config, len(devices), jax.process_count())
    mesh = make_mesh(config.mesh, devices)
    rules = rules_for(config.mesh)
    shardings = state_shardings(config.model, tx, mesh, rules)
    batch_sharding = batch_sharding_for(mesh, rules)
    abstract = sharded_abstract_state(config.model, tx, shardings)

    init = jax.jit(partial(create_train_state, config.model, tx), out_shardings=shardings)
    train = jax.jit(with_rules(step_fn, mesh, rules), in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, None), donate_argnums=0)
    evaluate = jax.jit(with_rules(partial(eval_fn, config=config), mesh, rules),
                       in_shardings=(shardings.params, batch_sharding))
    return ShardedRun(mesh, rules, shardings, batch_sharding, abstract, init, train, evaluate)


def train_run(config, devices=None):
    """(tx, ShardedRun) with THE train step: what `magic train` runs and `magic compile`
    AOT-lowers (sharding/aot.py). One place composes it, so the two can never differ."""
    from train.guards import skip_nonfinite
    from train.step import bind_train_step, eval_step

    tx, step_fn = bind_train_step(config)
    return tx, shard_run(config, tx, skip_nonfinite(step_fn), eval_step, devices)  # NaN/Inf steps keep the old state
