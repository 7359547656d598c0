"""`magic train --compiled FILE` loads only a file this user's key sealed (train/sealed.py): a
foreign, tampered or old-format file is refused before anything in it is unpickled (issue 29).

Each hostile file carries a pickle whose __reduce__ creates a marker file when unpickled: the
marker's absence is the proof that nothing was unpickled."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
from run_helpers import magic_env

from matrixmagic.train import sealed


class Touch:
    """Unpickling this creates `path`: what a crafted file could do with any command."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def env(tmp_path):
    """This machine's key lives under the test's own config folder."""
    return {"XDG_CONFIG_HOME": str(tmp_path / "config")}


def hostile(tmp_path) -> tuple[bytes, str]:
    marker = str(tmp_path / "UNPICKLED")
    return pickle.dumps(Touch(marker)), marker


def train_compiled(tmp_path, path: str, env: dict) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "matrixmagic.train.cli", "train", "--workdir", str(tmp_path / "run"),
            "--set", "steps=1", "--compiled", path]
    return subprocess.run(argv, env=magic_env(**env), cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          check=False)


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def test_a_sealed_file_round_trips_and_its_key_is_private(env):
    data = sealed.seal({"jax": "x"}, b"executable bytes", env)
    assert sealed.unseal("step.bin", data, env) == ({"jax": "x"}, b"executable bytes")
    assert os.stat(sealed.key_path(env)).st_mode & 0o077 == 0  # readable by this user only


def files(tmp_path, env) -> dict[str, bytes]:
    """Hostile files, each with the marker pickle in it."""
    payload, _ = hostile(tmp_path)
    good = sealed.seal({"jax": "x"}, payload, env)
    other_key = sealed.seal({"jax": "x"}, payload, {"XDG_CONFIG_HOME": str(tmp_path / "elsewhere")})
    return {"plain pickle (the old format)": payload,
            "payload byte flipped": flip(good, len(good) - len(payload) - 3),  # in the metadata: the pickle stays whole
            "executable byte flipped": flip(good, len(good) - 2),
            "signed with another key": other_key,
            "hash rewritten to match the altered body": _rehash(flip(good, len(good) - len(payload) - 3))}


def _rehash(data: bytes) -> bytes:
    """What an attacker who knows the format does: a correct SHA-256 for the altered body (no key)."""
    import hashlib

    body = data[sealed.HEADER.size:]
    head = sealed.HEADER.unpack_from(data)
    return sealed.HEADER.pack(head[0], head[1], hashlib.sha256(body).digest(), head[3], head[4]) + body


@pytest.mark.parametrize("kind", ["plain pickle (the old format)", "payload byte flipped", "executable byte flipped",
                                  "signed with another key", "hash rewritten to match the altered body"])
def test_a_hostile_file_is_refused_unread(kind, tmp_path, env):
    data = files(tmp_path, env)[kind]
    with pytest.raises(sealed.CompiledFileRefused, match=r"--compiled .*not loaded.*magic compile .*--serialize"):
        sealed.unseal("step.bin", data, env)
    assert not os.path.exists(tmp_path / "UNPICKLED")


@pytest.mark.parametrize("kind", ["plain pickle (the old format)", "payload byte flipped"])
def test_magic_train_refuses_it_in_one_line_before_any_work(kind, tmp_path, env):
    path = tmp_path / "step.bin"
    path.write_bytes(files(tmp_path, env)[kind])
    done = train_compiled(tmp_path, str(path), env)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = [line for line in done.stderr.splitlines() if line.startswith("magic ")]
    assert len(errors) == 1 and "--compiled" in errors[0] and "magic compile" in errors[0], done.stderr
    assert not os.path.exists(tmp_path / "UNPICKLED")  # nothing was unpickled
    assert not os.path.exists(tmp_path / "run")  # nothing was written
