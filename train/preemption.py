"""Stopping cleanly when asked to: SIGTERM, a TPU preemption notice, or Ctrl-C.

The contract (documented in `magic train --help`): the run finishes the step in flight,
saves a checkpoint of it, waits for that save to be committed, and exits with
EXIT_PREEMPTED = 75 (EX_TEMPFAIL, "temporary failure, retry"). Rerunning the same command
resumes from that step. A second Ctrl-C aborts at once (KeyboardInterrupt), for when the
save itself hangs.

Why this shape:

* A Python signal handler only sets a flag; the loop polls it once per step (a bool read),
  so no JAX call ever runs inside a handler and no step is interrupted half-way.
* Several processes must stop at the *same* step, or the collective save hangs. JAX's
  preemption sync manager (started by `jax.distributed.initialize`) already turns a
  SIGTERM on any host -- and the TPU maintenance-event notice -- into one agreed step, via
  `reached_preemption_sync_point(step)`, which every process calls every step (orbax's
  `CheckpointManager.reached_preemption` wraps it). So with several processes we leave
  SIGTERM to JAX and only forward Ctrl-C to it by sending ourselves SIGTERM; with one
  process we handle both signals here.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable, Optional

EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: stopped on request, resumable by rerunning
EXIT_NONFINITE = 3  # the loss or gradient norm became NaN/Inf; the last good checkpoint is kept
SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}


class PreemptionGuard:
    """Context manager: installs the handlers on entry, restores the previous ones on exit.

    `should_stop(step)` is True from the first step after a request; `reason` says why.
    `sync_point(step) -> bool` is the multi-host agreement check (default: JAX's, when
    more than one process runs; never with one process, where it would only raise).
    """

    def __init__(self, sync_point: Optional[Callable[[int], bool]] = None, multiprocess: Optional[bool] = None):
        if multiprocess is None:
            multiprocess = jax_preemption_service_running()
        self.multiprocess = multiprocess
        self.sync_point = sync_point if sync_point is not None else (_jax_sync_point if multiprocess else None)
        self.reason: Optional[str] = None
        self._previous: dict = {}
        self._interrupts = 0

    def __enter__(self) -> "PreemptionGuard":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def install(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        signals = (signal.SIGINT,) if self.multiprocess else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:  # second Ctrl-C: the user wants out now
                raise KeyboardInterrupt
            if self.multiprocess:  # let JAX's preemption notifier pick a step all hosts agree on
                self.reason = SIGNAL_NAMES[signal.SIGINT]
                os.kill(os.getpid(), signal.SIGTERM)
                return
        self.reason = self.reason or SIGNAL_NAMES.get(signum, f"signal {signum}")

    def request(self, reason: str) -> None:
        """Ask the loop to stop after the current step (tests, embedding code)."""
        self.reason = reason

    def should_stop(self, step: int) -> bool:
        """Poll once per step, on every process, with the step just finished."""
        if self.sync_point is not None:
            if self.sync_point(step):
                self.reason = self.reason or "preemption notice (SIGTERM or TPU maintenance event)"
                return True
            return False  # several processes: only the agreed step counts, never a local flag
        return self.reason is not None


def jax_preemption_service_running() -> bool:
    """True when several processes run and `jax.distributed` started its preemption sync
    manager (it is off with jax_enable_preemption_service=False; then each host only sees
    its own signals, and a multi-host stop needs every host signalled, e.g. by the scheduler)."""
    import jax

    if jax.process_count() <= 1:
        return False
    from jax._src import distributed

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


def _jax_sync_point(step: int) -> bool:
    """JAX's cross-host preemption agreement; False where the service is not running."""
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # jax.distributed not initialized, or the preemption service disabled
        return False
