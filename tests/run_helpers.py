"""What the resume tests read back from a finished run directory (the saved state's
fingerprint and the final params, so bit-exact comparisons are written once), and how the
run-safety tests launch `magic` on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np


def saved_fingerprint(workdir, step: int) -> dict:
    """The whole state's per-array fingerprint (params, optimizer, step, key) saved at `step`."""
    with open(os.path.join(workdir, "checkpoints", str(step), "integrity", "metadata")) as f:
        return json.load(f)["fingerprint"]


def final_params(workdir) -> dict:
    """The newest checkpoint's params as {name: numpy array}."""
    import jax

    from matrixmagic.train.checkpoint import load_params
    from matrixmagic.train.integrity import flat_by_name

    params, _ = load_params(str(workdir))
    return {k: np.asarray(v) for k, v in flat_by_name(jax.device_get(params)).items()}


# ----------------------------------------------------------------------------- launching `magic` in a subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 1-layer, d_model 32 GPT on 4 x 32 tokens: each subprocess is mostly jax start-up and one compile.
# The one tiny model every run test trains; TINY adds quiet logging (later assignments win).
TINY_MODEL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "data.seq_len=32",
              "batch_size=4"]
TINY = [*TINY_MODEL, "eval_every=1000", "sample_tokens=0", "log_every=1"]


def write_corpus(directory, n: int = 30, seed: int = 0) -> str:
    """n random text files of 50-400 characters: a corpus that builds in a second."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for i in range(n):
        with open(os.path.join(directory, f"doc{i:02d}.txt"), "w") as f:
            f.write("".join(rng.choice(list("abcdefgh ij\n"), int(rng.integers(50, 400)))))
    return str(directory)


def write_code_corpus(directory, n: int = 16):
    """n one-function Python files of growing length: a corpus whose documents differ in size."""
    os.makedirs(directory, exist_ok=True)
    for i in range(n):
        with open(os.path.join(directory, f"doc{i:02d}.py"), "w") as f:
            f.write(f"def f{i}(x):\n    return x * {i}  # " + "abc " * (10 + i) + "\n")
    return directory


# Storage variables an in-process gs:// test may have left in os.environ (train/storage.py
# `use_emulator` writes them): a subprocess gets only the emulator its test names in `extra`.
STORAGE_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT",
                "GOOGLE_AUTH_TOKEN_FOR_TESTING")


def magic_env(**extra) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in STORAGE_VARS}
    return {**base, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def train_command(workdir, source, data_dir, *sets: str, flags=()) -> list:
    """`magic train` of the TINY model on `source`; later --set assignments win."""
    assignments = [*TINY, f"data.source={source}", f"data.data_dir={data_dir}", *sets]
    return [sys.executable, "-m", "matrixmagic.train.cli", "train", "--workdir", str(workdir),
            *[a for s in assignments for a in ("--set", s)], *flags]


def magic(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """Any `magic` subcommand in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", *map(str, args)], env=magic_env(),
                          capture_output=True, text=True, check=False, timeout=timeout, cwd=REPO)


def train_rows(workdir) -> list[dict]:
    """The train rows of metrics.jsonl, skipping a last line cut by a kill."""
    rows = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by the kill
                continue
            if row["split"] == "train":
                rows.append(row)
    return rows


def metrics_rows(workdir) -> list:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def tree_snapshot(directory) -> dict:
    """{relative path: (size, mtime_ns)} of every file below `directory`: equal snapshots mean
    nothing was written, created or removed."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
    return out


def wait_for(predicate, proc, timeout=240.0, poll=0.02) -> bool:
    """True once predicate() holds while proc still runs; False if proc ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if predicate():
            return True
        time.sleep(poll)
    raise TimeoutError("the run made no progress")


def assert_same_log(rows, reference, steps: int,
                    keys=("loss", "accuracy", "grad_norm", "param_norm", "learning_rate")) -> None:
    """Every step 1..steps logged exactly once, each value bit-identical (json keeps float64 repr)."""
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "every step logged exactly once"
    for got, want in zip(rows, reference):
        for key in keys:
            assert got[key] == want[key], (got["step"], key, got[key], want[key])
