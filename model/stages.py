"""Pipeline parallelism over a scanned layer stack, as one SPMD program.

The schedule (configs/pipeline.py): S stages, each running R chunks of K = L / (S R)
layers, on M microbatches, in R M + S - 1 steps. Every step all stages run at once, as
one function vmapped over a leading [S] dim of the activations in flight, which the
rule table splits over the `stage` mesh axis ('activation_stage'); then the activations
move one stage on, `jnp.roll` along that dim, which XLA lowers to a collective-permute
between neighbouring stage devices (the ppermute of GPipe's send/receive). Autodiff
through the loop gives the backward pass (its steps run in reverse: the same bubble), and
each layer keeps its remat policy (`jax.checkpoint` around the one-layer function).
MaxText's `layers/pipeline.py` builds the same loop; this one is written for this model.

Choices, and why:
- Params keep the non-pipelined tree, [L, ...] in model order under 'layers', so a
  checkpoint restores onto any stage count (or none). With R = 1 stage s needs layers
  s K .. s K + K - 1, exactly the block the 'layers' -> 'stage' rule puts on it: no weight
  moves. With R > 1 stage s needs layers r S K + s K + k, strided across the blocks: the
  reshape [L] -> [S, R, K] moves (S - 1) / S of the layer weights once per step (an
  all-to-all before the loop, its transpose for the gradients), not once per iteration.
- Microbatches are strided (row b goes to microbatch b mod M), so each keeps the batch's
  split over data x fsdp; the loss is a mean over rows, so which rows share a microbatch
  does not change it.
- Idle (stage, step) pairs compute on whatever they hold and their results are dropped:
  a masked select is cheaper to express than control flow per stage in SPMD, and costs
  what the bubble formula says.
- Dropout draws one key per (step, stage, layer), so masks differ from the unpipelined
  stack's: equivalence checks run with dropout 0.
- Arguments besides the activations (the attention mask's segment ids, RoPE angles) are
  split into microbatches when they are [B, T, ...] arrays, else passed whole.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from matrixmagic.configs.pipeline import Schedule

from .params import EMBED_ACTIVATION, constrain

STAGE_ACTIVATION = ("activation_stage", *EMBED_ACTIVATION)  # [stages, rows, length, embed] in flight


class Pipeline(NamedTuple):
    schedule: Schedule
    # The mesh axis the rule table gives 'activation_stage' ('stage'), so the vmap over stages
    # keeps that dim split through the layers' own constraints (jax.vmap's spmd_axis_name);
    # None off a mesh. sharding/pipeline_parallel.py reads it from the rules: the model never names one.
    spmd_axis: Optional[str] = None


LayerFn = Callable  # (one layer's params, x [rows, T, D], args, dropout key or None) -> x


def stage_weights(params, schedule: Schedule, spmd_axis: Optional[str] = None):
    """[L, ...] in model order -> [S, R, K, ...]: stage s, repeat r, layer k is layer r S K + s K + k.
    On a mesh the [S] dim is pinned to the stage axis (the other dims left as the rules split
    them): with R > 1 XLA would otherwise keep the split on R and run every stage everywhere."""
    S, R, _ = schedule

    def regroup(a):
        K = a.shape[0] // (S * R)
        w = a.reshape(R, S, K, *a.shape[1:]).swapaxes(0, 1)
        if spmd_axis is None:
            return w
        return jax.lax.with_sharding_constraint(w, P(spmd_axis, *(P.UNCONSTRAINED,) * (w.ndim - 1)))
    return jax.tree.map(regroup, params)


def split_rows(a: jnp.ndarray, M: int) -> jnp.ndarray:
    """[B, ...] -> [M, B / M, ...], microbatch m = rows m, m + M, m + 2M, ..."""
    return a.reshape(a.shape[0] // M, M, *a.shape[1:]).swapaxes(0, 1)


def merge_rows(a: jnp.ndarray) -> jnp.ndarray:
    """The inverse of split_rows."""
    return a.swapaxes(0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def run_stage(layer_fn: LayerFn, weights, x, args, rng):
    """One stage's K layers on its microbatch: a scan over the chunk's [K, ...] weights."""
    K = jax.tree.leaves(weights)[0].shape[0]
    keys = None if rng is None else jax.random.split(rng, K)

    def body(h, layer):
        p, key = layer
        return layer_fn(p, h, args, key), None
    x, _ = jax.lax.scan(body, x, (weights, keys))
    return x


def pipeline_apply(layer_fn: LayerFn, params, x: jnp.ndarray, args: tuple, pipeline: Pipeline,
                   rng: Optional[jax.Array] = None) -> jnp.ndarray:
    """The stack's output for x [B, T, D]: the layers `params` ([L, ...]) applied in order, as
    the pipeline schedule runs them. Same result as scanning the layers (up to rounding)."""
    S, R, M = schedule = pipeline.schedule
    B = x.shape[0]
    weights = stage_weights(params, schedule, pipeline.spmd_axis)  # [S, R, K, ...]
    leaves, treedef = jax.tree.flatten(args)
    # per row: [B, T, ...] (segment ids, RoPE angles); a [T] vector (context striping's token order)
    # is shared by every row even when T happens to equal B
    per_row = [getattr(a, "ndim", 0) > 1 and a.shape[0] == B for a in leaves]
    split_leaves = [split_rows(a, M) if row else a for a, row in zip(leaves, per_row)]
    stages = jnp.arange(S)

    def stage_fn(w, r, h, row_leaves, key):
        it = iter(row_leaves)
        stage_args = jax.tree.unflatten(treedef, [next(it) if row else a for a, row in zip(split_leaves, per_row)])
        chunk = jax.tree.map(lambda a: a[r], w)  # this stage's weights for the repeat it runs now
        return run_stage(layer_fn, chunk, h, stage_args, key)

    vmapped = jax.vmap(stage_fn, spmd_axis_name=pipeline.spmd_axis)

    def step(carry, t):
        state, buffer = carry  # [S, mb, T, D] in flight; [M, mb, T, D] inputs / outputs of a pass
        items = t - stages
        micro, repeat = items % M, jnp.clip(items // M, 0, R - 1)
        # stage s takes what stage s - 1 made last step; stage 0 takes its next microbatch
        inputs = jnp.roll(state, 1, axis=0).at[0].set(buffer[t % M])
        inputs = constrain(inputs, STAGE_ACTIVATION)
        row_leaves = [a[micro] for a, row in zip(split_leaves, per_row) if row]
        keys = None if rng is None else jax.random.split(jax.random.fold_in(rng, t), S)
        out = constrain(vmapped(weights, repeat, inputs, row_leaves, keys), STAGE_ACTIVATION)
        done = t - (S - 1)  # the item the last stage just finished
        slot = done % M
        buffer = buffer.at[slot].set(jnp.where(done >= 0, out[S - 1], buffer[slot]))
        return (out, buffer), None

    state = jnp.zeros((S, B // M, *x.shape[1:]), x.dtype)
    (_, buffer), _ = jax.lax.scan(step, (state, split_rows(x, M)), jnp.arange(schedule.iterations))
    return merge_rows(buffer)
