"""Checkpoints with orbax: one atomic step directory per save.

A step directory `<workdir>/checkpoints/<step>/` holds four items:

* `state`: the whole TrainState (step, params, optimizer state, PRNG key) as sharded arrays;
* `data`: the data-iterator state and host counters (JSON);
* `config`: the resolved TrainConfig (JSON), to name what changed when shapes disagree;
* `integrity`: a per-array fingerprint (JSON) of the state as it was in memory.

Why each choice:

* Atomic and async. orbax writes into `<step>.orbax-checkpoint-tmp*` and renames it only
  once every process has finished, so a crash (even `kill -9`) mid-save leaves the previous
  step as the latest; the arrays are copied to host memory before `save` returns, so the
  train step may donate the state buffers right after while the files are written.
* Multi-host. Every process calls `save`/`restore` (orbax runs the barriers); each writes
  its own shards, and only the primary process (0) writes the JSON items and renames.
* Retention: one manager, one policy: the last `keep` steps, plus (`keep_best`) the step
  with the lowest eval loss among those saved together with an eval (orbax `BestN` with
  `keep_checkpoints_without_metrics=False`, OR-ed with `LatestN`). A second manager would
  double the barriers and could disagree about "latest"; one policy keeps one truth.
* Integrity. Truncated or garbled files usually make tensorstore fail, but a flipped bit in
  raw array bytes would restore silently. The fingerprint (a position-weighted sum of the
  arrays' bit patterns, mod 2^32) is computed on device at save time and again after
  restore; integer sums are exact, so it does not depend on the mesh and survives
  resharding. A checkpoint that fails to restore or to match is moved to
  `<workdir>/checkpoints.corrupt/` with a warning and the previous step is tried.
* Compatibility is checked from the saved array metadata before any array is read: a
  changed model gives an error listing the differing config fields and parameters, not a
  tensorstore shape error (and is never mistaken for corruption).

Test hook: MATRIXMAGIC_TEST_SAVE_DELAY=<seconds> adds a commit future that sleeps in the
background save thread, widening the window in which a save is in flight (tests kill the
process inside it). Unset in normal use; when set, the step directory gains an empty
`delay` item and the four items above are unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp

from matrixmagic.configs import ConfigError
from matrixmagic.configs.train_config import config_from_json, config_to_json

from . import storage
from .guards import human_bytes
from .integrity import config_differences, incompatibility_message, shape_mismatches, state_fingerprint
from .quiet import describe_error, is_disk_full, quiet_checkpoint_noise
from .state import create_train_state
from .step import make_tx

SAVE_DELAY_ENV = "MATRIXMAGIC_TEST_SAVE_DELAY"
CORRUPT_DIR = "checkpoints.corrupt"


class CheckpointError(ConfigError):
    """A checkpoint cannot be used for this run; the message names why and the fix."""


class DiskFullError(CheckpointError):
    """The disk filled up during a save; the message says how much a checkpoint needs."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """A run directory holds no checkpoint yet (still a FileNotFoundError to code that asks for one)."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt or partial); an older one is used instead."""


class Restored(NamedTuple):
    step: int
    state: Any
    data: dict
    config: dict


# ----------------------------------------------------------------------------- test hook


class _SleepFuture:
    """A commit future that completes after `seconds` (orbax waits on it in the background thread)."""

    def __init__(self, seconds: float):
        self._thread = threading.Thread(target=time.sleep, args=(seconds,), daemon=True)
        self._thread.start()

    def result(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)


class _DelayHandler(ocp.handlers.AsyncCheckpointHandler):
    """Writes nothing; its save only finishes after a delay (MATRIXMAGIC_TEST_SAVE_DELAY)."""

    async def async_save(self, directory, args):
        return [_SleepFuture(args.seconds)]

    def save(self, directory, args):
        time.sleep(args.seconds)

    def restore(self, directory, args=None):
        return None

    def metadata(self, directory):
        return None

    def finalize(self, directory) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(_DelayHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class _DelayArgs(ocp.args.CheckpointArgs):
    seconds: float = 0.0


def _save_delay() -> float:
    return float(os.environ.get(SAVE_DELAY_ENV) or 0.0)


# ----------------------------------------------------------------------------- the manager


class Checkpointer:
    """Async, atomic, multi-host checkpoints of a run directory (see the module docstring)."""

    def __init__(self, workdir: str, keep: int = 3, keep_best: bool = False, async_save: bool = True,
                 read_only: bool = False):
        self.workdir = storage.normalize(workdir, "workdir")
        self.directory = storage.join(self.workdir, "checkpoints")
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        if keep_best:  # lowest eval loss among steps saved with metrics; LatestN keeps the rest
            policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True,
                                                          n=1, keep_checkpoints_without_metrics=False))
        self._read_only = read_only
        self._keep, self._state_bytes, self._failed = keep, 0, False
        self._in_flight: Optional[int] = None  # the step the last save started (named if it fails)
        quiet_checkpoint_noise()  # a damaged step's failed reads print nothing but our warning
        storage.bound_tensorstore_retries()
        self._options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save)
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler(), "integrity": ocp.JsonCheckpointHandler()}
        if _save_delay():
            handlers["delay"] = _DelayHandler()
        return ocp.CheckpointManager(self.directory, options=self._options, item_handlers=handlers)

    # -- saving

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config, metrics: Optional[dict] = None) -> bool:
        """Start an async save of `step`; returns at once after the device->host copy.
        `metrics` ({'eval_loss': x}) ranks the step for keep_best."""
        items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                     config=ocp.args.JsonSave(config_to_json(config)),
                     integrity=ocp.args.JsonSave({"fingerprint": state_fingerprint(state)}))
        if _save_delay():
            items["delay"] = _DelayArgs(_save_delay())
        self._state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
        started = self._reporting_disk_full(self.manager.save, step, args=ocp.args.Composite(**items),
                                            metrics=metrics)
        self._in_flight = step
        return started

    def _last_committed(self):
        try:
            return self.manager.latest_step()
        except Exception:  # noqa: BLE001 - the storage that failed the save may fail this too
            return "unknown (the storage did not answer)"

    def wait(self) -> None:
        self._reporting_disk_full(self.manager.wait_until_finished)

    def close(self) -> None:
        if self._failed:  # reported once; what is left to wait for failed with it
            with contextlib.suppress(Exception):
                self.manager.close()
            self._remove_partial(self._in_flight)  # again: the failed save's other writers may have gone on
            return
        self.wait()
        self.manager.close()

    def _remove_partial(self, step: Optional[int]) -> None:
        """The failed save's `<step>.orbax-checkpoint-tmp*` on a local disk: never committed, so no
        reader uses it, and left in place it keeps the disk full until the next run's orbax clears it.
        (On GCS an unfinished step takes no local space; the next run clears it.)"""
        if step is None or storage.is_remote(self.directory):
            return
        for partial in glob.glob(os.path.join(glob.escape(self.directory), f"{step}.orbax-checkpoint-tmp*")):
            shutil.rmtree(partial, ignore_errors=True)

    def _reporting_disk_full(self, fn: Callable, *args, **kwargs):
        """fn(...), with a full disk (the previous async save's, surfacing here) as one DiskFullError,
        and cloud storage that stopped answering (tensorstore and gcsfs gave up retrying) as one
        StorageUnavailable (exit 75: rerun to resume; the unfinished step is never committed)."""
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if not self._failed and storage.is_remote(self.directory) and storage.is_transient(err):
                self._failed = True
                raise storage.StorageUnavailable(
                    f"saving checkpoint step {self._in_flight} to {self.directory} failed: the storage service did "
                    f"not answer ({describe_error(err)}). The step was not committed; the last committed one is "
                    f"step {self._last_committed()}. Rerun the same command when the storage is reachable to "
                    f"resume from it.") from None
            if self._failed or not is_disk_full(err):
                raise
            self._failed = True
            self._remove_partial(self._in_flight)  # it holds the space the user is about to free
            free = shutil.disk_usage(self.directory).free
            raise DiskFullError(
                f"the disk of {self.directory} is full: saving checkpoint step {self._in_flight} failed (no space "
                f"left on device). One checkpoint of this state needs about {human_bytes(self._state_bytes)}, and "
                f"keep_checkpoints={self._keep} needs about {human_bytes(self._state_bytes * (self._keep + 1))} while "
                f"a new one is written; {human_bytes(free)} is free now. The last good checkpoint is step "
                f"{self.manager.latest_step()}: free some space (or lower keep_checkpoints) and rerun the same "
                f"command to resume from it.") from None

    # -- restoring

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def saved_records(self, step: int) -> tuple[dict, dict]:
        """(config, data) JSON items of `step`: what a resume compares before reading arrays."""
        items = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                                   data=ocp.args.JsonRestore()))
        return items["config"], items["data"]

    def saved_arrays(self, step: int):
        """The saved state's array metadata tree (shapes, dtypes); reads no array data."""
        return self.manager.item_metadata(step)["state"].tree

    def check_compatible(self, step: int, abstract_state: Any, config_json: Optional[dict],
                         saved_arrays: Any = None) -> None:
        """CheckpointError naming the differing arrays and config fields, before any array is read."""
        saved_arrays = self.saved_arrays(step) if saved_arrays is None else saved_arrays
        mismatches = shape_mismatches(saved_arrays, abstract_state)
        if mismatches:
            try:
                diffs = config_differences(self.saved_config(step), config_json) if config_json else []
            except Exception:  # noqa: BLE001 - an unreadable config item: the array names still say enough
                diffs = []
            raise CheckpointError(incompatibility_message(self.directory, step, mismatches, diffs))

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict, dict]:
        """(state, data_state, config_json) of `step` (default: latest), restored into the
        shardings carried by `abstract_state` (ShapeDtypeStructs): any mesh, any device count."""
        step = self.manager.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(), integrity=ocp.args.JsonRestore()))
        expected = restored["integrity"]["fingerprint"]
        actual = state_fingerprint(restored["state"])
        bad = sorted(name for name in expected if actual.get(name) != expected[name])
        if bad or set(actual) != set(expected):
            raise OSError(f"array contents differ from the fingerprint written at save time: {', '.join(bad[:5])}")
        return restored["state"], restored["data"], restored["config"]

    def restore_latest(self, abstract_state: Any, config_json: Optional[dict] = None,
                       check_run: Callable[[int, dict, dict], None] | None = None) -> Optional[Restored]:
        """The newest step that restores and verifies; older ones are tried after a corrupt
        one (which is moved aside with a warning). None when there is no checkpoint.
        `check_run(step, saved config, saved data)` may refuse the step (train/samerun.py)
        after the shapes are checked and before any array is read.

        An incompatible config raises CheckpointError at once: that is a user error to fix,
        not damage to skip. So does finding every checkpoint corrupt: silently starting over
        would throw a long run away; the message says how to start over on purpose."""
        skipped = []
        for step in reversed(self.all_steps()):
            try:
                saved_arrays = self.saved_arrays(step)
                records = self.saved_records(step) if check_run else None
            except Exception as err:  # noqa: BLE001 - unreadable metadata: a damaged step directory
                self._skip_corrupt(step, err)
                skipped.append(step)
                continue
            if isinstance(saved_arrays, dict) and set(saved_arrays) == {"params"}:  # `magic hf import`: params, no optimizer state to resume
                raise CheckpointError(f"{self.workdir} holds imported params only (no optimizer state), so it is not "
                                      f"resumed: fine-tune it in a new run with `magic train --init-from "
                                      f"{self.workdir} --workdir NEW_RUN`.")
            self.check_compatible(step, abstract_state, config_json, saved_arrays)
            if check_run and records is not None:  # records are read whenever check_run is given
                check_run(step, *records)
            try:
                state, data, config = self.restore(abstract_state, step)
            except Exception as err:  # noqa: BLE001 - any failure to restore means a damaged step: try the one before
                self._skip_corrupt(step, err)
                skipped.append(step)
                continue
            return Restored(step, state, data, config)
        if skipped:
            raise CheckpointError(f"every checkpoint in {self.directory} (steps {sorted(skipped)}) is corrupt or "
                                  f"partial; they were moved to {storage.join(self.workdir, CORRUPT_DIR)}. Rerun to "
                                  f"start this run over from step 0, or use another --workdir.")
        return None

    def _skip_corrupt(self, step: int, err: Exception) -> None:
        """Warn, move the step directory to checkpoints.corrupt/ (primary process), reload."""
        target = storage.join(self.workdir, CORRUPT_DIR, f"{step}-{int(time.time())}")
        warnings.warn(f"checkpoint step {step} in {self.directory} is corrupt or partial ({describe_error(err)}); "
                      f"moved it to {target} and trying the previous one.", CheckpointWarning, stacklevel=3)
        if not self._read_only and jax.process_index() == 0:
            storage.move(storage.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"matrixmagic_skip_checkpoint_{step}")
        self.manager.close()
        self.manager = self._open()


# ----------------------------------------------------------------------------- params only


def resolve_checkpoint(path: str) -> tuple[str, Optional[int]]:
    """(run workdir, step or None for the latest) from a run dir, its checkpoints/ dir or a step dir."""
    path = storage.normalize(path, "workdir")
    base = storage.basename(path)
    if base.isdigit() and storage.basename(storage.parent(path)) == "checkpoints":
        return storage.parent(storage.parent(path)), int(base)
    if base == "checkpoints":
        return storage.parent(path), None
    return path, None


def _verified_params(ckpt: Checkpointer, step: int, abstract_params: Any, config_json: dict | None,
                     flag: str) -> Any:
    """Step `step`'s params alone, checked against their saved fingerprints (the optimizer
    state is neither read nor verified). CheckpointError for other shapes (the user's to fix);
    any other error means the step is damaged."""
    saved = {"params": ckpt.saved_arrays(step)["params"]}
    mismatches = shape_mismatches(saved, {"params": abstract_params})  # names read 'params/...
    if mismatches:
        diffs = config_differences(ckpt.saved_config(step), config_json) if config_json else []
        raise CheckpointError(incompatibility_message(ckpt.directory, step, mismatches, diffs, fix=(
            f"give {flag} a run whose model has this run's shapes, or set the model fields to its values")))
    item = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    restored = ocp.PyTreeCheckpointer().restore(
        storage.join(ckpt.directory, str(step), "state"),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    expected = ckpt.manager.restore(step, args=ocp.args.Composite(
        integrity=ocp.args.JsonRestore()))["integrity"]["fingerprint"]
    bad = sorted(name for name, value in state_fingerprint({"params": restored["params"]}).items()
                 if expected.get(name) != value)
    if bad:
        raise OSError(f"params differ from the fingerprint written at save time: {', '.join(bad[:5])}")
    return restored["params"]


def newest_good(ckpt: Checkpointer, steps: list[int], load: Callable[[int], Any], what: str) -> tuple[Any, int]:
    """(load(step), step) for the newest of `steps` that loads. A reader never moves a damaged
    step (the run's writer may be using the directory): it skips it with one warning naming it.
    CheckpointError (a user error) stops at once; every step damaged is a CheckpointError too."""
    skipped = []
    for step in sorted(steps, reverse=True):
        try:
            result = load(step)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - tensorstore, orbax and JSON errors all mean a damaged step
            skipped.append((step, err))
            continue
        if skipped:
            names = ", ".join(f"step {s} ({describe_error(e)})" for s, e in skipped)
            warnings.warn(f"{what}: skipped corrupt or partial checkpoint {names}; loaded step {step} instead (the "
                          f"damaged step is left in place: the next `magic train` on the run moves it aside).",
                          CheckpointWarning, stacklevel=3)
        return result, step
    raise CheckpointError(f"{what}: every checkpoint ({', '.join(f'step {s}' for s, _ in skipped)}) in "
                          f"{ckpt.directory} is corrupt or partial ({describe_error(skipped[0][1])}).")


def restore_params(path: str, abstract_params: Any, config_json: Optional[dict] = None,
                   flag: str = "--init-from") -> tuple[Any, int]:
    """(params, step) from another run's checkpoint, into `abstract_params`' shardings;
    shapes are checked first and a mismatch names the parameters. A run directory gives its
    newest good step (a damaged one is skipped with a warning); a step directory that step."""
    workdir, step = resolve_checkpoint(path)
    ckpt = Checkpointer(workdir, async_save=False, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps or (step is not None and step not in steps):
            raise CheckpointError(f"{flag} {path!r}: no checkpoint found there; give a run directory (its "
                                  f"checkpoints/ holds numbered steps) or a step directory like RUN/checkpoints/500.")
        return newest_good(ckpt, [step] if step is not None else steps,
                           lambda s: _verified_params(ckpt, s, abstract_params, config_json, flag), f"{flag} {path}")
    finally:
        ckpt.close()


def _run_steps(workdir: str, ckpt: Checkpointer) -> list[int]:
    steps = ckpt.all_steps()
    if not steps:
        raise NoCheckpointError(f"--workdir {workdir!r} has no checkpoint; train one with "
                                f"`magic train --set workdir={workdir}` first (or `magic hf import`).")
    return steps


def saved_run_records(workdir: str):
    """(TrainConfig, data record) of a run directory's newest checkpoint whose records read,
    without loading any array (a damaged step is skipped; its params load warns about it).
    The data record of a `magic hf import` step holds `imported_from`."""
    ckpt = Checkpointer(workdir, async_save=False, read_only=True)

    def records(step: int):
        config, data = ckpt.saved_records(step)
        return config_from_json(config), data

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            return newest_good(ckpt, _run_steps(workdir, ckpt), records, f"--workdir {workdir}")[0]
    finally:
        ckpt.close()


def saved_run_config(workdir: str):
    """The TrainConfig of a run directory's newest readable checkpoint (saved_run_records)."""
    return saved_run_records(workdir)[0]


def load_params(workdir: str):
    """(params, TrainConfig) of the newest good checkpoint in a run directory, on the default
    device. Only the params are read and verified (not the optimizer state: two thirds of the
    bytes), so a run imported with params alone (`magic hf import`) loads like a trained one,
    and damage confined to the optimizer state does not stop a reader."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ckpt = Checkpointer(workdir, async_save=False, read_only=True)

    def load(step: int):
        config_json = ckpt.saved_config(step)
        config = config_from_json(config_json)
        abstract = jax.eval_shape(lambda: create_train_state(config.model, make_tx(config), jax.random.PRNGKey(0)))
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract.params)
        return _verified_params(ckpt, step, params, config_json, "--workdir"), config

    try:
        return newest_good(ckpt, _run_steps(workdir, ckpt), load, f"--workdir {workdir}")[0]
    finally:
        ckpt.close()
