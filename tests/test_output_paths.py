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
