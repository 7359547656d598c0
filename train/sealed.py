"""The file `magic compile --serialize` writes, and the check `magic train --compiled` makes
before anything in it is loaded.

Why a seal: a serialized XLA executable is code. jax's own format (`serialize_executable`) is
a pickle, and unpickling runs whatever the file says, so a file from anyone else is a program
from anyone else. The file is therefore

    MAGIC (8 bytes) | VERSION (2) | SHA-256 of the body (32) | HMAC-SHA256 tag (32) |
    metadata length (4) | body = metadata (JSON) + jax's executable bytes

and the reader checks, in this order and before any unpickling: the magic bytes (a file we
wrote at all; the first format was a bare pickle, refused unread), the version, the SHA-256
(a truncated or altered file), then the tag. The metadata is JSON, so only jax's own
bytes are ever unpickled, by jax, and only after every check passed.

Why an HMAC and not the hash alone: anyone who can write the file can rewrite a hash in it
(or in a sidecar beside it), so a hash says "intact", not "ours". The tag is keyed with a
secret only the user holds: a random key made on the first `--serialize` in
`~/.config/matrixmagic/executable.key` (mode 0600, `$XDG_CONFIG_HOME` respected), or
`MAGIC_EXECUTABLE_KEY` when set. A file is loaded only where the same key is: the machine
that compiled it, or pod hosts given the same `MAGIC_EXECUTABLE_KEY` (or the key file).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct

from matrixmagic.configs import ConfigError

MAGIC = b"\x89MMEXEC\n"  # the 0x89 and the newline catch a text-mode copy, as PNG's signature does
VERSION = 2  # 1: a bare pickle (no header), which cannot be checked without running it
HEADER = struct.Struct(">8sH32s32sI")
KEY_ENV = "MAGIC_EXECUTABLE_KEY"
RECOMPILE = "recompile it on this machine with `magic compile ... --serialize PATH` (same flags as the run)"


class CompiledFileRefused(ConfigError):
    """A --compiled file that is not ours, damaged, or signed with another key: never loaded."""


def key_path(env=os.environ) -> str:
    config_home = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config_home, "matrixmagic", "executable.key")


def _read_key(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _create_key(path: str) -> bytes:
    """A new random key, readable by this user only; a key another process made first wins."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    key = os.urandom(32).hex().encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path) or key
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    return key


def existing_key(env=os.environ) -> bytes | None:
    """MAGIC_EXECUTABLE_KEY, else the key file; None when neither exists."""
    if env.get(KEY_ENV):
        return env[KEY_ENV].encode()
    return _read_key(key_path(env))


def signing_key(env=os.environ) -> bytes:
    """The key to seal with: the existing one, else a key file made now."""
    return existing_key(env) or _create_key(key_path(env))


def _tag(key: bytes, digest: bytes) -> bytes:
    return hmac.new(key, MAGIC + struct.pack(">H", VERSION) + digest, hashlib.sha256).digest()


def seal(metadata: dict, executable: bytes, env=os.environ) -> bytes:
    """The file's bytes: header, JSON metadata, jax's executable bytes."""
    meta = json.dumps(metadata, sort_keys=True).encode()
    body = meta + executable
    digest = hashlib.sha256(body).digest()
    return HEADER.pack(MAGIC, VERSION, digest, _tag(signing_key(env), digest), len(meta)) + body


def _refuse(path: str, why: str, fix: str = RECOMPILE) -> CompiledFileRefused:
    return CompiledFileRefused(f"--compiled {path!r} {why}; it was not loaded (a serialized executable runs code "
                               f"as you): {fix}.")


def unseal(path: str, data: bytes, env=os.environ) -> tuple[dict, bytes]:
    """(metadata, executable bytes) of a file this key sealed; CompiledFileRefused otherwise.
    Nothing is unpickled here: the checks read bytes, and the metadata is JSON."""
    if len(data) < HEADER.size or not data.startswith(MAGIC):
        raise _refuse(path, "is not a file `magic compile --serialize` wrote (no matrixmagic header; one written "
                            "before format 2 is a bare pickle, which is not opened)")
    _, version, digest, tag, meta_len = HEADER.unpack_from(data)
    if version != VERSION:
        raise _refuse(path, f"has format {version}, and this version reads format {VERSION}")
    body = data[HEADER.size:]
    if not hmac.compare_digest(hashlib.sha256(body).digest(), digest) or meta_len > len(body):
        raise _refuse(path, "is damaged or was altered (its SHA-256 does not match its header)")
    key = existing_key(env)
    if key is None or not hmac.compare_digest(_tag(key, digest), tag):
        raise _refuse(path, f"was not signed with this machine's key ({KEY_ENV}, else {key_path(env)}), so it "
                            f"was written elsewhere or by someone else",
                      f"{RECOMPILE}, or give this machine the compiling machine's key (the same {KEY_ENV} on both)")
    try:
        metadata = json.loads(body[:meta_len])
    except ValueError:
        raise _refuse(path, "has a header but unreadable metadata") from None
    return metadata, body[meta_len:]
