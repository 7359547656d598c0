"""Exact resume and fault tolerance, end to end: `magic train` in subprocesses.

A tiny GPT trains on a tiny corpus (CPU, fp32). A clean 40-step run is the reference; the
other runs are killed (SIGKILL at random moments, one inside an async save), stopped
(SIGTERM), broken (lr 1e30) or misconfigured, and must end bit-identical to it or fail
clearly. Each subprocess pays ~10-20 s of start-up and compile on the 2-core dev box.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from run_helpers import (
    REPO,
    TINY,
    assert_same_log,
    final_params,
    magic_env,
    saved_fingerprint,
    train_rows,
    wait_for,
)

pytestmark = pytest.mark.slow

STEPS = 40
RUN = [*TINY, f"steps={STEPS}", "checkpoint_every=5"]


def command(workdir, corpus, *extra: str) -> list[str]:
    sets = RUN + [f"data.source={corpus['src']}", f"data.data_dir={corpus['data']}", *extra]
    return [sys.executable, "-m", "matrixmagic.train.cli", "train", "--workdir", str(workdir),
            *[a for s in sets for a in ("--set", s)]]


def run(workdir, corpus, *extra: str, timeout=300, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir, corpus, *extra), env=magic_env(**env_extra), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


_STARTED: list[subprocess.Popen] = []


def start(workdir, corpus, *extra: str, **env_extra) -> subprocess.Popen:
    proc = subprocess.Popen(command(workdir, corpus, *extra), env=magic_env(**env_extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    _STARTED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_leftover_runs():
    """A failed assertion must not leave a training process behind (killed by its pid)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def logged_step(workdir) -> int:
    """The highest step in metrics.jsonl now (0 before any row)."""
    try:
        return max((r["step"] for r in train_rows(workdir)), default=0)
    except FileNotFoundError:
        return 0


def steps_on_disk(workdir) -> list[str]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []




@pytest.fixture(scope="module")
def clean(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clean") / "run"
    done = run(workdir, corpus)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_kill9_at_random_moments_then_resume_is_bit_identical(clean, corpus, tmp_path):
    """SIGKILL after a random step, inside an async save (that attempt's saves are held open
    1 s by the test hook MATRIXMAGIC_TEST_SAVE_DELAY, so one is reliably in flight) and after
    another random step; rerunning the same command each time must end exactly where the
    clean run ended."""
    rng = np.random.default_rng(1234)
    workdir = tmp_path / "run"
    delay = {"MATRIXMAGIC_TEST_SAVE_DELAY": "1.0"}
    saving = lambda: any(".orbax-checkpoint-tmp" in n for n in steps_on_disk(workdir))
    moments = [("after step", int(rng.integers(6, 14))), ("during save", None),
               ("after step", int(rng.integers(24, 34)))]
    kills = []
    for kind, target in moments:
        proc = start(workdir, corpus, **(delay if kind == "during save" else {}))
        floor = logged_step(workdir)
        if kind == "during save":  # a save of a step beyond what was already on disk
            hit = wait_for(lambda floor=floor: logged_step(workdir) > floor and saving(), proc)
            time.sleep(float(rng.uniform(0.0, 0.5)))  # well inside the 1 s the save is held open
        else:
            hit = wait_for(lambda target=target: logged_step(workdir) >= target, proc)
            time.sleep(float(rng.uniform(0.0, 0.3)))
        assert hit and proc.poll() is None, f"the run ended before the kill {kind} {target}"
        in_flight = saving()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
        kills.append((kind, logged_step(workdir), in_flight, steps_on_disk(workdir)))
    print("kills (kind, last logged step, save in flight, checkpoint dir):", kills)
    assert kills[1][2], f"the second kill was not during a save: {kills}"
    done = run(workdir, corpus)
    assert done.returncode == 0, done.stderr[-3000:]

    assert saved_fingerprint(workdir, STEPS) == saved_fingerprint(clean, STEPS), kills
    got, want = final_params(workdir), final_params(clean)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name
    assert_same_log(train_rows(workdir), train_rows(clean), STEPS)
    assert not any("tmp" in n for n in steps_on_disk(workdir)), "partial saves are cleaned up"


def test_sigterm_saves_that_step_exits_75_and_resumes(clean, corpus, tmp_path):
    workdir = tmp_path / "run"
    proc = start(workdir, corpus, "checkpoint_every=1000")  # no periodic save: only SIGTERM's
    assert wait_for(lambda: logged_step(workdir) >= 8, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 75
    stopped = logged_step(workdir)
    assert 8 <= stopped < STEPS
    assert steps_on_disk(workdir) == [str(stopped)], "the checkpoint is of the step the run stopped at"
    with open(os.path.join(workdir, "checkpoints", str(stopped), "data", "metadata")) as f:
        assert json.load(f)["iterator"]["step"] == stopped

    done = run(workdir, corpus, "checkpoint_every=1000")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"starting from checkpoint step {stopped}" in done.stdout
    assert_same_log(train_rows(workdir), train_rows(clean), STEPS)
    assert saved_fingerprint(workdir, STEPS) == saved_fingerprint(clean, STEPS)


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(corpus, tmp_path):
    workdir = tmp_path / "run"
    done = run(workdir, corpus, "optimizer.learning_rate=1e30", "checkpoint_every=1", "log_every=5", "steps=10")
    assert done.returncode == 3, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert "non-finite training at step" in message and "optimizer.learning_rate" in message
    bad = int(message.split("at step ")[1].split(":")[0])
    saved = [int(s) for s in steps_on_disk(workdir)]
    assert saved and max(saved) == bad - 1, (saved, message)
    assert f"last good checkpoint is step {bad - 1}" in message
    params = final_params(workdir)  # the kept checkpoint restores (and verifies) and is finite
    assert all(np.isfinite(p).all() for p in params.values())


def test_incompatible_checkpoint_names_the_params_and_field(clean, corpus, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(clean, workdir)
    done = run(workdir, corpus, "model.d_model=64", "steps=45")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "model.d_model: checkpoint 32, this run 64" in done.stderr
    assert "params/decoder/layers/feed_forward/hidden/kernel: checkpoint (1, 32, 64) float32, this run (1, 64, 64)" \
        in done.stderr
    assert steps_on_disk(workdir) == steps_on_disk(clean), "nothing was moved or overwritten"


def test_init_from_starts_fresh_from_params_and_checks_shapes(clean, corpus, tmp_path):
    workdir = tmp_path / "run"
    cmd = command(workdir, corpus, "steps=3", "checkpoint_every=1000") + ["--init-from", str(clean)]
    done = subprocess.run(cmd, env=magic_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = train_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3], "a new run: step 0, not the source's 40"
    assert rows[0]["loss"] < train_rows(clean)[0]["loss"] - 1.0, "trained params, not a fresh init"
    assert steps_on_disk(workdir) == ["3"]

    bad = command(tmp_path / "other", corpus, "model.d_ff=128") + ["--init-from", str(clean)]
    done = subprocess.run(bad, env=magic_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2
    assert "params/decoder/layers/feed_forward/hidden/kernel: checkpoint (1, 32, 64)" in done.stderr
    assert "--init-from" in done.stderr


def test_unwritable_workdir_fails_before_training(corpus, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    started = time.monotonic()
    done = run(blocker / "run", corpus)
    assert done.returncode == 2
    assert "is not writable" in done.stderr and "--set workdir=PATH" in done.stderr
    assert "params," not in done.stdout, "it stopped before building the model"
    assert time.monotonic() - started < 120
