"""The batch ramp inside the compiled step: the table of configs/ramp.py as constants.

The step's shapes never change during the ramp (the batch buffer is always full-size),
so a single compile serves every level; what changes per step is computed from
`state.step` in the graph: how many rows are active (which microbatches run) and the
learning-rate clock (tokens seen, in full-batch steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from matrixmagic.configs.ramp import BatchRamp


def ramp_at(ramp: BatchRamp, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(active rows of `step`, its schedule clock) from the table: the same numbers as the host's
    BatchRamp.rows(step) and BatchRamp.clock(step) (the clock in float32)."""
    first = jnp.asarray(np.asarray(ramp.first_steps, np.int32))
    level = jnp.searchsorted(first, step, side="right") - 1
    rows = (level + 1) * ramp.start_rows
    base = jnp.asarray(np.asarray(ramp.rows_before_level, np.float64) / ramp.full_rows, jnp.float32)[level]
    clock = base + (step - first[level]).astype(jnp.float32) * (rows.astype(jnp.float32) / ramp.full_rows)
    return rows.astype(jnp.int32), clock


def active_microbatches(rows: jax.Array, batch_size: int, microbatches: int) -> jax.Array:
    """[microbatches] bools: which microbatches hold an active row. The pipeline fills active
    rows microbatch by microbatch (train/data/pipeline.py `ramp_slots`), so microbatch i has
    one iff i * (rows per microbatch) < rows."""
    per_micro = batch_size // microbatches
    return jnp.arange(microbatches) * per_micro < rows


def ramped_schedule(schedule, ramp: BatchRamp):
    """schedule(count) -> schedule(clock(count)): during a ramp the learning rate follows the
    tokens seen, not the steps taken."""
    return lambda count: schedule(ramp_at(ramp, jnp.asarray(count, jnp.int32))[1])
