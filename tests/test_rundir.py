"""The default workdir rule: runs/<preset>-<hash of the config>. The same command lands in the same
directory and resumes there, a changed config gets a new directory, a finished run says so and
exits 0, and the directory records the command lines and the resolved config at its top."""

from __future__ import annotations

import json
import os
import re
import shutil
import sysconfig

import pytest

from matrixmagic.train.cli import main
from matrixmagic.train.run import resolve_config
from matrixmagic.train.rundir import BOOKKEEPING_FIELDS, command_line


def _workdir(*sets, preset=None):
    return resolve_config(preset, list(sets)).workdir


def test_default_workdir_is_preset_and_six_hex():
    assert re.fullmatch(r"runs/gpt-tiny-[0-9a-f]{6}", _workdir())
    assert re.fullmatch(r"runs/bert-tiny-[0-9a-f]{6}", _workdir(preset="bert-tiny"))


def test_same_config_same_dir_changed_config_new_dir():
    base = _workdir("steps=500")
    assert _workdir("steps=500") == base
    # what changes the computation names a new run ...
    for change in ("steps=501", "model.num_layers=6", "optimizer.learning_rate=1e-3", "seed=1", "batch_size=16",
                   "data.seq_len=64", "mesh.layout=fsdp"):
        assert _workdir("steps=500", change) != base, change
    # ... bookkeeping does not: logging, eval and save cadence, how many checkpoints are kept
    for same in ("log_every=1", "eval_every=7", "checkpoint_every=3", "keep_checkpoints=9", "sample_tokens=0"):
        assert _workdir("steps=500", same) == base, same
    assert {"log_every", "eval_every", "checkpoint_every", "workdir"} <= set(BOOKKEEPING_FIELDS)


def test_explicit_workdir_wins(tmp_path):
    assert _workdir(f"workdir={tmp_path / 'mine'}") == str(tmp_path / "mine")


def test_command_line_reads_as_typed():
    assert command_line(["/x/.venv/bin/magic", "train", "--set", "data.source=my texts"]) == \
        "magic train --set 'data.source=my texts'"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """A fresh working directory with a tiny corpus (10 stdlib modules) and its own data dir."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "string.py",
                 "colorsys.py", "keyword.py", "copy.py"):
        shutil.copy(os.path.join(stdlib, name), corpus / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path, [f"data.source={corpus}", f"data.data_dir={tmp_path / 'data'}"]


SMALL = ["model.num_layers=1", "batch_size=4", "eval_batches=1", "log_every=1", "sample_tokens=8"]


def _train(sets, *more) -> list[str]:
    return ["train", *[x for s in [*SMALL, *sets, *more] for x in ("--set", s)]]


@pytest.mark.slow
def test_same_command_resumes_then_reports_finished(in_tmp, capsys):
    tmp_path, data = in_tmp
    argv = _train(data, "steps=4", "checkpoint_every=2", "eval_every=2")
    assert main(argv) == 0
    runs = os.listdir(tmp_path / "runs")
    assert len(runs) == 1 and re.fullmatch(r"gpt-tiny-[0-9a-f]{6}", runs[0])
    run = tmp_path / "runs" / runs[0]
    assert json.loads((run / "config.json").read_text())["steps"] == 4
    first = capsys.readouterr().out
    assert "sample from the trained model" in first

    shutil.rmtree(run / "checkpoints" / "4")  # as if the run had been killed after step 2's save
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "starting from checkpoint step 2" in out
    lines = (run / "command.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[1].endswith("# resumed at step 2")
    assert os.listdir(tmp_path / "runs") == runs  # resumed in place, no second directory

    config_before = (run / "config.json").read_text()
    assert main(argv) == 0  # the same command once more: nothing to do
    out = capsys.readouterr().out
    assert f"already finished at step 4 (runs/{runs[0]}); nothing to train" in out
    assert "sample from the trained model" not in out and "step 4: eval" not in out
    assert (run / "config.json").read_text() == config_before
    assert len((run / "command.txt").read_text().splitlines()) == 2  # a finished rerun is not a resume

    # generate without --workdir finds the run `magic train` made with the same flags
    gen = ["generate", *[x for s in [*SMALL, *data, "steps=4", "eval_every=2"] for x in ("--set", s)],
           "--prompt", "def ", "--max-new-tokens", "4"]
    assert main(gen) == 0
    assert f"trained run runs/{runs[0]}" in capsys.readouterr().err

    # a changed config trains in a directory of its own instead of tripping on this run's checkpoints
    assert main(_train(data, "steps=4", "model.num_layers=2")) == 0
    assert len(os.listdir(tmp_path / "runs")) == 2


def test_the_hash_leaves_out_only_fields_a_resume_may_change():
    """Fields left out of the hash share a directory, so a rerun resumes there: the same-run check
    (train/samerun.py) must accept each of them, or a changed log cadence would be refused."""
    from matrixmagic.configs.train_config import TrainConfig, config_to_json
    from matrixmagic.train.integrity import flatten
    from matrixmagic.train.samerun import harmless

    fields = flatten(config_to_json(TrainConfig()))
    for name in BOOKKEEPING_FIELDS:  # a field, or a whole section (eval)
        covered = [f for f in fields if f == name or f.startswith(name + ".")]
        assert covered and all(harmless(f) for f in covered), name


def test_the_runs_parent_may_be_a_bucket(monkeypatch):
    """MATRIXMAGIC_RUNS_DIR=gs://bucket/runs: every host of a pod names the same run in the bucket;
    another scheme is refused naming the variable."""
    from matrixmagic.configs import ConfigError
    from matrixmagic.train.rundir import config_digest, default_workdir

    config = resolve_config("gpt-tiny", [], devices=1, platform="cpu")
    monkeypatch.setenv("MATRIXMAGIC_RUNS_DIR", "gs://bkt/runs/")
    assert default_workdir(config) == f"gs://bkt/runs/gpt-tiny-{config_digest(config)}"
    monkeypatch.setenv("MATRIXMAGIC_RUNS_DIR", "s3://bkt/runs")
    with pytest.raises(ConfigError, match="MATRIXMAGIC_RUNS_DIR='s3://bkt/runs': the s3:// scheme is not supported"):
        default_workdir(config)
