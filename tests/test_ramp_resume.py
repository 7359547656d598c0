"""The batch ramp end to end: `magic train` on a tiny GPT whose batch grows 2 -> 4 -> 6 -> 8
rows over its first 15 steps (two microbatches of 4, so the first level skips one).

The run must train on the ramp's batch at every step (the step's own metric, the tokens it
weighted, and the pipeline agree with the ramp's definition), count tokens exactly, compile
its step once, and end bit-identical when killed mid-ramp and resumed (as tests/test_resume.py
checks for a plain run). CPU, fp32; each subprocess pays ~10-20 s of start-up and compile.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from run_helpers import REPO, TINY, final_params, saved_fingerprint, train_rows

pytestmark = pytest.mark.slow

STEPS, SEQ, BATCH, START_ROWS, RAMP_TOKENS = 30, 32, 8, 2, 1536
RAMP = [f"ramp.start_tokens={START_ROWS * SEQ}", f"ramp.tokens={RAMP_TOKENS}"]
RUN = [*TINY, f"data.seq_len={SEQ}", f"batch_size={BATCH}", "microbatches=2", f"steps={STEPS}",
       "checkpoint_every=5", *RAMP]
COMPARED = ("loss", "accuracy", "grad_norm", "param_norm", "learning_rate", "batch_rows", "tokens", "tokens_seen")


def expected_rows(steps: int) -> list[int]:
    """The ramp's definition, stepped by hand: level min(n, 1 + floor(seen * (n - 1) / ramp tokens))."""
    n, seen, out = BATCH // START_ROWS, 0, []
    for _ in range(steps):
        out.append(min(n, 1 + seen * (n - 1) // RAMP_TOKENS) * START_ROWS)
        seen += out[-1] * SEQ
    return out


def assignments(corpus, *extra) -> list[str]:
    return RUN + [f"data.source={corpus['src']}", f"data.data_dir={corpus['data']}", *extra]


def command(workdir, corpus, *extra: str) -> list[str]:
    return [sys.executable, "-m", "matrixmagic.train.cli", "train", "--workdir", str(workdir),
            *[a for s in assignments(corpus, *extra) for a in ("--set", s)]]


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}


def run(workdir, corpus, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir, corpus, *extra), env=ENV, capture_output=True, text=True, timeout=300,
                          check=False, cwd=REPO)


@pytest.fixture(scope="module")
def clean(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clean") / "run"
    done = run(workdir, corpus)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch ramp 2 -> 8 rows in 4 levels" in done.stdout
    return workdir


def test_each_step_trains_on_the_ramps_batch_and_tokens_add_up(clean, corpus):
    from matrixmagic.configs.train_config import apply_overrides, train_config_for
    from matrixmagic.train.loop import open_data
    from matrixmagic.train.run import run_tokenizer

    rows = train_rows(clean)
    want = expected_rows(STEPS)
    assert want[:16] == [2] * 8 + [4] * 4 + [6] * 3 + [8], "the ramp this test means to run"
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [int(r["batch_rows"]) for r in rows] == want, "the step's own count of active rows"
    assert [int(r["tokens_seen"]) for r in rows] == list(np.cumsum(want) * SEQ), "tokens seen, exactly"
    config = apply_overrides(train_config_for("gpt-tiny"), assignments(corpus))
    pipe, _ = open_data(config, run_tokenizer(config))
    for step, row in enumerate(rows):
        batch = pipe.batch(step)
        live = batch["loss_mask"].any(axis=1) | (batch["inputs"] != pipe.tokenizer.pad_id).any(axis=1)
        assert live.sum() == want[step], step  # the pipeline filled exactly the ramp's rows
        assert row["tokens"] == batch["loss_mask"].sum(), step  # and the step weighted exactly their tokens


def test_killed_mid_ramp_and_resumed_is_bit_identical(clean, corpus, tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(command(workdir, corpus), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=REPO)
    try:
        deadline = time.monotonic() + 240
        saved = workdir / "checkpoints" / "5"
        while proc.poll() is None and time.monotonic() < deadline:
            if saved.is_dir() and os.path.exists(workdir / "metrics.jsonl") and len(train_rows(workdir)) >= 8:
                break  # the checkpoint of step 5 is committed; the run is in the ramp's first or second level
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the kill"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = len(train_rows(workdir))
    assert killed_at < 15, f"killed at step {killed_at}, after the ramp: the test wants it mid-ramp"
    done = run(workdir, corpus)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting from checkpoint step" in done.stdout

    got, want = train_rows(workdir), train_rows(clean)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        for key in COMPARED:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert saved_fingerprint(workdir, STEPS) == saved_fingerprint(clean, STEPS)
    mine, theirs = final_params(workdir), final_params(clean)
    assert mine.keys() == theirs.keys()
    assert all(mine[k].tobytes() == theirs[k].tobytes() for k in theirs)


def test_resuming_under_another_ramp_is_refused_naming_the_field(clean, corpus, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(clean, workdir)
    done = run(workdir, corpus, "ramp.tokens=3072", f"steps={STEPS + 5}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "ramp.tokens: 1536 -> 3072" in done.stderr and f"steps: {STEPS} -> {STEPS + 5}" in done.stderr
    assert "--allow-change ramp.tokens,steps" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_whole_ramp_compiles_one_train_step(corpus, tmp_path, monkeypatch):
    """In process: the jitted train step holds one compiled program after running through every
    level (2, 4, 6 and 8 active rows): the batch's shape never changes."""
    from matrixmagic.configs.train_config import apply_overrides, train_config_for
    from matrixmagic.train import loop

    steps = []
    real_train_run = loop.train_run

    def spy(config, devices=None):
        tx, sharded = real_train_run(config, devices)
        steps.append(sharded.train_step)
        return tx, sharded

    monkeypatch.setattr(loop, "train_run", spy)
    config = apply_overrides(train_config_for("gpt-tiny"), assignments(
        corpus, f"workdir={tmp_path / 'run'}", "steps=20", "checkpoint_every=1000", "eval_batches=0"))
    assert config.batch_ramp.ramp_steps < 20
    loop.train(config, quiet=True)
    assert len(steps) == 1 and steps[0]._cache_size() == 1
