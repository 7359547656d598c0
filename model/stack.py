"""A stack of identical layers: scanned (one compiled layer, weights with a
leading 'layers' axis) or unrolled (layer_0, layer_1, ...), with optional
rematerialization.

Scanning keeps compile time flat in depth: the 96-layer GPT-3 compiles about as
fast as a 12-layer model. Remat trades compute for activation memory:
  none                nothing recomputed
  full                save only layer inputs, recompute the whole layer backward
  save_dots           keep every matmul output, recompute the cheap elementwise ops
  save_dots_no_batch  keep matmul outputs without batch dims (weights-like)
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import linen as nn

from matrixmagic.configs import ModelConfig
from matrixmagic.configs.model_config import REMAT_POLICIES as REMAT_NAMES

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

    @nn.compact
    def __call__(self, x, *args, deterministic: bool = True, decode: bool = False):
        cfg = self.config
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
