"""Where a run starts: the latest good checkpoint, another run's params, or step 0.

Rerunning `magic train` with the same --workdir is the resume command. It continues from
the newest checkpoint that restores and verifies (train/checkpoint.py), and the metrics
log is cut back to that step, so the per-step log of an interrupted-and-resumed run equals
that of an uninterrupted one: rows written after the checkpoint (by the process that died)
are recomputed, not duplicated. `--init-from PATH` starts a *new* run from another run's
params: fresh optimizer state, fresh PRNG key, step 0; it applies only when the workdir
has no checkpoint of its own, so rerunning a preempted --init-from run resumes it.
Before a checkpoint's arrays are read, the command must describe the same run
(train/samerun.py): changes to what it computes are refused unless --allow-change names them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import jax

from matrixmagic.configs.train_config import config_to_json

from . import storage
from .checkpoint import Checkpointer, restore_params
from .samerun import check_same_run, iterator_state_to_check

METRICS_FILE = "metrics.jsonl"


class Start(NamedTuple):
    state: Any
    step: int
    data_state: dict  # {'iterator': BatchIterator state, 'nonfinite_skips': int}; {} for a fresh run
    source: str  # what the run started from, for the log
    changes: dict | None = None  # {field: [old, new]} a resume made under --allow-change (logged in metrics.jsonl)
    notes: Sequence[str] = ()  # lines for the run's log


def truncate_metrics(workdir: str, step: int) -> int:
    """Drop metrics.jsonl rows with step > `step`, and 'resume' rows at `step` (this resume
    writes its own), and a half-written last line from a killed process; the file is
    replaced atomically. Returns how many lines were dropped."""
    path = storage.join(workdir, METRICS_FILE)
    if not storage.exists(path):
        return 0
    kept, dropped = [], 0
    for line in storage.read_text(path).splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:  # a partial line: the writer died mid-write
            dropped += line.strip() != ""
            continue
        if int(row.get("step", 0)) < step or (int(row.get("step", 0)) == step and row.get("split") != "resume"):
            kept.append(json.dumps(row) + "\n")
        else:
            dropped += 1
    if dropped:
        storage.write_text(path, "".join(kept))
    return dropped


def data_state(train_data, step: int, nonfinite_skips: int) -> dict:
    """What the checkpoint records about the data side at `step`: the iterator, the skip
    count, and the data's fingerprint (`source`: corpus, files, tokenizer; train/samerun.py)."""
    return {"iterator": train_data.iterator(step).get_state(), "nonfinite_skips": int(nonfinite_skips),
            "source": dict(train_data.fingerprint)}


def check_data_state(train_data, saved: dict, step: int, allowed: frozenset = frozenset()) -> None:
    """The saved iterator state must describe this pipeline (same seed, batch, length) but
    for fields --allow-change allows; the pipeline raises naming the field otherwise."""
    iterator = iterator_state_to_check(saved.get("iterator") or {"step": saved.get("step", step)}, allowed)
    train_data.iterator(0).set_state(iterator)
    if int(iterator["step"]) != step:
        raise ValueError(f"checkpoint step {step} records data-iterator step {iterator['step']}; the checkpoint is "
                         f"inconsistent: move that step directory away and rerun.")


def start_state(config, run, tx, ckpt: Checkpointer, train_data, is_main: bool,
                allowed: frozenset = frozenset()) -> Start:
    """Resume (the same run: train/samerun.py), init-from, or init; then cut the metrics
    log back to the start step."""
    config_json = config_to_json(config)
    found: dict[str, Any] = {}  # what same_run learns: "changes" (a dict) and "notes" (lines)

    def same_run(step: int, saved_config: dict, saved_data: dict) -> None:
        found["changes"], found["notes"] = check_same_run(ckpt.directory, step, saved_config, saved_data,
                                                          config_json, train_data.fingerprint, allowed)
        check_data_state(train_data, saved_data, step, allowed)

    restored = ckpt.restore_latest(run.abstract_state, config_json, check_run=same_run)
    if restored is not None:
        start = Start(restored.state, restored.step, restored.data, f"checkpoint step {restored.step} in "
                                                                      f"{ckpt.directory}", found["changes"],
                      found["notes"])
    else:
        state = run.init_state(jax.random.PRNGKey(config.seed))
        source = "initialization"
        if config.init_from:
            params, step = restore_params(config.init_from, run.abstract_state.params, config_to_json(config))
            opt_state = jax.jit(tx.init, out_shardings=run.state_shardings.opt_state)(params)
            state = state.replace(params=params, opt_state=opt_state)
            source = f"params of {config.init_from} (its step {step}), fresh optimizer state"
        start = Start(state, 0, {}, source)
    if is_main:
        truncate_metrics(config.workdir, start.step)
    return start


def nonfinite_skips(start: Start) -> int:
    return int(start.data_state.get("nonfinite_skips", 0))


def last_good(ckpt: Checkpointer) -> str:
    step: Optional[int] = ckpt.latest_step()
    return f"step {step} in {ckpt.directory}" if step is not None else f"none yet (nothing saved in {ckpt.directory})"
