"""Output paths a user quotes or points at a bucket (issue 29): a quoted '~/x' is the home folder,
never a folder named `~`, and a URL where only a local folder works is refused naming its variable,
never a folder named `gs:`. (The gs:// and s3:// refusals of flags are rows of user_error_cases.py
and tests/test_gcs_*.py; these need HOME or the compile-cache variable, which `magic` reads before
its main.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from run_helpers import magic_env

from matrixmagic.train.cli.main import console_main


def magic_at(cwd, home, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", *argv], cwd=cwd,
                          env=magic_env(HOME=str(home), MAGIC_DEBUG=""), capture_output=True, text=True,
                          timeout=240, check=False)


@pytest.mark.parametrize("argv, written", [
    (("schedule", "--preset", "gpt-tiny", "--plot", "~/lr.png"), "lr.png"),
    (("explain", "--preset", "gpt-tiny", "--plot", "~/pictures"), "pictures/causal_mask.png"),
])
def test_a_quoted_tilde_is_the_home_folder(argv, written, tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    done = magic_at(cwd, home, *argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (home / written).is_file()
    assert os.listdir(cwd) == []  # no folder named `~`


def test_a_quoted_tilde_workdir_is_under_home(tmp_path):
    done = magic_at(tmp_path, tmp_path, "train", "--workdir", "~/run", "--print-config")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["config"]["workdir"] == str(tmp_path / "run")
    assert not os.path.exists(tmp_path / "~")


@pytest.mark.parametrize("url", ["gs://bucket/cache", "s3://bucket/cache"])
def test_a_compile_cache_url_is_refused_in_one_line(url, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAGIC_COMPILE_CACHE", url)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert console_main(["params", "gpt-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"magic params: error: MAGIC_COMPILE_CACHE={url!r} is a URL") and "=0" in err
    assert os.listdir(tmp_path) == []  # no folder named `gs:` or `s3:`


def test_a_quoted_tilde_data_source_is_under_home(tmp_path):
    """`magic data --source '~/texts' --data-dir '~/data'` reads and writes under HOME."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (home / "texts").mkdir(parents=True)
    cwd.mkdir()
    for i in range(3):
        (home / "texts" / f"doc{i}.txt").write_text(f"document {i}\n" * 50)
    done = magic_at(cwd, home, "data", "--source", "~/texts", "--data-dir", "~/data")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"dir:{home / 'texts'}" in done.stdout and (home / "data" / "text_files").is_dir()
    assert os.listdir(cwd) == []  # no folder named `~`


def test_a_quoted_tilde_lm_eval_output_path_is_under_home(monkeypatch):
    """`magic lm-eval ... --output_path '~/out'`: the harness reads its own flags, so the path is
    expanded in the command line handed to it (both spellings, and -o); URLs are left alone."""
    from matrixmagic.train.cli.evaluate import LM_EVAL_PATH_FLAGS
    from matrixmagic.train.cli.paths import expanded_path_flags

    monkeypatch.setenv("HOME", "/home/me")
    argv = ["--model", "matrixmagic", "--output_path", "~/out", "--tasks", "~task", "-o=~/o.json",
            "--output_path=gs://b/~x", "-o", "~"]
    assert expanded_path_flags(argv, LM_EVAL_PATH_FLAGS) == [
        "--model", "matrixmagic", "--output_path", "/home/me/out", "--tasks", "~task", "-o=/home/me/o.json",
        "--output_path=gs://b/~x", "-o", "/home/me"]


def test_magic_lm_eval_hands_the_expanded_path_to_the_harness(monkeypatch):
    import lm_eval.__main__ as harness

    from matrixmagic.train.cli.evaluate import lm_eval_main

    seen = []
    monkeypatch.setenv("HOME", "/home/me")
    monkeypatch.setattr(harness, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # lm_eval_main sets it for the harness
    assert lm_eval_main(["--model", "matrixmagic", "--output_path", "~/out"]) == 0
    assert seen == [["lm_eval", "--model", "matrixmagic", "--output_path", "/home/me/out"]]
