"""From logical axis names to NamedShardings, and tracing under the rule table.

Sharded init, as in Flax's lm1b: `jax.eval_shape` gives every parameter's shape
and logical axes -> the rule table (rules.py) turns them into NamedShardings ->
`jax.jit(init, out_shardings=...)` creates each array directly in its shards, so
no device ever holds a whole unsharded copy. train/run.py does that for the
train state; this module knows nothing of training.

Activation constraints (`nn.with_logical_constraint` in the model) need two
things at trace time: the rule table (`nn.logical_axis_rules`) and a mesh.
`jax.set_mesh` is not allowed inside jit, so a traced function enters
`jax.sharding.use_abstract_mesh` (`with_rules`); without either (single-device
callers, tests) the constraints are no-ops.
"""

from __future__ import annotations

import jax
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from matrixmagic.model import context
from matrixmagic.model.build import abstract_variables

from .rules import mesh_axes_of


def param_shardings(model_config, mesh, rules):
    """NamedShardings of every parameter, from its logical axis names."""
    specs = nn.get_partition_spec(abstract_variables(model_config)["params"])
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding_for(mesh, rules) -> NamedSharding:
    """Rows of every batch array split over the mesh axes of the 'batch' rule."""
    axes = mesh_axes_of("batch", rules)
    return NamedSharding(mesh, P(axes if axes else None))


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying their shardings (for restore and AOT lowering): no memory."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def with_rules(fn, mesh, rules, context_attention: str = "all_gather"):
    """fn traced with the rule table and the mesh in context, so the model's
    logical activation constraints become sharding constraints; a sequence split over
    the `context` axis attends as `context_attention` says (model/context.py)."""
    def wrapped(*args):
        with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
                context.using(context_attention):
            return fn(*args)
    return wrapped
