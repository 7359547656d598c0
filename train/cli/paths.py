"""Output paths the CLI writes (pictures, executables): checked before any work, by a real write.

Why a real write and not os.access: root passes os.access on folders it still cannot write
(read-only mounts, /sys), and a refusal found after a minutes-long compile costs the compile.
"""

from __future__ import annotations

import os

from matrixmagic.configs import ConfigError


def _probe(folder: str) -> None:
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    open(probe, "wb").close()
    os.remove(probe)


def check_output_file(path: str, flag: str) -> str:
    """`path` can be written as a file: its folder exists and takes a write; nothing is left behind."""
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
    """`path` is (made now) a directory that takes a write."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a file: give a directory, e.g. {flag} plots/.")
    try:
        os.makedirs(path, exist_ok=True)
        _probe(path)
    except OSError as err:
        raise ConfigError(f"{flag} {path!r} cannot be written ({err.strerror}): give a directory you can write, "
                          f"e.g. {flag} plots/.") from None
    return path
