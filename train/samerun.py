"""Is a resume the same run? Compared before any array is read.

Rerunning `magic train` on a run directory continues that run, so the command must describe
the run the checkpoint holds. Two records are compared with this run's:

* the saved config (every checkpoint's `config` item), field by field;
* the data fingerprint in the checkpoint's `data` item (`data_fingerprint`): what the corpus
  is (`stdlib`, a directory, `tfds:<name>`), its files (count, bytes and a hash of the list
  of paths and sizes) or its TFDS name, version and example counts, and the tokenizer's
  `cache_key` (a hash of a sentencepiece or tokenizer.json file). So a corpus directory
  that gained files, or another tokenizer file under the same name, is caught although
  `data.source` and `data.tokenizer` read the same. File contents are not hashed: that
  would read the whole corpus at every start; an edit that keeps every size is missed.

A change to anything that decides what the run computes is refused, naming each field
old -> new and the ways on: a new --workdir (--init-from to start from these params), or
`--allow-change FIELD,...`, which continues with the new values and records them in
metrics.jsonl at the resume step (train/loop.py). Checkpoints written before the data
fingerprint existed have none: their config is still compared, the data is not (a note
says so), and the next checkpoint records it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import NamedTuple

from matrixmagic.configs import ConfigError
from matrixmagic.configs.train_config import config_from_json, config_to_json

from .checkpoint import CheckpointError
from .integrity import flatten
from .run import RUN_CHOICES

# Fields a resume may change without asking: none changes the numbers the run computes.
HARMLESS = {
    "workdir": "where the run lives: a moved or copied run directory resumes",
    "preset": "a label; the model and optimizer fields it sets are compared one by one",
    "init_from": "read at step 0 only",
    "eval_every": "when to evaluate; eval does not touch the state",
    "eval_batches": "how much to evaluate on",
    "log_every": "when to log",
    "checkpoint_every": "when to save",
    "keep_checkpoints": "how many saves to keep",
    "keep_best_checkpoint": "which saves to keep",
    "max_nonfinite_skips": "when to stop; a skipped step keeps the same state either way",
    "peak_flops": "the denominator of MFU",
    "sample_tokens": "the sample printed after training",
    "microbatches": "the same batch, accumulated in parts: the update equals one large batch (train/optimizer.py)",
    "data.data_dir": "where the dataset cache lives; the data itself is compared by its fingerprint",
    # The platform's choices (train/run.py RUN_CHOICES: compute dtype, remat, attention kernel,
    # scan unroll): the same maths, so a run may move between TPU, GPU and CPU. The params and
    # optimizer state stay float32, and a param_dtype change shows up as differing arrays.
    **{f"model.{name}": "chosen per platform (train/run.py RUN_CHOICES)" for name in RUN_CHOICES},
}
# mesh.*: how arrays are placed on devices, a checkpoint restores onto any mesh; eval.*: what
# is scored at eval steps, from the weights only.
HARMLESS_PREFIXES = ("mesh.", "eval.")

# Data-iterator state keys (train/data/pipeline.py BatchIterator) and the config field each mirrors.
ITERATOR_FIELDS = {"seed": "seed", "batch_size": "batch_size", "seq_len": "data.seq_len", "family": "model.family",
                   "ramp.start_tokens": "ramp.start_tokens", "ramp.tokens": "ramp.tokens", "mixture": "data.mixture"}
# Data-fingerprint entries and the config field that allows a change of each.
FINGERPRINT_FIELDS = {"source": "data.source", "files": "data.source", "tokenizer": "data.tokenizer"}


class Change(NamedTuple):
    field: str  # the config field --allow-change names
    label: str  # what the message shows: the field, or the fingerprint entry ('data.source (files)')
    old: object
    new: object


def harmless(field: str) -> bool:
    return field in HARMLESS or field.startswith(HARMLESS_PREFIXES)


def check_allowed(config, allow_change: Iterable[str]) -> frozenset:
    """The --allow-change fields, each a config field (ConfigError naming a misspelt one)."""
    fields = set(flatten(config_to_json(config)))
    allowed = frozenset(f.strip() for item in allow_change for f in str(item).split(",") if f.strip())
    for name in sorted(allowed - fields):
        close = difflib.get_close_matches(name, sorted(fields), n=1)
        raise ConfigError(f"--allow-change {name!r}: there is no config field {name!r}."
                          f"{f' Did you mean {close[0]!r}?' if close else ''} `magic train --help-fields` lists "
                          f"them; separate several with commas, e.g. --allow-change steps,optimizer.learning_rate.")
    return allowed


def _normalized(saved_config: dict) -> dict:
    """A saved config with the defaults of fields added since it was written (a config that
    no longer parses is compared as saved)."""
    try:
        return config_to_json(config_from_json(saved_config))
    except (TypeError, ValueError):
        return saved_config


def run_changes(saved_config: dict, config_json: dict, saved_fingerprint: dict | None,
                fingerprint: dict) -> list[Change]:
    """Every change that alters what the run computes, config fields then data fingerprint."""
    old, new = flatten(_normalized(saved_config)), flatten(config_json)
    out = [Change(k, k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
           if old.get(k) != new.get(k) and not harmless(k)]
    if saved_fingerprint is not None:
        for key in sorted(set(saved_fingerprint) | set(fingerprint)):
            if saved_fingerprint.get(key) != fingerprint.get(key):
                field = FINGERPRINT_FIELDS.get(key, "data.source")
                out.append(Change(field, f"{field} ({key})", saved_fingerprint.get(key), fingerprint.get(key)))
    return out


def check_same_run(directory: str, step: int, saved_config: dict, saved_data: dict, config_json: dict,
                   fingerprint: dict, allowed: frozenset) -> tuple[dict, list[str]]:
    """({label: [old, new]} of the changes --allow-change accepted, notes for the log);
    CheckpointError listing the others."""
    saved_fingerprint = saved_data.get("source")
    changes = run_changes(saved_config, config_json, saved_fingerprint, fingerprint)
    refused = [c for c in changes if c.field not in allowed]
    if refused:
        lines = "\n  ".join(f"{c.label}: {c.old!r} -> {c.new!r}" for c in refused)
        fields = ",".join(dict.fromkeys(c.field for c in refused))
        workdir = directory.rsplit("/checkpoints", 1)[0]
        raise CheckpointError(
            f"checkpoint step {step} in {directory} is another run than this command describes; resuming would "
            f"change what it computes:\n  {lines}\nTo go on: rerun with the checkpoint's values; or start a new run "
            f"with another --workdir (add --init-from {workdir} to start from these params); or continue this run "
            f"with the new values: --allow-change {fields} (recorded in metrics.jsonl at step {step}).")
    notes = []
    if saved_fingerprint is None:
        notes.append(f"note: checkpoint step {step} predates data fingerprints, so the data files were not compared "
                     f"(the config was); the next checkpoint records them.")
    accepted = {c.label: [c.old, c.new] for c in changes}
    if accepted:
        notes.append("resuming with changes allowed by --allow-change: "
                     + "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in accepted.items()))
    return accepted, notes


def iterator_state_to_check(iterator: dict, allowed: frozenset) -> dict:
    """The saved iterator state without the keys whose config field --allow-change allows
    (the pipeline refuses any other difference, naming it)."""
    return {k: v for k, v in iterator.items() if ITERATOR_FIELDS.get(k) not in allowed}
