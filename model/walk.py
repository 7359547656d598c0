"""The pieces `magic explain` walks a forward pass with, shared by explain.py and the family
modules, each of which names its own embedding and head stages (model/families.py).

A `Stage` is one matrix of the pass; `captured` reads a module output or sown value out of
the intermediates flax recorded; `add` repeats the one addition a model does inline, for
arrays and shape structs alike (shape-only walks run under `jax.eval_shape`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from matrixmagic.configs import ModelConfig

from .add_norm import NORMS
from .positional import positional_kind
from .rotary import Rotary


@dataclasses.dataclass(frozen=True)
class Stage:
    """One matrix of the forward pass. value is None on shape-only runs."""

    name: str
    formula: str
    shape: tuple
    dtype: str
    flops: Optional[int] = None  # of the matmul that produced it, whole batch, all heads
    value: Any = None
    head_axis: Optional[int] = None  # per-head matrices: which axis indexes the heads
    note: str = ""

    @property
    def per_head_shape(self) -> tuple:
        if self.head_axis is None:
            return self.shape
        return self.shape[: self.head_axis] + self.shape[self.head_axis + 1:]


def stage(name, formula, x, flops=None, head_axis=None, note="", shapes_only=False) -> Stage:
    return Stage(name, formula, tuple(x.shape), str(jnp.dtype(x.dtype)), flops,
                 None if shapes_only else np.asarray(x), head_axis, note)


def captured(tree: dict, *path):
    """A captured module output or sown value (both are stored as tuples of calls)."""
    for key in path:
        tree = tree[key]
    return tree


def add(a, b):
    """a + b for arrays and shape structs alike (the residual adds the model does inline)."""
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(jnp.broadcast_shapes(a.shape, b.shape), jnp.result_type(a.dtype, b.dtype))
    return a + b


def _pick(x, index: int):
    """x[index] for arrays and shape structs alike."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[index]


def layer_tree(inter: dict, stack: str, n: int, config: ModelConfig) -> dict:
    """The intermediates of layer n of a stack, scanned (stacked on axis 0) or unrolled."""
    if config.scan_layers:
        return jax.tree_util.tree_map(lambda x: _pick(x, n), inter[stack]["layers"],
                                      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return inter[stack][f"layer_{n}"]


def layer_output(inter, stack, n, config):
    return captured(layer_tree(inter, stack, n, config), "__call__", 0, 0)


def norm_name(cfg: ModelConfig) -> str:
    """'LayerNorm' or 'RMSNorm': what the formulas call the model's normalization."""
    return NORMS[cfg.norm][0].__name__


def token_stages(cfg: ModelConfig, ids, tokens, positions, S, note: str = "") -> list:
    """The first three stages every family shows: ids, their embedding rows, the positions' vectors
    (rotary positions: the cosines of their angles, [B, T, d_k / 2])."""
    scale = " x sqrt(d_model)" if cfg.scale_embeddings else ""
    shown = positions.cos if isinstance(positions, Rotary) else positions
    return [
        S("tokens", f"ids [B, T]: token ids, rows 0..{cfg.vocab_size - 1} of the table{note}", ids),
        S("token embeddings", f"E[ids]{scale}: rows of the [vocab, d_model] table (a lookup, no matmul)", tokens),
        S("positional encodings", positional_kind(cfg).formula, shown),
    ]


def embedding_formula(cfg: ModelConfig, formula: str) -> str:
    """`formula` for models whose positions are added, else what rope's embedding stage is."""
    if positional_kind(cfg).additive:
        return formula
    return "X = E[ids] (rotary positions add nothing here: they turn Q and K in every layer)"


def embedding_sum(cfg: ModelConfig, tokens, positions, formula: str) -> tuple[Any, str]:
    """The stack's input and its formula: tokens + positions, or the tokens alone when the
    positions rotate Q and K inside attention instead (rope)."""
    summed = add(tokens, positions) if positional_kind(cfg).additive else tokens
    return summed, embedding_formula(cfg, formula)


def final_norm_stages(cfg: ModelConfig, inter: dict, name: str, S) -> list:
    """A pre-LN stack's closing norm, when it has one."""
    if cfg.norm_position != "pre":
        return []
    norm = norm_name(cfg)
    return [S(f"final {norm}", f"pre-LN stacks end with one more {norm}", captured(inter, name, "__call__", 0))]
