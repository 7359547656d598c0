"""Signals outside the train loop: one line, a conventional exit code, and nothing half-written.

The train loop stops at a step boundary and saves (train/preemption.py: SIGTERM or Ctrl-C ->
exit 75). Every other command (`magic data`, `hf import/export`, start-up before the loop)
has no step to finish, so a signal ends it where it is, through the cleanups on its way out:
`hf` writes into a temporary sibling that an exception removes (train/hf/staging.py). Why
this shape:

* SIGTERM becomes `Terminated`, a BaseException like KeyboardInterrupt: the default action
  (death by signal) skips every `finally`, which is how `*.importing-<pid>/` folders were
  left behind; `except Exception` handlers still let it through.
* Exit codes: 130 for Ctrl-C (128 + SIGINT, what a shell shows for an interrupted command),
  75 for SIGTERM (EXIT_PREEMPTED, as the train loop: stopped on request, rerun to redo).
* After the one line the process leaves with os._exit (`leave`): the cleanups have run on the
  way out, but a compile or data thread may still be inside XLA, and the interpreter's
  finalization under it crashed (SIGSEGV, exit 139 after the line, Ctrl-C 3-6 s into
  `magic train`, while the first step compiled).
* A library that catches the KeyboardInterrupt and raises its own error from it would make a
  traceback: `signal_in_chain` finds the signal behind it.
* Python ignores an exception raised inside a gc callback (jax registers one), printing it as
  "Exception ignored in ..." with a traceback, and the command then went on to exit 0: a
  Ctrl-C that lands there is delivered again, so it reaches the code that runs next.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator

from .preemption import EXIT_PREEMPTED

EXIT_INTERRUPTED = 130  # 128 + SIGINT


class Terminated(BaseException):
    """SIGTERM outside the train loop (which handles it itself)."""


_EXCEPTIONS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}


def _handle(signum, frame) -> None:
    if _stopping.is_set():  # already stopping: a further Ctrl-C has nothing to add
        return
    raise _EXCEPTIONS[signum]()


# Set once a signal's exception leaves `raised_as_exceptions`: the command is stopping, so a
# redelivery still in flight must not arrive after the default handler is back (it would kill the
# process by SIGINT at exit, -2, after the one line was printed).
_stopping = threading.Event()


def _resend(signum: int) -> None:
    if not _stopping.is_set():
        os.kill(os.getpid(), signum)


def _redelivering(previous_hook):
    """sys.unraisablehook that sends a swallowed interrupt again instead of printing it."""

    def hook(unraisable) -> None:
        for signum, kind in _EXCEPTIONS.items():
            if isinstance(unraisable.exc_value, kind):
                # Sent again from another thread: signal.raise_signal or os.kill here would run the
                # handler at once, inside this hook, where its exception is ignored too.
                threading.Timer(0.01, _resend, (signum,)).start()
                return
        previous_hook(unraisable)

    return hook


@contextlib.contextmanager
def raised_as_exceptions() -> Iterator[None]:
    """SIGINT -> KeyboardInterrupt, SIGTERM -> Terminated while the block runs (main thread
    only); the previous handlers and hook are restored after (tests call `main()` in-process),
    unless a signal stopped the block: the command is then ending, and further signals are ignored
    until it exits (a Ctrl-C pressed again and again must not interrupt the one line, or a
    __del__ on the way out, which printed "Exception ignored in ... __del__" and a traceback).
    The interrupted frames are freed here too, while the handler still ignores: their objects'
    finalizers (orbax's checkpointer) otherwise ran later, under the default handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handle) for sig in _EXCEPTIONS}
    previous_hook, sys.unraisablehook = sys.unraisablehook, _redelivering(sys.unraisablehook)
    _stopping.clear()
    try:
        yield
    except BaseException as err:
        if signal_in_chain(err):
            _stopping.set()
            traceback.clear_frames(err.__traceback__)
            gc.collect()
        raise
    finally:
        sys.unraisablehook = previous_hook
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if _stopping.is_set() else handler)


def signal_in_chain(err: BaseException) -> KeyboardInterrupt | Terminated | None:
    """The Ctrl-C or SIGTERM that `err` was raised from or while handling, if any."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (KeyboardInterrupt, Terminated)):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def leave(code: int) -> int:
    """`code`, or, when a signal stopped the command, exit with it at once (flushing the console
    first) instead of through interpreter finalization: see the module docstring. Called by the
    entry points, after main(), never by main() itself (tests call that in-process)."""
    if _stopping.is_set():
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    return code


def stopped(err: KeyboardInterrupt | Terminated) -> tuple[int, str]:
    """(exit code, what to say) for a signal's exception."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C): rerun the same command to finish (nothing half-written is used)."
    return EXIT_PREEMPTED, "stopped by SIGTERM: rerun the same command to finish (nothing half-written is used)."
