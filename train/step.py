"""The train step and eval step: pure functions of (state, batch).

One function, several callers: `magic train` jit-compiles it with shardings and
donated state; `magic compile` AOT-lowers the very same function for a TPU
topology. Gradient accumulation runs inside the step as a lax.scan.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import optax

from matrixmagic.configs.train_config import TrainConfig
from matrixmagic.model import build_model, objectives
from matrixmagic.model.families import family_of
from matrixmagic.sharding.pipeline_parallel import pipeline_for

from .optimizer import accumulate_gradients, make_optimizer
from .ramp import active_microbatches, ramp_at, ramped_schedule
from .schedules import make_schedule
from .state import TrainState


def make_learning_rate(config: TrainConfig) -> optax.Schedule:
    """The schedule in steps (warmup and decay resolved from tokens by TrainConfig); during a
    batch ramp its clock is the tokens seen, in full-batch steps (train/ramp.py)."""
    opt = config.optimizer
    schedule = make_schedule(opt.schedule, peak_learning_rate=opt.learning_rate, warmup_steps=config.warmup_steps,
                             decay_steps=config.decay_steps, final_ratio=opt.final_ratio,
                             d_model=config.model.d_model)
    ramp = config.batch_ramp
    return ramped_schedule(schedule, ramp) if ramp.on else schedule


def make_tx(config: TrainConfig) -> optax.GradientTransformation:
    opt = config.optimizer
    return make_optimizer(learning_rate=make_learning_rate(config), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                          weight_decay=opt.weight_decay, clip_norm=opt.clip_norm)


def train_step(state: TrainState, batch: dict, *, config: TrainConfig, tx: optax.GradientTransformation):
    """One optimizer update on a global batch -> (new state, metrics). With mesh.stage > 1 the
    layer stack runs as pipeline stages (model/stages.py); evals run it unpipelined."""
    model = build_model(config.model, pipeline_for(config))
    loss_fn = partial(objectives.loss_fn, family_of(config.model), model, train=True,
                      label_smoothing=config.optimizer.label_smoothing)
    step_rng = jax.random.fold_in(state.rng, state.step)
    ramp = config.batch_ramp
    rows: jax.Array | int  # traced under a ramp; without one, the fixed batch size
    if ramp.on:  # the same full-size batch every step; microbatches without an active row are skipped
        rows = ramp_at(ramp, state.step)[0]
        active = active_microbatches(rows, config.batch_size, config.microbatches)
    else:
        rows, active = config.batch_size, None
    loss, grads, aux = accumulate_gradients(loss_fn, state.params, batch, config.microbatches, step_rng, active)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": aux["accuracy"],
        "tokens": aux["weight"],
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "learning_rate": make_learning_rate(config)(state.step),
        "batch_rows": jnp.asarray(rows, jnp.int32),  # sequences this step trained on
    }
    # dataclasses.replace is what flax's state.replace() calls; mypy does not see the method flax adds.
    return dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, *, config: TrainConfig) -> dict:
    """Sums over one eval batch; the caller adds them up across batches."""
    loss_sum, weight, correct = objectives.loss_sums(family_of(config.model), build_model(config.model), params,
                                                     batch)
    return {"loss_sum": loss_sum, "weight": weight, "correct": correct}


def bind_train_step(config: TrainConfig):
    """(tx, step_fn(state, batch)) with the config closed over: what jit and AOT compile."""
    tx = make_tx(config)
    return tx, partial(train_step, config=config, tx=tx)


def summarize_eval(sums: dict) -> dict:
    weight = max(float(sums["weight"]), 1.0)
    loss = float(sums["loss_sum"]) / weight
    return {"loss": loss, "perplexity": float(jnp.exp(jnp.minimum(loss, 50.0))),
            "accuracy": float(sums["correct"]) / weight, "tokens": float(sums["weight"])}
