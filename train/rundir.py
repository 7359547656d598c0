"""Run directories: the default name, and what a run records at its top.

The default workdir is `runs/<preset>-<6 hex>`, the hex a hash of the resolved config, so
the same command always lands in the same directory (and resumes there) while a changed
config gets a directory of its own instead of tripping over another run's checkpoints.
`--workdir` (or `--set workdir=`) still names one explicitly. MATRIXMAGIC_RUNS_DIR moves the
`runs/` parent, e.g. to `gs://bucket/runs` on a pod, whose hosts share no disk: the same rule
then names the same directory in the bucket on every host.

At its top a run directory holds `command.txt` (the command line of the first start, then
one line per resume) and `config.json` (the resolved config in force: written at the start,
rewritten by a resume that changed a field, e.g. with --allow-change steps), so a directory
found later says what made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from typing import Optional, Sequence

from matrixmagic.configs.train_config import TrainConfig, config_to_json

from . import storage

RUNS_DIR = "runs"
RUNS_DIR_ENV = "MATRIXMAGIC_RUNS_DIR"
COMMAND_FILE = "command.txt"
CONFIG_FILE = "config.json"

# Fields that never change what is computed, so they stay out of the hash: where the run lives,
# how often it logs, evaluates and saves, how many checkpoints it keeps, when it gives up on
# NaNs, the MFU denominator, the smoke-test sample, and the evals beyond the loss (`eval.*`). Changing one of them and rerunning
# resumes the same run. Every other field (model, data, optimizer, batch, seed, steps, mesh,
# ramp, ...) changes the trained weights or the eval figures, so it names a new run.
BOOKKEEPING_FIELDS = ("workdir", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                      "keep_best_checkpoint", "max_nonfinite_skips", "peak_flops", "sample_tokens", "eval")
# Fields added after default directories were first named: at their default value they stay out
# of the hash, so a run started before they existed resumes in the directory it started in.
LATER_FIELDS = {("data", "mixture"): None,
                # issue 26's model options
                ("model", "norm"): "layernorm", ("model", "num_kv_heads"): None, ("model", "rope_theta"): 10000.0,
                ("model", "rope_scaling"): "none", ("model", "rope_scaling_factor"): 8.0,
                ("model", "rope_low_freq_factor"): 1.0, ("model", "rope_high_freq_factor"): 4.0,
                ("model", "rope_original_max_len"): 8192,
                # issue 27's mesh axes
                ("mesh", "stage"): 1, ("mesh", "context"): 1, ("mesh", "context_attention"): "all_gather",
                ("mesh", "pipeline_microbatches"): 0, ("mesh", "pipeline_repeats"): 1,
                # issue 28's sequence parallelism
                ("mesh", "sequence_parallel"): True}


def config_digest(config: TrainConfig, length: int = 6) -> str:
    """The first `length` hex digits of sha256 over the config's computation-changing fields."""
    fields = {k: v for k, v in config_to_json(config).items() if k not in BOOKKEEPING_FIELDS}
    for (section, name), default in LATER_FIELDS.items():
        if name in fields.get(section, {}) and fields[section][name] == default:
            fields[section] = {k: v for k, v in fields[section].items() if k != name}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def default_workdir(config: TrainConfig) -> str:
    """`runs/<preset>-<digest>`: what every command that defaults a workdir uses."""
    parent = os.environ.get(RUNS_DIR_ENV) or RUNS_DIR
    if storage.is_url(parent) or parent.startswith("~"):
        parent = storage.normalize(parent, RUNS_DIR_ENV)
    return storage.join(parent, f"{config.preset}-{config_digest(config)}")


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """This process's command line as a shell would retype it (`magic train --set steps=500`)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and os.path.basename(argv[0]) == "magic":
        argv[0] = "magic"
    return shlex.join(argv)


def record_start(config: TrainConfig, resumed_from: int, argv: Optional[Sequence[str]] = None,
                 directory: Optional[str] = None) -> None:
    """Append this start's command line to RUN/command.txt (a resume says from which step) and
    write RUN/config.json when it is not this config (a first start, or a resume with changes):
    it names the config the run goes on with, and `storage.write_text` replaces it whole (a
    temporary file renamed over it), so a crash leaves the old one or the new one. `directory`:
    where RUN is being written when that is not yet config.workdir (`magic hf import` stages it
    beside the target)."""
    directory = directory or config.workdir
    line = command_line(argv)
    if resumed_from:
        line += f"   # resumed at step {resumed_from}"
    commands = storage.join(directory, COMMAND_FILE)
    before = storage.read_text(commands) if storage.exists(commands) else ""  # no append on GCS: rewritten
    storage.write_text(commands, before + line + "\n")
    path = storage.join(directory, CONFIG_FILE)
    text = json.dumps(config_to_json(config), indent=2) + "\n"
    if not storage.exists(path) or storage.read_text(path) != text:
        storage.write_text(path, text)


def finished_line(step: int, workdir: str) -> str:
    return f"already finished at step {step:,} ({workdir}); nothing to train"
