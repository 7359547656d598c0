"""Guards that stop a run before it wastes compute or overwrites good state.

* Non-finite steps. The jitted step keeps the previous params and optimizer state when the
  loss or the gradient norm is NaN/Inf (`jnp.where` on the new state, decided on device),
  so the state in memory is always a good one and nothing per step waits for the host.
  The host reads the per-step flags only where it syncs anyway (log steps, before every
  save, at the end) and stops once more than `max_nonfinite_skips` steps were skipped,
  naming the first bad step. A save is never made after an unchecked step, so a bad state
  cannot reach disk and the last good checkpoint stays the latest.
* Disk. Before compiling anything: the workdir must have room for at least one checkpoint
  (the unsharded state bytes); fewer than `keep + 1` fits only warns, with a DiskSpaceWarning
  (a ResourceWarning would be hidden by Python's default filters). A disk that fills up
  during a save is reported once by the checkpointer (train/checkpoint.py DiskFullError).
"""

from __future__ import annotations

import shutil
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

from matrixmagic.configs import ConfigError


class DiskSpaceWarning(UserWarning):
    """The workdir may run out of space before the run ends."""


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm became NaN/Inf more often than allowed; names the step."""


def skip_nonfinite(step_fn: Callable) -> Callable:
    """step_fn(state, batch) -> (state, metrics), made to keep the old params and optimizer
    state when loss or grad_norm is non-finite. The step counter still advances (the batch
    was consumed) and metrics gain 'nonfinite' (1.0 for a skipped step)."""

    def guarded(state, batch):
        new_state, metrics = step_fn(state, batch)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        return kept.replace(step=new_state.step), {**metrics, "nonfinite": 1.0 - ok.astype(jnp.float32)}

    return guarded


class NonFiniteMonitor:
    """Host side of the guard: collects each step's device flags unread, checks them in one
    transfer when the loop syncs anyway."""

    def __init__(self, max_skips: int, skipped: int = 0, hint: str = ""):
        self.max_skips, self.skipped, self.hint = max_skips, skipped, hint
        self._pending: list[tuple[int, Any]] = []

    def record(self, step: int, metrics: dict) -> None:
        self._pending.append((step, {k: metrics[k] for k in ("nonfinite", "loss", "grad_norm")}))

    def check(self, last_good_checkpoint: str) -> None:
        """Raise NonFiniteError once the skipped steps exceed max_skips; else count and clear."""
        if not self._pending:
            return
        values = jax.device_get([m for _, m in self._pending])
        steps = [s for s, _ in self._pending]
        self._pending.clear()
        for step, m in zip(steps, values):
            if float(m["nonfinite"]) == 0.0:
                continue
            self.skipped += 1
            if self.skipped > self.max_skips:
                raise NonFiniteError(nonfinite_message(step, float(m["loss"]), float(m["grad_norm"]),
                                                       self.skipped, self.max_skips, last_good_checkpoint, self.hint))
            warnings.warn(f"step {step}: loss {float(m['loss'])}, grad_norm {float(m['grad_norm'])}: update skipped "
                          f"({self.skipped} of max_nonfinite_skips={self.max_skips}).", RuntimeWarning)


def nonfinite_message(step: int, loss: float, grad_norm: float, skipped: int, max_skips: int,
                      last_good: str, hint: str) -> str:
    return (f"non-finite training at step {step}: loss {loss}, grad_norm {grad_norm}. That step's update was not "
            f"applied and nothing after it was saved ({skipped} non-finite step(s), max_nonfinite_skips={max_skips}); "
            f"the last good checkpoint is {last_good}. {hint}".rstrip())


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def check_free_space(workdir: str, checkpoint_bytes: int, keep: int) -> None:
    """ConfigError when `workdir` cannot hold one checkpoint of `checkpoint_bytes`;
    a warning when it cannot hold keep + 1 (orbax writes the new one before deleting).
    A bucket has no free-space figure to check (its quota errors surface at the save)."""
    if workdir.startswith("gs://"):
        return
    free = free_bytes(workdir)
    if free < checkpoint_bytes:
        raise ConfigError(f"workdir={workdir!r} has {human_bytes(free)} free but one checkpoint of this state needs "
                          f"about {human_bytes(checkpoint_bytes)}: free some space or choose another with --workdir PATH.")
    needed = checkpoint_bytes * (keep + 1)
    if free < needed:
        warnings.warn(f"workdir={workdir!r} has {human_bytes(free)} free; keeping keep_checkpoints={keep} checkpoints "
                      f"needs about {human_bytes(needed)}. Lower keep_checkpoints or free space.", DiskSpaceWarning)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
