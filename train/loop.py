"""`magic train`: the training loop.

Order of work, cheapest checks first: validate the config and the workdir, open
the tokenizer and the data, then build (or restore) the state and compile the
step. Data order is a function of (seed, step), so resuming from a checkpoint
at step k continues with exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from configs import ConfigError, ModelConfig
from configs.train_config import DataConfig, MeshConfig, OptimizerConfig, TrainConfig
from model.accounting import closed_form_params, training_flops_per_token
from train import metrics as metrics_lib
from train.checkpoint import Checkpointer, config_to_json
from train.state import create_train_state
from train.step import bind_train_step, eval_step, summarize_eval


def config_from_json(d: dict) -> TrainConfig:
    return TrainConfig(**{**d, "model": ModelConfig(**d["model"]), "data": DataConfig(**d["data"]),
                          "optimizer": OptimizerConfig(**d["optimizer"]), "mesh": MeshConfig(**d["mesh"])})


def check_workdir(workdir: str) -> None:
    """Fail before any expensive work if the run directory can't be written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"workdir={workdir!r} is not writable ({err.strerror}); "
                          f"choose another with --set workdir=PATH.") from err


def with_tokenizer_vocab(config: TrainConfig, tokenizer) -> TrainConfig:
    """The embedding table follows the tokenizer: padded to a multiple of 128, padding ids masked."""
    model = config.model.replace(vocab_size=tokenizer.padded_vocab_size(128), num_valid_tokens=tokenizer.vocab_size)
    return dataclasses.replace(config, model=model)


def open_data(config: TrainConfig, tokenizer):
    """(train pipeline, eval batches) for this process."""
    from train import pipeline

    data = config.data
    seq_len, decoder_len = data.seq_len, None
    if config.model.family == "encoder_decoder":  # the encoder reads the first half, the decoder writes the second
        seq_len = decoder_len = data.seq_len // 2
    kwargs = dict(family=config.model.family, source=data.source, tokenizer=tokenizer, seq_len=seq_len,
                  data_dir=data.data_dir, decoder_len=decoder_len,
                  process_index=jax.process_index(), process_count=jax.process_count())  # this host's rows only
    train_data = pipeline.make_pipeline(batch_size=config.batch_size, seed=config.seed, **kwargs)
    eval_batches = pipeline.make_eval_batches(batch_size=config.batch_size, num_eval_batches=config.eval_batches,
                                              **kwargs) if config.eval_batches else []
    return train_data, eval_batches


def flops_per_step(config: TrainConfig) -> float:
    total = closed_form_params(config.model)
    n = total["model"] + total["mlm_head"]
    return training_flops_per_token(config.model, n, config.data.seq_len) * config.tokens_per_step


def evaluate(eval_fn, params, batches, put_batch) -> Optional[dict]:
    if not batches:
        return None
    sums = {"loss_sum": 0.0, "weight": 0.0, "correct": 0.0}
    for batch in batches:
        out = eval_fn(params, put_batch(batch))
        sums = {k: sums[k] + float(out[k]) for k in sums}
    return summarize_eval(sums)


def train(config: TrainConfig, *, quiet: bool = False) -> dict:
    """Run (or resume) training; returns a summary with the final eval metrics."""
    from train.pipeline import open_tokenizer

    check_workdir(config.workdir)
    tokenizer = open_tokenizer(config.data.tokenizer, config.data.source, config.data.data_dir)
    config = with_tokenizer_vocab(config, tokenizer)
    from sharding.validate import validate_mesh

    validate_mesh(config, jax.device_count(), jax.process_count())  # mesh errors before data or compile
    train_data, eval_batches = open_data(config, tokenizer)
    is_main = jax.process_index() == 0
    log = print if (is_main and not quiet) else (lambda *a, **k: None)

    from sharding.setup import shard_run  # mesh, shardings and the jitted steps for this config

    tx, step_fn = bind_train_step(config)
    run = shard_run(config, tx, step_fn, eval_step)
    ckpt = Checkpointer(config.workdir, keep=config.keep_checkpoints)
    start = ckpt.latest_step()
    if start is None:
        state = run.init_state(jax.random.PRNGKey(config.seed))
        start = 0
    else:
        state, data_state, _ = ckpt.restore(run.abstract_state)
        start = int(data_state["step"])
        log(f"resumed from {ckpt.directory} at step {start}")

    writer = metrics_lib.MetricsWriter(config.workdir, enabled=is_main)
    peak = config.peak_flops or metrics_lib.default_peak_flops(jax.devices()[0].device_kind, jax.devices()[0].platform)
    step_flops = flops_per_step(config)
    n_params = closed_form_params(config.model)["model"]
    log(f"{config.preset}: {n_params:,} params, {config.model.family}, {len(jax.devices())} device(s) "
        f"mesh {dict(run.mesh.shape)}, {config.tokens_per_step:,} tokens/step, workdir {config.workdir}")

    from tqdm import tqdm

    bar = tqdm(total=config.steps, initial=start, disable=not is_main or quiet, dynamic_ncols=True)
    window_start, window_steps, last_eval = time.perf_counter(), 0, None
    for step in range(start, config.steps):
        batch = run.put_batch(train_data.batch(step))
        state, step_metrics = run.train_step(state, batch)
        window_steps += 1
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            elapsed = time.perf_counter() - window_start
            values["step_time"] = elapsed / window_steps
            values["tokens_per_second"] = config.tokens_per_step * window_steps / elapsed
            values["mfu"] = step_flops * window_steps / elapsed / (peak * jax.device_count()) if peak else 0.0
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"loss is {values['loss']} at step {done}; the last good checkpoint "
                                         f"is kept in {ckpt.directory}. Lower optimizer.learning_rate.")
            writer.write(done, "train", values)
            bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_second']:.0f}",
                            mfu=f"{values['mfu']:.0%}")
            window_start, window_steps = time.perf_counter(), 0
        if eval_batches and (done % config.eval_every == 0 or done == config.steps):
            last_eval = evaluate(run.eval_step, state.params, eval_batches, run.put_batch)
            if config.data.tokenizer == "bytes" and config.model.family == "decoder":
                last_eval["bits_per_byte"] = last_eval["loss"] / math.log(2)
            writer.write(done, "eval", last_eval)
            bar.write(f"step {done}: eval " + "  ".join(f"{k} {v:.4g}" for k, v in last_eval.items()))
            window_start = time.perf_counter()  # eval time is not train time
        if done % config.checkpoint_every == 0 or done == config.steps:
            ckpt.save(done, state, {"step": done}, config)
        bar.update(1)
    bar.close()
    ckpt.close()
    writer.close()

    summary = {"config": config_to_json(config), "final_eval": last_eval, "steps": config.steps}
    sampling = config.sample_tokens and config.model.family == "decoder"
    # Across hosts the params are gathered by a collective every process joins; only process 0 samples.
    params_on_host = gather_params(state.params) if sampling else None
    if is_main:
        history = metrics_lib.read_history(config.workdir)
        summary["loss_curve"] = metrics_lib.plot_loss_curve(
            history, os.path.join(config.workdir, "loss_curve.png"), title=f"{config.preset} on {config.data.source}")
        log(f"loss curve: {summary['loss_curve']}")
        if sampling:
            summary["sample"] = sample_text(config, params_on_host, tokenizer)
            log("sample from the trained model:\n" + summary["sample"])
    return summary


def gather_params(params):
    """Whole params as host numpy arrays; across hosts an all-gather that every process must join."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def sample_text(config: TrainConfig, params, tokenizer, prompt: str = "def ", temperature: float = 0.8) -> str:
    """A short sample from a trained decoder-only model, generated with the KV cache."""
    from model.generate import generate_text

    params = jax.device_get(params)
    return generate_text(config.model, params, tokenizer, prompt, max_new_tokens=config.sample_tokens,
                         temperature=temperature, seed=config.seed)
