"""A stack of identical layers: scanned (one compiled layer, weights with a
leading 'layers' axis) or unrolled (layer_0, layer_1, ...), with optional
rematerialization.

Scanning keeps compile time flat in depth: the 96-layer GPT-3 compiles about as
fast as a 12-layer model. Remat trades compute for activation memory:
  none                nothing recomputed
  full                save only layer inputs, recompute the whole layer backward
  save_dots           keep every matmul output, recompute the cheap elementwise ops
  save_dots_no_batch  keep matmul outputs without batch dims (weights-like)
With `pipeline` set (train/step.py, when mesh.stage > 1) a scanned stack's training forward
runs its layers through stages.py's schedule instead; init, decoding and the params are
the scanned stack's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import jax
from flax import linen as nn

from matrixmagic.configs import ModelConfig
from matrixmagic.configs.model_config import REMAT_POLICIES as REMAT_NAMES

from .stages import Pipeline, pipeline_apply

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
assert ("none", *REMAT_POLICIES) == REMAT_NAMES, "one jax policy per configs.model_config.RematPolicy but 'none'"


class LayerStack(nn.Module):
    config: ModelConfig
    layer: type  # EncoderLayer or DecoderLayer
    layer_kwargs: tuple = ()  # extra static fields, e.g. (("cross_attention", True),)
    pipeline: Optional[Pipeline] = None  # stages.py's schedule for the training forward

    @nn.compact
    def __call__(self, x, *args, deterministic: bool = True, decode: bool = False):
        cfg = self.config
        pipeline = self.pipeline
        if pipeline is not None and cfg.scan_layers and not decode and not self.is_initializing():
            return self.pipelined(x, args, deterministic, pipeline)
        layer_cls = self.layer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        kwargs = dict(self.layer_kwargs, **({"decode": True} if decode else {}))  # KV cache: DecoderLayer
        if cfg.scan_layers:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0, "intermediates": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * len(args),
                length=cfg.num_layers,
                unroll=cfg.scan_unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(cfg, deterministic, **kwargs, name="layers")(x, *args)
            return x
        for i in range(cfg.num_layers):
            x, _ = layer_cls(cfg, deterministic, **kwargs, name=f"layer_{i}")(x, *args)
        return x


    def pipelined(self, x, args: tuple, deterministic: bool, pipeline: Pipeline):
        """The scanned weights ([L, ...] under 'layers', created by init's scan) applied by the
        pipeline: each layer an unbound module applied functionally, remat per layer as above."""
        cfg = self.config
        layer = self.layer(cfg, deterministic, **dict(self.layer_kwargs), parent=None)

        def layer_fn(params, h, layer_args, key):
            rngs = {} if key is None else {"dropout": key}
            return layer.apply({"params": params}, h, *layer_args, rngs=rngs)[0]
        if cfg.remat_policy != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        params = nn.meta.unbox(self.variables["params"]["layers"])
        rng = None if deterministic or cfg.dropout_rate == 0 else self.make_rng("dropout")
        return pipeline_apply(layer_fn, params, x, args, pipeline, rng)


def unstack_layers(params, num_layers: int):
    """Params of a scanned model -> the same weights under the names an unrolled one uses:
    each `layers` subtree of [num_layers, ...] arrays becomes layer_0 .. layer_{L-1}."""
    if not isinstance(params, Mapping):
        return params
    out = {}
    for key, value in params.items():
        if key == "layers":
            out.update({f"layer_{i}": jax.tree_util.tree_map(lambda a, i=i: a[i], value)
                        for i in range(num_layers)})
        else:
            out[key] = unstack_layers(value, num_layers)
    return out
