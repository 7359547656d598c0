"""A quiet console: no libtpu probes on a CPU-only machine, and one line of ours, not TFDS's
chatter, when a dataset is built."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from matrixmagic.train.cli.main import cpu_only_when_no_accelerator, machine_has_accelerator
from matrixmagic.train.data.corpus import open_corpus

LIBTPU_NOISE = re.compile(r"libtpu|host bounds|TPU_|E0000|Source Location Trace|InitGoogle", re.I)


def test_cpu_only_when_no_accelerator():
    env = {}
    cpu_only_when_no_accelerator(env, has_accelerator=lambda: False)
    assert env == {"JAX_PLATFORMS": "cpu"}
    env = {}
    cpu_only_when_no_accelerator(env, has_accelerator=lambda: True)  # a TPU VM or a GPU box: jax decides
    assert env == {}
    env = {"JAX_PLATFORMS": "tpu"}
    cpu_only_when_no_accelerator(env, has_accelerator=lambda: False)  # yours wins
    assert env == {"JAX_PLATFORMS": "tpu"}


def test_a_google_pci_device_counts_as_a_tpu(tmp_path):
    if machine_has_accelerator(str(tmp_path / "none")):
        pytest.skip("this machine has a GPU device node")
    (tmp_path / "0000:00:04.0").mkdir()
    (tmp_path / "0000:00:04.0" / "vendor").write_text("0x8086\n")  # Intel: not an accelerator
    assert not machine_has_accelerator(str(tmp_path))
    (tmp_path / "0000:00:05.0").mkdir()
    (tmp_path / "0000:00:05.0" / "vendor").write_text("0x1ae0\n")  # Google: a TPU chip
    assert machine_has_accelerator(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]'): nothing to keep quiet")
def test_magic_params_prints_no_libtpu_line_on_cpu():
    if machine_has_accelerator():
        pytest.skip("this machine has an accelerator, so libtpu (or a GPU) may rightly start")
    magic = Path(sys.executable).parent / "magic"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([str(magic), "params", "gpt-tiny"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "gpt-tiny" in result.stdout
    assert not [line for line in output.splitlines() if LIBTPU_NOISE.search(line)], output


def test_building_a_dataset_prints_one_line_of_ours(tmp_path, capfd):
    source = tmp_path / "texts"
    source.mkdir()
    for name in ("textwrap.py", "shlex.py", "fnmatch.py"):
        shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], name), source / name)
    corpus = open_corpus(str(source), tmp_path / "data")
    out, err = capfd.readouterr()
    assert re.fullmatch(r"building the texts dataset from 3 files into \S+ \.\.\. done in \d+ s\n", out), out
    assert err == "", err  # no absl warnings, no progress bars
    assert corpus.num_documents("train") + corpus.num_documents("validation") == 3
    open_corpus(str(source), tmp_path / "data")  # prepared: silent
    assert capfd.readouterr() == ("", "")


def test_sweep_skips_tensor_sizes_the_heads_cannot_split_in_one_line():
    """gpt-tiny's 2 heads cannot split over tensor=4 or 8: one line says so, instead of one per
    (tensor, remat, microbatches) combination (30 before)."""
    import jax

    from matrixmagic.train.cli import build_parser
    from matrixmagic.train.cli.compile import sweep_rows
    from matrixmagic.train.planning.chips import parse_target

    args = build_parser().parse_args(["compile", "--preset", "gpt-tiny", "--topology", "cpu-8", "--sweep",
                                      "--sweep-tensor", "4,8"])
    lines = []
    rows = sweep_rows(args, parse_target("cpu-8"), jax.devices("cpu")[:1] * 8, log=lines.append)
    assert rows == [] and lines == ["tensor=4,8: skipped (gpt-tiny has 2 heads, and the tensor axis splits them)"]


def test_cli_warnings_are_one_line_of_words(capsys):
    """Inside `magic`, a warning prints as 'warning: <message>' (no file:line, no source line), and the
    caller's warning display is restored afterwards."""
    import warnings

    from matrixmagic.train.cli import main

    before = warnings.showwarning
    assert main(["params", "gpt-tiny", "--json"]) == 0
    assert warnings.showwarning is before
    from matrixmagic.train.cli.main import show_warning

    show_warning(UserWarning("4 file(s) are not valid UTF-8"), UserWarning, "x.py", 1)
    assert capsys.readouterr().err == "warning: 4 file(s) are not valid UTF-8\n"
