"""Every user error is one clear message and exit 2, with no traceback (issue 16): each case in
tests/user_error_cases.py runs through the real CLI, `python -m matrixmagic.train.cli`. A new
case is one line there; docs/bad-input.md shows what each prints (docs/bad_input_table.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from user_error_cases import CASES, command, make_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("bad-input"))


def run_cli(argv: list[str], cwd: str, env: tuple[tuple[str, str], ...] = ()) -> subprocess.CompletedProcess:
    """The command as a user runs it; in an empty folder, so a case that wrongly starts a run writes
    nowhere that matters, and with a timeout that such a run would hit. `env`: the case's variables."""
    env = {**os.environ, "MAGIC_DEBUG": "", **dict(env)}
    return subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240, check=False)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_user_error_is_one_message_and_exit_2(case, inputs):
    done = run_cli(command(case, inputs), inputs["tmp"], case.env)
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output[-3000:]
    assert done.returncode == 2, output[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("magic ")]
    assert len(errors) == 1, done.stderr  # one message, on stderr, saying which command
    assert re.search(case.expect, errors[0]), errors[0]


def test_the_memory_check_can_be_skipped(inputs):
    """--no-memory-check, the override the message names, skips the check and only it: the run goes
    on to its next check, the corpus (too small here), so nothing is compiled or allocated."""
    argv = ["train", "--set", "batch_size=262144", "--set", f"data.source={inputs['tiny']}",
            "--set", f"data.data_dir={inputs['data']}"]
    checked = run_cli(argv, inputs["tmp"])
    assert checked.returncode == 2 and "does not fit in memory" in checked.stderr
    skipped = run_cli([*argv, "--no-memory-check"], inputs["tmp"])
    assert skipped.returncode == 2 and "does not fit" not in skipped.stderr
    assert "data.source is too small" in skipped.stderr


@pytest.mark.parametrize("error", [ValueError("operands could not be broadcast together"), TypeError("bad operand")])
def test_an_error_that_is_not_ours_is_a_bug_with_its_traceback(error, monkeypatch, capsys):
    """Only ConfigError (and its subclasses) is a user's mistake; a ValueError or TypeError from deeper
    down (a jax shape error) is a bug: its traceback, one line asking for a report, exit 1."""
    from matrixmagic.model import accounting
    from matrixmagic.train.cli import main

    def broken(preset):
        raise error

    monkeypatch.delenv("MAGIC_DEBUG", raising=False)
    monkeypatch.setattr(accounting, "report", broken)
    assert main(["params", "gpt-tiny"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f"{type(error).__name__}: {error}" in err
    assert err.splitlines()[-1] == "magic params: internal error, please report it with the traceback above"
    assert "magic params: error:" not in err


def test_our_error_from_the_same_place_is_one_line_and_exit_2(monkeypatch, capsys):
    from matrixmagic.configs import ConfigError
    from matrixmagic.model import accounting
    from matrixmagic.train.cli import main

    def refused(preset):
        raise ConfigError("model.d_model=30 is not a multiple of model.num_heads=4: pick a multiple")

    monkeypatch.delenv("MAGIC_DEBUG", raising=False)
    monkeypatch.setattr(accounting, "report", refused)
    assert main(["params", "gpt-tiny"]) == 2
    assert capsys.readouterr().err == ("magic params: error: model.d_model=30 is not a multiple of "
                                       "model.num_heads=4: pick a multiple\n")


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`magic train --help-fields | head -1`: the output (12 kB) overflows a one-page pipe, so the
    command is still writing when the reader closes it; it ends with 141, as `cat` would, and no
    BrokenPipeError traceback (issue 29). The pipe is made small before the command starts."""
    import fcntl

    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    with subprocess.Popen([sys.executable, "-m", "matrixmagic.train.cli", "train", "--help-fields"], stdout=write_end,
                          stderr=subprocess.PIPE, cwd=tmp_path, env={**os.environ, "MAGIC_DEBUG": ""}) as proc:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reader:
            assert reader.readline()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("argv, field, value", [
    (["--batch", "8", "--set", "batch_size=8"], "batch_size", 8),
    (["--remat", "full", "--set", "model.remat_policy=full"], "model.remat_policy", "full"),
    (["--mesh", "data=2,fsdp=-1", "--set", "mesh.fsdp=-1"], "mesh.fsdp", -1),
    (["--mesh", "fsdp=2", "--set", "mesh.tensor=2"], "mesh.tensor", 2),  # an axis --mesh leaves at 1: no conflict
    (["--set", "steps=5", "--set", "steps=7"], "steps", 7),  # a field --set twice keeps the last (--help says so)
])
def test_a_flag_and_a_set_that_agree_are_accepted(argv, field, value):
    """Issue 29: only a flag and a --set of one field with two values are refused (the cases above)."""
    from matrixmagic.train.cli.flags import config_assignments
    from matrixmagic.train.cli.main import build_parser

    assert config_assignments(build_parser().parse_args(["train", *argv]))[field] == value
