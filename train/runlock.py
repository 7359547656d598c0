"""One writer per run directory: an advisory lock on `<workdir>/run.lock`.

Why this shape:

* `fcntl.flock` on an open file, not a pid file: the kernel drops the lock when the holder's
  last descriptor closes, which includes any death (`kill -9`, OOM, a lost node on NFS once
  its lease expires). A stale lock cannot outlive its process, so nobody ever has to delete one.
* The lock file is truncated on release, not deleted: deleting it could let a third process lock
  a fresh inode while a second holds the old one: two writers. The one exception is `discard`,
  a first start refused before it wrote anything (issue 29: nothing left behind): it unlinks
  the file while still holding the lock, and `acquire` checks after locking that the path
  still names the file it locked, else locks the new one, so two inodes never both count.
* The holder writes who it is (host, pid, start time, command) into the file after locking,
  so a refused writer can name it. A reader of that text only ever reads, and tolerates an
  empty file (a holder that has locked but not yet written).
* Non-blocking: a second writer fails at once instead of queueing behind a run that may take
  days. Readers (`magic generate`, `magic explain`, `magic hf export`, `--init-from`) never
  take it: they read committed checkpoints, which orbax renames into place atomically.
* Filesystems without flock (some FUSE mounts) raise ENOLCK / EOPNOTSUPP: the run goes on
  with a warning rather than refusing to train there.

Pure Python (no jax): across processes of one run, process 0 takes it (train/loop.py).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import warnings

from matrixmagic.configs import ConfigError

LOCK_FILE = "run.lock"


class RunInUseError(ConfigError):
    """Another process holds the run directory's lock; the message names it."""


class LockWarning(UserWarning):
    """The run directory's filesystem cannot lock: nothing stops a second writer."""


def holder_record(command: str | None = None) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": command or " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:500]}


def describe_holder(text: str) -> str:
    """'pid 123 on host h, started 2026-11-29T15:00:00+00:00 (magic train ...)' from the lock file."""
    try:
        who = json.loads(text)
        return (f"pid {who['pid']} on host {who['host']}, started {who['started']} "
                f"({who.get('command', 'unknown command')})")
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its details (it locked a moment ago)"


class RunLock:
    """Exclusive, non-blocking lock of a run directory: `with RunLock(workdir): ...`."""

    def __init__(self, workdir: str, command: str | None = None):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        while True:
            fd = self._lock()
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # its holder discarded the file after we opened it: lock the one there now
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_record(self.command)).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _lock(self) -> int:
        """An open descriptor of the lock file, locked (or on a filesystem that cannot lock)."""
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(os.read(fd, 4096).decode("utf-8", errors="replace"))
            os.close(fd)
            raise RunInUseError(
                f"workdir={self.workdir!r} is in use by {holder}: one run directory has one writer. Wait for it "
                f"to finish (or stop it), or train into another --workdir; `magic generate` and `magic explain` "
                f"can read the run meanwhile.") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            warnings.warn(f"workdir={self.workdir!r}: this filesystem cannot lock files ({err.strerror}), so "
                          f"nothing stops a second `magic train` on it; run one at a time.", LockWarning)
        return fd

    def check(self) -> None:
        """A kernel lock cannot lapse while its process lives (the GCS lease can: train/lease.py)."""

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # the holder is gone; the file stays (see the module docstring)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def discard(self) -> None:
        """Release, deleting the lock file first while it is still held (see the module docstring):
        for a run that made its directory and leaves without writing anything else in it."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
