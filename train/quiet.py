"""Library noise kept off the console when a checkpoint is damaged, and errors told in a line.

* A failed tensorstore read leaves futures whose completion callbacks fire after orbax has
  closed the asyncio loop it ran them on; each prints "RuntimeError: Event loop is closed"
  through `sys.unraisablehook` (one per pending chunk: 120 for one quarantined step of a
  small run). Nothing is lost by dropping exactly those: the read already failed and was
  handled. Every other unraisable exception still reaches the previous hook.
* tensorstore's error text carries its whole JSON spec (`[tensorstore_spec='{...}']`) and
  the paths of the chunk files; `describe_error` keeps the status, the array and the reason.
* The same failed read leaves sibling tasks whose exceptions nobody awaits once orbax gave
  up on the step; asyncio logs each as "Task exception was never retrieved" with its
  traceback. Only those whose exception is a tensorstore status error (DATA_LOSS: ...,
  NOT_FOUND: ...) are dropped: that read already failed and was handled.
* orbax logs two warnings whenever a checkpoint is opened read-only (as every reader does);
  they say nothing a user can act on.
* A full disk during an async save makes orbax log the same ENOSPC traceback from each of
  its threads (51 for one failed save of the default run). The checkpointer reports it
  once, with the space needed (train/checkpoint.py `DiskFullError`), so those are dropped.
  So are the tracebacks of a save to a bucket that stopped answering (connection refused,
  timeouts: train/storage.py `is_transient`), reported once as StorageUnavailable.
"""

from __future__ import annotations

import errno
import logging
import re
import sys

from .storage import is_transient

_CLOSED_LOOP = "Event loop is closed"
_READ_ONLY_NOISE = ("Given directory is read only", "CheckpointManagerOptions.read_only=True")


def _drop_closed_loop(unraisable, previous=None) -> None:
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == _CLOSED_LOOP:
        return
    (previous or sys.__unraisablehook__)(unraisable)


def is_disk_full(err: BaseException | None) -> bool:
    """ENOSPC anywhere in the exception's chain (orbax wraps the OSError of its threads)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


_STATUS_ERROR = re.compile(r"[A-Z][A-Z_]+: ")  # tensorstore's absl status codes: 'DATA_LOSS: ...'


def _unretrieved_read_error(record: logging.LogRecord) -> bool:
    if record.name != "asyncio" or not str(record.msg).startswith("Task exception was never retrieved"):
        return False
    exc = record.exc_info[1] if record.exc_info else None
    return exc is not None and bool(_STATUS_ERROR.match(str(exc)))


def _storage_gone(record: logging.LogRecord, exc: BaseException | None) -> bool:
    """A save to a bucket that stopped answering: orbax logs it from each of its threads, gcsfs
    once more per request ('_request out of retries'); the checkpointer reports it in one line."""
    return record.levelno >= logging.ERROR and (is_transient(exc) or record.getMessage().startswith(
        "_request out of retries") or "Cannot connect to host" in record.getMessage())


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(_READ_ONLY_NOISE) or _unretrieved_read_error(record):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if _storage_gone(record, exc):
            return False
        return not (is_disk_full(exc) or "No space left on device" in record.getMessage())


_FILTER = _NoiseFilter()


def quiet_checkpoint_noise() -> None:
    """Install both filters once per process (idempotent; wraps whatever hook is installed)."""
    hook = sys.unraisablehook
    if getattr(hook, "_matrixmagic_quiet", False) is False:
        def quiet(unraisable, previous=hook):
            _drop_closed_loop(unraisable, previous)

        quiet._matrixmagic_quiet = True  # type: ignore[attr-defined]  # mypy does not model function attributes
        sys.unraisablehook = quiet
    for name in ("absl", "orbax", "asyncio", "gcsfs"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def describe_error(err: BaseException) -> str:
    """One short line for a read error: 'DATA_LOSS reading params.w: CRC-32C checksum
    verification failed: expected=..., actual=...' for tensorstore's, else 'Type: first line'."""
    text = re.sub(r"\s*\[tensorstore_spec=.*", "", str(err).strip(), flags=re.DOTALL)
    text = text.splitlines()[0].strip() if text else ""
    if not text:
        return type(err).__name__
    code = re.match(r"([A-Z][A-Z_]+): ", text)
    array = re.search(r'Error reading "([^"]+?)(?:/\.z\w+)?"', text)
    if code and array:
        parts = text.split(": ")
        return f"{code.group(1)} reading {array.group(1).rstrip('/')}: {': '.join(parts[-2:])}"[:300]
    text = re.sub(r' (?:at|of) local file "[^"]*"', "", text)
    return f"{type(err).__name__}: {text[:300]}"
