"""Signals and failures outside the train loop end in one line and leave nothing behind (issue 29).

Ctrl-C (SIGINT) -> exit 130, SIGTERM -> exit 75 (as the train loop's), each one line without a
traceback (train/interrupts.py); `hf import`/`hf export` remove their `*.importing-<pid>` /
`*.exporting-<pid>` sibling on the way out, and a rerun removes one a killed run of this host left
(train/hf/staging.py). A save that fills the disk removing its partial step: tests/test_resume_checks.py.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from hf_helpers import FIXTURES
from run_helpers import magic_env

from matrixmagic.train.hf.staging import clear_stale_siblings

GPT2 = os.path.join(FIXTURES, "gpt2")


def launch(*argv, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "matrixmagic.train.cli", *argv], cwd=cwd,
                            env=magic_env(MAGIC_DEBUG=""), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def launch_listening(*argv, cwd) -> subprocess.Popen:
    """`launch`, returning once the command catches Ctrl-C itself (main() has installed its
    handler). Before that, in the first ~0.1 s while Python loads the command, a Ctrl-C is
    Python's own; the child is started with SIGINT ignored so that window is visible in
    /proc/PID/status (SigCgt gains SIGINT's bit when our handler replaces the ignore), not a
    race against a loaded machine: a fixed sleep from the start was lost there (exit 0)."""
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited through exec
    try:
        proc = launch(*argv, cwd=cwd)
    finally:
        signal.signal(signal.SIGINT, ignored)
    bit = 1 << (signal.SIGINT - 1)
    deadline = time.monotonic() + 120
    while True:
        with open(f"/proc/{proc.pid}/status") as status:
            caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
        if caught & bit:
            return proc
        assert proc.poll() is None and time.monotonic() < deadline, "the command never caught SIGINT"
        time.sleep(0.005)


def signal_when(proc: subprocess.Popen, pattern: str, signum: int) -> tuple[int, str]:
    """Send `signum` once `pattern` exists (the command is mid-write); (exit code, stderr)."""
    deadline = time.monotonic() + 240
    while not glob.glob(pattern):
        assert proc.poll() is None, f"ended before writing {pattern}: {proc.communicate()}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


def assert_one_line(err: str, words: str) -> None:
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0], err[-3000:]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> str:
    run = str(tmp_path_factory.mktemp("imported") / "run")
    done = subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", "hf", "import", GPT2, "--workdir", run],
                          env=magic_env(), capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.mark.parametrize("signum, code, words", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                                 (signal.SIGTERM, 75, "stopped by SIGTERM")])
def test_a_signal_during_hf_import_is_one_line_and_leaves_nothing(signum, code, words, tmp_path):
    proc = launch("hf", "import", GPT2, "--workdir", "run", cwd=tmp_path)
    returncode, err = signal_when(proc, str(tmp_path / "run.importing-*"), signum)
    assert returncode == code, err[-3000:]
    assert_one_line(err, f"magic hf: {words}")
    assert os.listdir(tmp_path) == []  # neither the run nor its temporary sibling


def test_sigterm_during_hf_export_is_one_line_and_leaves_nothing(imported, tmp_path):
    proc = launch("hf", "export", "--workdir", imported, "--out", "out", cwd=tmp_path)
    returncode, err = signal_when(proc, str(tmp_path / "out.exporting-*"), signal.SIGTERM)
    assert returncode == 75, err[-3000:]
    assert_one_line(err, "magic hf: stopped by SIGTERM")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 2.5, 4.0])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(delay, tmp_path):
    """Ctrl-C while `magic train` imports jax (0.3 s after it listens), builds the dataset or compiles
    its first step (2.5 and 4 s; the loop starts after ~10 s here): 130 and the one line, whichever
    phase it hits.
    Before: about 1 in 3 gave a traceback, and one 3-6 s in crashed after the line (SIGSEGV, 139)
    while XLA was compiling: the process now leaves without finalizing (interrupts.leave)."""
    proc = launch_listening("train", "--workdir", "run", "--set", "steps=1", cwd=tmp_path)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    said = "\n".join(line for line in err.splitlines() if not line.startswith("warning: "))  # e.g. the corpus's
    assert_one_line(said, "magic train: interrupted (Ctrl-C)")


@pytest.mark.slow
def test_a_second_ctrl_c_in_training_is_one_line_and_exit_130(tmp_path):
    """The first Ctrl-C asks the loop to stop after saving; a second one leaves at once: 130 and
    the one line (beside the progress bar and warnings), no traceback (not 75: the first one's
    stop takes longer than the 0.1 s to the next)."""
    proc = launch("train", "--workdir", "run", "--set", "steps=100000", "--set", "log_every=1", cwd=tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and '"step"' in metrics.read_text()):  # the loop has run a step
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no step"
        time.sleep(0.1)
    # Again every 0.1 s until it ends: two sent while a step runs in XLA reach Python as one (its
    # pending-signal flag), so the second is whichever comes after the first was handled.
    while proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    lines = [ln for ln in err.replace("\r", "\n").splitlines()
             if ln.strip() and not ln.startswith("warning: ") and "it/s" not in ln and "s/it" not in ln and "%|" not in ln]
    assert_one_line("\n".join(lines), "magic train: interrupted (Ctrl-C)")


def test_a_ctrl_c_a_library_wrapped_in_its_own_error_is_still_one_line(monkeypatch, capsys):
    """A library that catches the KeyboardInterrupt and raises its own error from it: the one line
    and 130, not an internal error's traceback."""
    from matrixmagic.train.interrupts import signal_in_chain

    cli = importlib.import_module("matrixmagic.train.cli.main")  # the module (the package exports its main())

    def wrapped(_args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise RuntimeError("a library's own error") from err

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), wrapped))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert cli.main(["params", "gpt-tiny"]) == 130
        # a stopped command ignores further signals until it exits
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == "magic params: interrupted (Ctrl-C): rerun the same command to " \
        "finish (nothing half-written is used)."
    assert signal_in_chain(ValueError()) is None


def _with_func(parser, func):
    """`parser` whose `params` subcommand runs `func`."""
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    sub.choices["params"].set_defaults(func=func)
    return parser


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def sibling(parent, name: str, verb: str, host: str, pid: int) -> str:
    path = os.path.join(parent, f"{name}.{verb}-{pid}")
    os.makedirs(os.path.join(path, "checkpoints"))
    with open(os.path.join(path, f".{verb}"), "w") as f:
        json.dump({"host": host, "pid": pid, "started": "then"}, f)
    return path


def test_only_our_own_dead_siblings_are_removed(tmp_path):
    """A killed run's sibling (this host, its pid gone) goes; a live process's, another host's, or
    one without our marker stays: nothing anyone may still be writing is deleted."""
    here, target = socket.gethostname(), str(tmp_path / "run")
    dead = sibling(tmp_path, "run", "importing", here, dead_pid())
    alive = sibling(tmp_path, "run", "importing", here, os.getpid())
    elsewhere = sibling(tmp_path, "run", "importing", "another-host", dead_pid())
    unmarked = str(tmp_path / f"run.importing-{dead_pid()}")
    os.makedirs(unmarked)
    other_target = sibling(tmp_path, "run2", "importing", here, dead_pid())
    assert clear_stale_siblings(target, "importing") == [dead]
    assert all(os.path.isdir(p) for p in (alive, elsewhere, unmarked, other_target))


def test_a_rerun_removes_what_a_killed_import_left(tmp_path):
    left = sibling(tmp_path, "run", "importing", socket.gethostname(), dead_pid())  # as kill -9 leaves it
    done = subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", "hf", "import", GPT2, "--workdir", "run"],
                          cwd=tmp_path, env=magic_env(), capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not os.path.exists(left)
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert ".importing" not in os.listdir(tmp_path / "run")  # the marker does not outlive the write
