"""`magic train`: the training loop.

Order of work, cheapest checks first: validate the config and the workdir, open
the tokenizer and the data, then build (or restore) the state and compile the
step. Data order is a function of (seed, step), so resuming from a checkpoint
at step k continues with exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from matrixmagic.configs import ConfigError
from matrixmagic.configs.ramp import ramp_description
from matrixmagic.configs.train_config import TrainConfig, config_to_json
from matrixmagic.model.accounting import closed_form_params, training_flops_per_token
from matrixmagic.model.families import family_of
from matrixmagic.model.generate import generate_text
from matrixmagic.sharding.memory import tree_bytes
from matrixmagic.train.planning.fit import check_training_fits

from . import metrics as metrics_lib
from . import storage
from .aot import CompiledFile, load_train_step, open_compiled
from .checkpoint import Checkpointer, DiskFullError
from .data import pipeline
from .data.tokenizers import prompt_start
from .evals.during import TrainingEvals, open_training_evals
from .guards import NonFiniteMonitor, check_free_space
from .lease import run_lock
from .preemption import EXIT_PREEMPTED, PreemptionGuard
from .quiet import is_disk_full
from .resume import data_state, last_good, nonfinite_skips, start_state
from .run import run_tokenizer, sized_for_data, train_run
from .rundir import COMMAND_FILE, CONFIG_FILE, finished_line, record_start
from .runlock import LOCK_FILE, RunInUseError, RunLock
from .samerun import check_allowed
from .step import summarize_eval

# The files a run keeps at the top of its directory (the lock, the log, what made it, the curve).
RUN_FILES = (LOCK_FILE, metrics_lib.METRICS_FILE, COMMAND_FILE, CONFIG_FILE, "loss_curve.png")


def check_workdir(workdir: str) -> None:
    """Fail before any expensive work if the run directory can't be written: on GCS the
    bucket, the credentials and a write of a small object are checked."""
    if storage.is_remote(workdir):
        storage.check_bucket(workdir, "workdir")
        probe = storage.join(workdir, f".write-test-{os.getpid()}")
        try:
            storage.write_bytes(probe, b"\0" * 4096)
            storage.path(probe).unlink()
        except Exception as err:  # noqa: BLE001 - gcsfs raises OSError, HttpError or ValueError
            raise storage.classify(err, workdir, "workdir") from None
        return
    for name in RUN_FILES:  # a folder where the run keeps a file fails deep inside the lock or the log
        if os.path.isdir(os.path.join(workdir, name)):
            raise ConfigError(f"workdir={workdir!r}: {name} there is a directory, and the run keeps a file of that "
                              f"name: remove it (or move it aside) and rerun, or choose another --workdir.")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"workdir={workdir!r} is not writable ({err.strerror}); "
                          f"choose another with --set workdir=PATH.") from err


def open_data(config: TrainConfig, tokenizer):
    """(train pipeline, {source: eval batches}) for this process. The family record splits
    data.seq_len between encoder and decoder, as it does for `magic compile`'s batch."""
    data = config.data
    kwargs = dict(family=config.model.family, source=data.source, tokenizer=tokenizer, seq_len=data.seq_len,
                  data_dir=data.data_dir, mixture=data.mixture,
                  process_index=jax.process_index(), process_count=jax.process_count())  # this host's rows only
    train_data = pipeline.make_pipeline(batch_size=config.batch_size, seed=config.seed, ramp=config.batch_ramp,
                                        microbatches=config.microbatches, **kwargs)
    eval_sets = pipeline.make_eval_sets(batch_size=config.batch_size, num_eval_batches=config.eval_batches,
                                        **kwargs) if config.eval_batches else {}
    return train_data, eval_sets


def process_zero_first(fn):
    """Run fn on process 0, then on the others: one host builds shared caches (the TFDS
    dataset, its token shards) while the rest wait, instead of all writing them at once."""
    if jax.process_count() == 1:
        return fn()
    result = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("matrixmagic: data prepared")
    return fn() if jax.process_index() != 0 else result


def flops_per_token(config: TrainConfig) -> float:
    total = closed_form_params(config.model)
    n = total["model"] + total["mlm_head"]
    return training_flops_per_token(config.model, n, config.data.seq_len)


def flops_per_step(config: TrainConfig) -> float:
    """Of a full batch (benchmarks); a ramp step has fewer tokens."""
    return flops_per_token(config) * config.tokens_per_step


def schedule_line(config: TrainConfig) -> str:
    """The run header's schedule: where warmup and decay came from, and the batch ramp."""
    opt, ramp = config.optimizer, config.batch_ramp
    line = (f"{opt.schedule} schedule, peak lr {opt.learning_rate:g}: warmup {config.warmup_steps:,} steps "
            f"({config.schedule_source('warmup')}), decay {config.decay_steps:,} steps "
            f"({config.schedule_source('decay')}); {ramp_description(ramp)}")
    warmup_end = ramp.first_step_with(config.warmup_steps * config.tokens_per_step)
    if warmup_end > config.steps:  # a paper's warmup in tokens on a short run: say so, it is legal
        line += (f"\nnote: the warmup ends at step {warmup_end:,}, after this run's {config.steps:,} steps, so the "
                 f"learning rate never reaches its peak; --set optimizer.warmup_steps=N for a shorter warmup")
    return line


def evaluate(eval_fn, params, sets: dict, put_batch) -> Optional[dict]:
    """Loss, perplexity and accuracy over every set's batches; a mixture's sources (named sets)
    also get their own loss and accuracy, as 'NAME/loss' and 'NAME/accuracy'."""
    if not any(sets.values()):
        return None
    total, per_source = {"loss_sum": 0.0, "weight": 0.0, "correct": 0.0}, {}
    for name, batches in sets.items():
        sums = dict.fromkeys(total, 0.0)
        for batch in batches:
            out = eval_fn(params, put_batch(batch))
            sums = {k: sums[k] + float(out[k]) for k in sums}
        total = {k: total[k] + sums[k] for k in total}
        if name:
            summary = summarize_eval(sums)
            per_source.update({f"{name}/loss": summary["loss"], f"{name}/accuracy": summary["accuracy"]})
    return {**summarize_eval(total), **per_source}


def lock_run(workdir: str):
    """Process 0 locks the run directory (train/runlock.py); every process learns the outcome,
    so a refused multi-host run stops everywhere instead of hanging at its first barrier."""
    lock, refused = None, None
    if jax.process_index() == 0:
        try:
            lock = run_lock(workdir).acquire()
        except RunInUseError as err:
            refused = err
    if jax.process_count() > 1:
        held = int(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
        if not held and refused is None:
            raise RunInUseError(f"workdir={workdir!r} is in use by another run: process 0 says which.")
    if refused is not None:
        raise refused
    return lock


def train(config: TrainConfig, *, quiet: bool = False, compiled: Optional[str] = None,
          allow_change: Sequence[str] = (), check_memory: bool = True) -> dict:
    """Run (or resume) training; returns a summary with the final eval metrics.
    `compiled`: a `magic compile --serialize` file to use instead of compiling the step.
    `allow_change`: config fields a resume may change (`--allow-change`; train/resume.py).
    `check_memory`: refuse a step the analytic memory model says cannot fit (train/planning/fit.py).
    The run directory is locked for the whole call: a second writer fails at once."""
    # A --compiled file not signed by this user's key is refused here, unloaded, before anything
    # is written (train/sealed.py).
    executable = open_compiled(compiled) if compiled else None
    fresh = not storage.is_remote(config.workdir) and not os.path.exists(config.workdir)
    check_workdir(config.workdir)
    lock = None
    try:
        allowed = check_allowed(config, allow_change)  # a misspelt field fails before the lock is taken
        lock = lock_run(config.workdir)
        return _train(config, quiet=quiet, compiled=executable, allowed=allowed, check_memory=check_memory, lock=lock)
    except OSError as err:  # the metrics log or TensorBoard hit a full disk (a save reports its own)
        if not is_disk_full(err):
            raise
        raise DiskFullError(f"the disk of workdir={config.workdir!r} is full (no space left on device while writing "
                            f"{getattr(err, 'filename', None) or 'the logs'}): free some space and rerun the same "
                            f"command to resume from the last good checkpoint.") from None
    except BaseException:  # a config error found after the lock (the vocabulary, the data): leave no new folder
        if fresh:
            lock = discard_untouched(config.workdir, lock)
        raise
    finally:
        if lock is not None:
            lock.release()


def discard_untouched(workdir: str, lock):
    """Remove a run directory this start made, if nothing but its lock file is in it; returns
    the lock still to release (None once discarded). Anything else there is kept."""
    try:
        if set(os.listdir(workdir)) - {LOCK_FILE}:
            return lock
        if isinstance(lock, RunLock):
            lock.discard()  # unlinked while held: see train/runlock.py
            lock = None
        os.rmdir(workdir)  # fails (kept) if a lock file is still there: another process's
    except OSError:
        pass
    return lock


def _train(config: TrainConfig, *, quiet: bool, compiled: CompiledFile | None, allowed: frozenset,
           check_memory: bool, lock=None) -> dict:
    tokenizer = process_zero_first(lambda: run_tokenizer(config))
    config = sized_for_data(config, tokenizer, jax.device_count(), jax.process_count())  # before data or compile
    if check_memory:
        check_training_fits(config, jax.device_count(), jax.local_devices())
    train_data, eval_sets = process_zero_first(lambda: open_data(config, tokenizer))
    is_main = jax.process_index() == 0
    extra_evals = open_training_evals(config, tokenizer, is_main)
    log = print if (is_main and not quiet) else (lambda *a, **k: None)

    tx, run = train_run(config)  # mesh, shardings and the jitted steps (the one `magic compile` lowers)
    if compiled:  # `magic compile --serialize`: skip compiling, if it matches this run exactly
        run.train_step = load_train_step(compiled, run, config, warn=lambda m: print(f"warning: {m}"), log=log)
    check_free_space(config.workdir, tree_bytes(run.abstract_state, per_device=False), config.keep_checkpoints)
    ckpt = Checkpointer(config.workdir, keep=config.keep_checkpoints, keep_best=config.keep_best_checkpoint)
    begin = start_state(config, run, tx, ckpt, train_data, is_main, allowed)  # resume, --init-from, or init
    state, start = begin.state, begin.step
    if start >= config.steps:  # the same command again after the run ended: say so, train nothing
        ckpt.close()
        log(finished_line(start, config.workdir))
        return {"config": config_to_json(config), "final_eval": None, "steps": config.steps, "finished_at": start}
    if is_main:
        record_start(config, start)  # RUN/command.txt (+1 line per resume), RUN/config.json (the config in force)
    if begin.step or config.init_from:
        log(f"starting from {begin.source}")
    for line in begin.notes:
        log(line)
    monitor = NonFiniteMonitor(config.max_nonfinite_skips, nonfinite_skips(begin),
                               hint=f"Lower optimizer.learning_rate (now {config.optimizer.learning_rate:g}) or raise "
                                    f"max_nonfinite_skips, then rerun to resume from the last good checkpoint.")

    writer = metrics_lib.MetricsWriter(config.workdir, enabled=is_main)
    if begin.changes:  # --allow-change: what this resume changed, at the step it resumed from
        writer.record(start, "resume", {"allowed_changes": begin.changes})
    peak = config.peak_flops or metrics_lib.peak_flops_per_device(jax.local_devices())
    token_flops = flops_per_token(config)
    ramp = config.batch_ramp  # the batch of every step (one level without a ramp)
    n_params = closed_form_params(config.model)["model"]
    family = family_of(config.model)
    log(f"{config.preset}: {n_params:,} params, {family.name} ({family.objective}), {len(jax.devices())} device(s) "
        f"mesh {dict(run.mesh.shape)}, {config.tokens_per_step:,} tokens/step, {config.model.dtype} compute, "
        f"attention {config.model.attention_impl}, workdir {config.workdir}")
    log(schedule_line(config))

    # smoothing=0: the rate is steps done over the train time so far. Steps are dispatched ahead of
    # the device and the bar only waits at each log step, so a moving average of per-update rates
    # swings by orders of magnitude (and the ETA with it); eval time is taken out below.
    bar = tqdm(total=config.steps, initial=start, disable=not is_main or quiet, dynamic_ncols=True, smoothing=0,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [train {elapsed}<{remaining}, {rate_fmt}{postfix}]")
    window_start, window_steps, last_eval, preempted_at = time.perf_counter(), 0, None, None
    guard = PreemptionGuard().install()  # SIGTERM / Ctrl-C / TPU notice: finish the step, save, exit 75
    try:
        for step in range(start, config.steps):
            batch = run.put_batch(train_data.batch(step))
            state, step_metrics = run.train_step(state, batch)
            window_steps += 1
            done = step + 1
            monitor.record(done, step_metrics)
            eval_metrics = None
            if done % config.log_every == 0 or done == config.steps:
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                elapsed = time.perf_counter() - window_start
                window_tokens = ramp.tokens_before(done) - ramp.tokens_before(done - window_steps)
                values["tokens_seen"] = ramp.tokens_before(done)  # exact: every step's rows x seq_len
                if train_data.mixture is not None:  # each source's share of those tokens
                    values.update({f"tokens_seen/{name}": rows * config.data.seq_len
                                   for name, rows in train_data.rows_by_source(done).items()})
                values["step_time"] = elapsed / window_steps
                values["tokens_per_second"] = window_tokens / elapsed
                if peak:  # unknown peak: no MFU recorded, and the bar says n/a
                    values["mfu"] = token_flops * window_tokens / elapsed / (peak * jax.device_count())
                    if not config.peak_flops:  # a measured CPU peak under 100% MFU is too low: once, probed again
                        peak, note = metrics_lib.recheck_cpu_peak(jax.local_devices(), values["mfu"], peak)
                        if note:
                            values["mfu"] = token_flops * window_tokens / elapsed / (peak * jax.device_count())
                            if is_main:
                                bar.write(note)
                writer.write(done, "train", values)
                monitor.check(last_good(ckpt))  # raises NonFiniteError past max_nonfinite_skips
                bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_second']:.0f}",
                                mfu=f"{values['mfu']:.0%}" if peak else "n/a")
                window_start, window_steps = time.perf_counter(), 0
            if eval_sets and (done % config.eval_every == 0 or done == config.steps):
                jax.block_until_ready(state)  # the steps dispatched before the eval are train time
                eval_start = time.perf_counter()
                last_eval = evaluate(run.eval_step, state.params, eval_sets, run.put_batch)
                assert last_eval is not None  # eval_sets holds batches: make_eval_sets refuses an empty split
                if config.data.tokenizer == "bytes" and family_of(config.model).likelihood == "causal":
                    last_eval["bits_per_byte"] = last_eval["loss"] / math.log(2)
                writer.write(done, "eval", last_eval)
                eval_metrics = {"eval_loss": last_eval["loss"]}  # ranks this step for keep_best_checkpoint
                if is_main:  # tqdm.write prints even when the bar is disabled
                    bar.write(f"step {done}: eval " + "  ".join(f"{k} {v:.4g}" for k, v in last_eval.items()))
                # Eval time is not train time: the window keeps its steps and drops the eval's seconds
                # (restarting it here counted the steps before the eval over the time after it).
                eval_seconds = time.perf_counter() - eval_start
                window_start += eval_seconds
                if not bar.disable:  # nor for the bar: its time, rate and ETA are of train steps only
                    bar.start_t += eval_seconds
            stop = guard.should_stop(done)
            if done % config.checkpoint_every == 0 or done == config.steps or stop:
                monitor.check(last_good(ckpt))  # a state is saved only after its steps were checked
                if lock is not None:
                    lock.check()  # a lapsed GCS lease: another run may be writing here (train/lease.py)
                writer.flush()  # on GCS the rows up to this step are in the bucket before the step is
                ckpt.save(done, state, data_state(train_data, done, monitor.skipped), config, metrics=eval_metrics)
            # eval.tasks / eval.text: after the save (a failing task cannot cost the step), not when stopping.
            if extra_evals is not None and extra_evals.due(done) and not stop:
                jax.block_until_ready(state)  # the steps dispatched before are train time
                eval_start = time.perf_counter()
                params_on_host = gather_params(state.params)  # a collective: every process joins
                if is_main:
                    assert isinstance(extra_evals, TrainingEvals)  # process 0's; the others get only the schedule
                    scores = extra_evals.run_logged(params_on_host, done, bar.write)
                    if scores:
                        writer.write(done, "evals", scores)
                eval_seconds = time.perf_counter() - eval_start
                window_start += eval_seconds
                if not bar.disable:
                    bar.start_t += eval_seconds
            bar.update(1)
            if stop:
                preempted_at = done
                break
    finally:
        guard.uninstall()
        bar.close()
        writer.close()
        ckpt.close()  # waits for the last async save to commit, also when a guard raised

    summary: dict[str, Any] = {"config": config_to_json(config), "final_eval": last_eval, "steps": config.steps}
    if preempted_at is not None:
        log(f"stopped by {guard.reason} after step {preempted_at}; checkpoint saved in {ckpt.directory}. "
            f"Rerun the same command to resume (exit code {EXIT_PREEMPTED}).")
        return {**summary, "preempted_at": preempted_at, "exit_code": EXIT_PREEMPTED}
    sampling = config.sample_tokens and family_of(config.model).generation == "continue"
    # Across hosts the params are gathered by a collective every process joins; only process 0 samples.
    params_on_host = gather_params(state.params) if sampling else None
    if is_main:
        history = metrics_lib.read_history(config.workdir)
        summary["loss_curve"] = metrics_lib.plot_loss_curve(
            history, storage.join(config.workdir, "loss_curve.png"), title=f"{config.preset} on {config.data.source}")
        log(f"loss curve: {summary['loss_curve']}")
        if sampling:
            summary["sample"] = sample_text(config, params_on_host, tokenizer)
            log("sample from the trained model:\n" + summary["sample"])
    return summary


def gather_params(params):
    """Whole params as host numpy arrays; across hosts an all-gather that every process must join."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    return multihost_utils.process_allgather(params, tiled=True)


def sample_text(config: TrainConfig, params, tokenizer, prompt: str = "def ", temperature: float = 0.8) -> str:
    """A short sample from a trained decoder-only model (params already on the host, from
    gather_params), generated with the KV cache: up to sample_tokens, as many as the context
    leaves after the prompt (a smoke check, so a short model.max_len shortens it, not fails it)."""
    prefix = prompt_start(tokenizer)  # the run's convention, as `magic generate` uses it
    room = config.model.max_len - len(prefix) - len(tokenizer.encode(prompt)) + 1  # the last token is not fed back
    if room < 1:
        return prompt
    return generate_text(config.model, params, tokenizer, prompt, prefix=prefix,
                         max_new_tokens=min(config.sample_tokens, room), temperature=temperature, seed=config.seed)
