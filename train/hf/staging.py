"""Where `hf import` and `hf export` write, and how the result becomes visible: all or nothing.

On a local disk the tree is written into a temporary sibling (`RUN.importing-<pid>`) and
renamed into place at the end: a failure removes the sibling (Ctrl-C and SIGTERM too: they
are exceptions then, train/interrupts.py), and the rename is atomic. The sibling holds the same
marker as a bucket (below), removed just before the rename; a process killed outright (kill -9,
a power cut) leaves the sibling, and the next run for that target from this host removes it
once that process is gone. A sibling without our marker, or another host's, is left alone.

Cloud Storage has no rename (a "move" is a copy and a delete per object, which a crash can
stop halfway, leaving parts at both names), so a `gs://` target is written in place, and
what makes it usable is written last:

* an import's run is usable once its checkpoint step 0 is committed, and orbax commits a
  step atomically on GCS too (a reader, `magic generate` or `--init-from`, sees no step
  before that); the tokenizer files are written before it;
* an export's directory is loadable once `config.json` is there, so it is written last.

A marker object (`.importing` / `.exporting`: host, pid, start time) is written first and
deleted last, so an unfinished tree is recognizable as one: a failure removes the prefix
(it was empty, checked first), and a process killed outright leaves the marker. The next run
into that prefix from the same host clears it when the process that wrote it is gone; a
marker of a live process, or of another host, is refused with the command that removes it:
nothing anyone else may still be writing is ever deleted.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
from collections.abc import Iterator

from .. import storage
from ..pids import pid_alive
from .errors import HFError


def _marker(target: str, verb: str) -> str:
    return storage.join(target, f".{verb}")



def _stale_marker(target: str, names: list[str], verb: str, flag: str) -> bool:
    """True when `target` holds only the remains of an unfinished `verb` of ours whose process
    is gone (cleared by the caller); HFError when it is someone else's or may still run."""
    marker = f".{verb}"
    if marker not in names:
        return False
    try:
        owner = json.loads(storage.read_text(_marker(target, verb)))
        host, pid, started = owner["host"], int(owner["pid"]), owner["started"]
    except (ValueError, KeyError, TypeError, OSError):
        host, pid, started = "?", -1, "?"
    if host == socket.gethostname() and pid > 0 and not pid_alive(pid):
        return True
    raise HFError(f"{flag} {target} holds an unfinished {verb[:-3]} (started {started} by pid {pid} on {host}), and "
                  f"that process may still be writing. If it is gone, remove it (`gcloud storage rm -r {target}`) "
                  f"and rerun; or choose a new directory.")


def check_fresh(target: str, flag: str, verb: str) -> None:
    """HFError unless `target` is absent or empty (or, on GCS, the remains of our own
    unfinished `verb` whose process is gone, which are removed); nothing is ever overwritten."""
    if storage.is_remote(target):
        storage.check_bucket(target, flag)
        if not storage.exists(target):
            return
        if storage.is_dir(target):
            names = storage.listdir(target)
            if not names:
                return
            if _stale_marker(target, names, verb, flag):
                storage.remove_tree(target)
                return
    elif not os.path.exists(target) or (os.path.isdir(target) and not os.listdir(target)):
        parent = os.path.dirname(target) or "."
        os.makedirs(parent, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise HFError(f"{flag} {target}: its parent directory is not writable.")
        return
    raise HFError(f"{flag} {target} already exists and is not empty: nothing is ever overwritten; choose a new "
                  f"directory or remove that one.")


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}


def _is_stale_sibling(path: str, pid: int, verb: str) -> bool:
    """Our own unfinished tree (its marker names this host and `pid`) whose process is gone."""
    try:
        with open(os.path.join(path, f".{verb}"), encoding="utf-8") as f:
            owner = json.load(f)
        ours = owner["host"] == socket.gethostname() and int(owner["pid"]) == pid
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return ours and not pid_alive(pid)


def clear_stale_siblings(target: str, verb: str) -> list[str]:
    """Remove `target.<verb>-<pid>` folders that a killed run of ours left (see the module
    docstring); returns what was removed."""
    parent, prefix = os.path.dirname(target) or ".", f"{os.path.basename(target)}.{verb}-"
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in names:
        pid = name[len(prefix):]
        path = os.path.join(parent, name)
        if name.startswith(prefix) and pid.isdigit() and _is_stale_sibling(path, int(pid), verb):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _finish_local(tmp: str, target: str, verb: str) -> None:
    try:
        os.remove(_marker(tmp, verb))  # the finished tree carries no "unfinished" marker
        if os.path.isdir(target):
            os.rmdir(target)  # empty (checked first): the rename needs the name free
        os.rename(tmp, target)
    except OSError as err:  # e.g. a `magic train` started writing there meanwhile (train/runlock.py)
        raise HFError(f"{target} was created or written by another process while this one wrote "
                      f"({err.strerror}); nothing was overwritten: choose a new directory.") from None


@contextlib.contextmanager
def staged(target: str, verb: str) -> Iterator[str]:
    """The directory to write `target`'s tree into (see the module docstring); on success the
    tree is in place, on any failure (Ctrl-C included) nothing of it is left."""
    if storage.is_remote(target):
        marker = _marker(target, verb)
        storage.write_text(marker, json.dumps(_owner()))
        try:
            yield target
            storage.path(marker).unlink()
        except BaseException:
            with contextlib.suppress(Exception):  # the storage may be what failed; the marker then says it all
                storage.remove_tree(target)
            raise
        return
    clear_stale_siblings(target, verb)
    tmp = f"{target}.{verb}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with open(_marker(tmp, verb), "w", encoding="utf-8") as f:
            json.dump(_owner(), f)
        yield tmp
        _finish_local(tmp, target, verb)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
