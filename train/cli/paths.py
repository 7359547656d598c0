"""Output paths the CLI writes (pictures, executables): checked before any work, by a real write.

Why a real write and not os.access: root passes os.access on folders it still cannot write
(read-only mounts, /sys), and a refusal found after a minutes-long compile costs the compile.

A `gs://` URL is checked the same way, through train/storage.py: its scheme and bucket
(any other scheme is refused naming the flag, instead of becoming a local folder named
`s3:`), credentials, then a small probe object written and deleted beside the target.
Cloud Storage has no directories to create or test with os.path: a folder is a prefix.
"""

from __future__ import annotations

import os

from matrixmagic.configs import ConfigError

from .. import storage


def _probe(folder: str) -> None:
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    open(probe, "wb").close()
    os.remove(probe)


def _probe_remote(folder: str, target: str, flag: str) -> None:
    """A small object written and removed in `folder`: the bucket takes writes."""
    probe = storage.join(folder, f".write-test-{os.getpid()}")
    try:
        storage.retrying(lambda: storage.write_bytes(probe, b""), f"{flag} {target!r}")
        storage.retrying(lambda: storage.path(probe).unlink(), f"{flag} {target!r}")
    except storage.StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - gcsfs raises OSError/HttpError/ValueError for the same refusals
        raise storage.classify(err, target, flag) from None


def is_dir(path: str) -> bool:
    """A local directory, or a gs:// prefix that holds objects."""
    return storage.is_dir(path) if storage.is_remote(path) else os.path.isdir(path)


def output_path(path: str, flag: str) -> str:
    """A gs:// URL normalized (another scheme refused, naming `flag`); a local path with `~`
    expanded, since a quoted '~/x' reaches us unexpanded and would become a folder named `~`."""
    return storage.normalize(path, flag) if storage.is_url(path) else os.path.expanduser(path)


def expanded_path_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """`argv` with `~` expanded in the values of `flags` (`--flag VALUE` and `--flag=VALUE`), for a
    command line handed on to another program's parser (`magic lm-eval`), which reads a quoted
    '~/out' literally. URLs are left alone."""
    out = list(argv)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if eq and flag in flags and not storage.is_url(value):
            out[i] = f"{flag}={os.path.expanduser(value)}"
        elif arg in flags and i + 1 < len(out) and not storage.is_url(out[i + 1]):
            out[i + 1] = os.path.expanduser(out[i + 1])
    return out


def check_output_file(path: str, flag: str) -> str:
    """`path` can be written as a file: its folder exists and takes a write; nothing is left behind.
    Returns the path to write (a gs:// URL normalized)."""
    path = output_path(path, flag)
    if storage.is_remote(path):
        storage.check_bucket(path, flag)  # credentials and bucket, before asking anything of it
        if is_dir(path):
            raise ConfigError(f"{flag} {path!r} is a folder (objects are stored under it): give a file name in it, "
                              f"e.g. {flag} {storage.join(path, 'out')}.")
        _probe_remote(storage.parent(path), path, flag)
        return path
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a directory: give a file name in it, e.g. "
                          f"{flag} {os.path.join(path, 'out')}.")
    if not os.path.isdir(folder):
        raise ConfigError(f"{flag} {path!r}: its folder {folder!r} does not exist (or is a file): create it first "
                          f"or give another path.")
    try:
        _probe(folder)
    except OSError as err:
        raise ConfigError(f"{flag} {path!r} cannot be written ({err.strerror}): give a path in a folder you can "
                          f"write.") from None
    return path


def check_output_dir(path: str, flag: str) -> str:
    """`path` is (made now) a directory that takes a write. Returns the path to write (a gs://
    URL normalized; on GCS nothing is made: a folder is the prefix of its objects)."""
    path = output_path(path, flag)
    if storage.is_remote(path):
        storage.check_bucket(path, flag)
        if storage.exists(path) and not is_dir(path):
            raise ConfigError(f"{flag} {path!r} is an object (a file): give a folder, e.g. {flag} "
                              f"{storage.join(storage.parent(path), 'plots')}.")
        _probe_remote(path, path, flag)
        return path
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a file: give a directory, e.g. {flag} plots/.")
    try:
        os.makedirs(path, exist_ok=True)
        _probe(path)
    except OSError as err:
        raise ConfigError(f"{flag} {path!r} cannot be written ({err.strerror}): give a directory you can write, "
                          f"e.g. {flag} plots/.") from None
    return path
