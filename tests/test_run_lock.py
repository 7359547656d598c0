"""One writer per run directory (train/runlock.py): the lock itself in-process and with a
holder killed by SIGKILL, then two `magic train` on one workdir end to end."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from run_helpers import REPO, magic_env, metrics_rows, train_command, tree_snapshot, write_corpus

from matrixmagic.configs import ConfigError
from matrixmagic.train.runlock import LOCK_FILE, RunInUseError, RunLock

HOLDER = """
import sys, time
from matrixmagic.train.runlock import RunLock
lock = RunLock(sys.argv[1], command="test holder").acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_lock_is_refused_naming_the_holder_then_free_after_release(tmp_path):
    first = RunLock(str(tmp_path / "run"), command="magic train --workdir run").acquire()
    with pytest.raises(RunInUseError) as refused:
        RunLock(str(tmp_path / "run")).acquire()  # another open file description: flock refuses it
    message = str(refused.value)
    assert f"pid {os.getpid()} on host " in message and "(magic train --workdir run)" in message
    assert "started 20" in message and "another --workdir" in message
    assert isinstance(refused.value, ConfigError), "the CLI prints it cleanly and exits 2"
    first.release()
    with RunLock(str(tmp_path / "run")):
        pass
    assert os.path.exists(tmp_path / "run" / LOCK_FILE), "a release keeps the lock file (only discard deletes it: see runlock.py)"


def test_a_holder_killed_with_sigkill_leaves_no_stale_lock(tmp_path):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, workdir], stdout=subprocess.PIPE, text=True,
                              env=magic_env(), cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=f"pid {holder.pid} on host .*test holder"):
            RunLock(workdir).acquire()
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(30) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)
    with RunLock(workdir):  # nothing to clean up by hand: the kernel dropped the lock with the process
        pass


def test_misspelt_allow_change_fails_before_anything(tmp_path):
    from matrixmagic.configs.train_config import apply_overrides, train_config_for
    from matrixmagic.train.loop import train

    config = apply_overrides(train_config_for("gpt-tiny"), [f"workdir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="--allow-change 'stepz': there is no config field 'stepz'. Did you mean "
                                          "'steps'"):
        train(config, allow_change=["optimizer.learning_rate,stepz"])
    assert not os.path.exists(tmp_path / "run" / LOCK_FILE), "refused before the lock was taken"


def test_a_config_error_found_under_the_lock_leaves_no_run_directory(tmp_path):
    """Issue 29: the table is sized for the tokenizer after the lock is taken; refusing a
    model.vocab_size too small for it must not leave a new folder holding run.lock."""
    from matrixmagic.configs.train_config import apply_overrides, train_config_for
    from matrixmagic.train.loop import train

    config = apply_overrides(train_config_for("gpt-tiny"), [f"workdir={tmp_path / 'new' / 'run'}",
                                                            "model.vocab_size=10"])
    with pytest.raises(ConfigError, match="model.vocab_size=10 is too small for the tokenizer's 260 ids"):
        train(config)
    assert os.listdir(tmp_path / "new") == [], "the run directory this start made is gone, lock file and all"
    (tmp_path / "kept").mkdir()  # a folder that was there before is left, lock file included
    with pytest.raises(ConfigError, match="is too small"):
        train(dataclasses.replace(config, workdir=str(tmp_path / "kept")))
    assert os.listdir(tmp_path / "kept") == [LOCK_FILE]


def test_a_lock_file_discarded_while_another_opened_it_is_not_a_second_lock(tmp_path, monkeypatch):
    """`discard` unlinks the file: a process that opened it before and locks it after must notice
    and lock the file now at the path, or two runs would each hold a lock on a different file."""
    workdir = str(tmp_path / "run")
    first = RunLock(workdir).acquire()
    lock_path = tmp_path / "run" / LOCK_FILE
    opened = []
    original = RunLock._lock

    def racing(self):
        if opened:
            return original(self)
        fd = os.open(lock_path, os.O_RDWR)  # the second opens the file...
        first.discard()  # ...its holder deletes it and lets go...
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ...and the second locks the deleted file
        opened.append(fd)
        return fd

    monkeypatch.setattr(RunLock, "_lock", racing)
    second = RunLock(workdir).acquire()
    monkeypatch.setattr(RunLock, "_lock", original)
    assert os.fstat(second._fd).st_ino == os.stat(lock_path).st_ino, "it holds the file at the path"
    with pytest.raises(RunInUseError):
        RunLock(workdir).acquire()
    second.release()


@pytest.mark.slow
def test_two_trains_on_one_workdir_the_second_exits_2_touching_nothing(tmp_path):
    """The first run is frozen (SIGSTOP) while it holds the lock, so the second cannot be
    waiting for it to finish, and the run directory cannot change under the comparison."""
    source, data = write_corpus(tmp_path / "src"), str(tmp_path / "data")
    workdir = tmp_path / "run"
    steps = 30
    cmd = train_command(workdir, source, data, f"steps={steps}", "checkpoint_every=10")
    first = subprocess.Popen(cmd, env=magic_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 240
        while not (os.path.exists(workdir / "metrics.jsonl") and metrics_rows(workdir)):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never logged a step"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        before = tree_snapshot(workdir)
        second = subprocess.run(cmd, env=magic_env(), capture_output=True, text=True, check=False, timeout=300,
                                cwd=REPO)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by pid {first.pid} on host" in second.stderr and "started " in second.stderr
        assert "Traceback" not in second.stderr and "params," not in second.stdout, "refused before any work"
        assert tree_snapshot(workdir) == before, "the refused run wrote, created or removed nothing"
        first.send_signal(signal.SIGCONT)
        assert first.wait(300) == 0
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait(30)
    counts = Counter((r["step"], r["split"]) for r in metrics_rows(workdir))
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    assert sorted(s for s, split in counts if split == "train") == list(range(1, steps + 1))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20", "30"]
