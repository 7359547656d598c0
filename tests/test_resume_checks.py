"""A resume must be the same run (train/samerun.py), readers fall back past a damaged step
(train/checkpoint.py newest_good), and recovery is quiet (train/quiet.py).

One tiny 10-step run (checkpoints at 5 and 10) is the module's base; each test copies it.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest
from run_helpers import REPO, magic, metrics_rows, train_command, tree_snapshot, write_corpus

from matrixmagic.train.checkpoint import Checkpointer, CheckpointWarning, DiskFullError, load_params, restore_params
from matrixmagic.train.integrity import flat_by_name
from matrixmagic.train.runlock import LOCK_FILE
from matrixmagic.train.samerun import run_changes

NOISE = ("Traceback", "Event loop is closed", "tensorstore_spec", "Task exception was never retrieved")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("base")
    corpus = {"source": write_corpus(root / "src"), "data": str(root / "data"), "other": write_corpus(root / "other",
                                                                                                      seed=1)}
    done = train(root / "run", corpus)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**corpus, "run": root / "run"}


def train(workdir, corpus, *sets: str, flags=(), source=None):
    import subprocess

    from run_helpers import magic_env

    cmd = train_command(workdir, source or corpus["source"], corpus["data"], "steps=10", "checkpoint_every=5", *sets,
                        flags=flags)
    return subprocess.run(cmd, env=magic_env(), capture_output=True, text=True, check=False, timeout=300, cwd=REPO)


def copy_run(base, tmp_path):
    shutil.copytree(base["run"], tmp_path / "run")
    return tmp_path / "run"


def garble(workdir, step: int) -> None:
    """Damage every data file of a step's arrays (as a bad disk or copy would)."""
    for path in glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"), recursive=True):
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 3)
            f.write(b"\xde\xad\xbe\xef" * 4)


def flat(params) -> dict:
    return {k: np.asarray(v) for k, v in flat_by_name(jax.device_get(params)).items()}


def params_of(workdir, step: int, like) -> dict:
    """A step's params read from its own step directory (no fallback involved)."""
    params, _ = restore_params(os.path.join(workdir, "checkpoints", str(step)), jax.eval_shape(lambda: like))
    return flat(params)


# ----------------------------------------------------------------------------- same run


@pytest.mark.slow
def test_a_changed_source_learning_rate_and_steps_are_refused_naming_each(base, tmp_path):
    workdir = copy_run(base, tmp_path)
    before = tree_snapshot(workdir)
    before.pop(LOCK_FILE)  # the refused run held the lock while it checked (written, then emptied)
    done = train(workdir, base, "steps=12", "optimizer.learning_rate=0.002", source=base["other"])
    assert done.returncode == 2, done.stderr[-3000:]
    err = done.stderr
    assert "checkpoint step 10 in" in err and "is another run than this command describes" in err
    assert f"data.source: {base['source']!r} -> {base['other']!r}" in err
    assert "optimizer.learning_rate: 0.005 -> 0.002" in err and "steps: 10 -> 12" in err
    assert "data.source (files): '30 files," in err, "the data's own fingerprint differs too"
    assert "--allow-change data.source,optimizer.learning_rate,steps" in err and "another --workdir" in err
    assert "--init-from" in err and not any(n in err for n in NOISE)
    after = tree_snapshot(workdir)
    after.pop(LOCK_FILE)
    assert after == before, "a refused resume touches nothing"


@pytest.mark.slow
def test_allow_change_resumes_and_records_the_changes_at_the_resume_step(base, tmp_path):
    workdir = copy_run(base, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "10")  # resume from step 5
    done = train(workdir, base, "steps=12", "optimizer.learning_rate=0.002", "log_every=2",  # log_every: harmless
                 flags=["--allow-change", "steps", "--allow-change", "optimizer.learning_rate"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming with changes allowed by --allow-change: optimizer.learning_rate: 0.005 -> 0.002; steps: 10 -> 12" \
        in done.stdout
    rows = metrics_rows(workdir)
    resumes = [r for r in rows if r["split"] == "resume"]
    assert resumes == [{"step": 5, "split": "resume",
                        "allowed_changes": {"optimizer.learning_rate": [0.005, 0.002], "steps": [10, 12]}}]
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6, 8, 10, 12], "steps 6.. were logged under the new log_every, once each"
    with open(workdir / "checkpoints" / "12" / "config" / "metadata") as f:
        assert json.load(f)["optimizer"]["learning_rate"] == 0.002, "the next resume compares with the new values"


@pytest.mark.slow
def test_a_resume_with_allow_change_rewrites_config_json_and_appends_to_command_txt(base, tmp_path):
    """config.json says what the run goes on with (issue 29: it kept steps=10), and command.txt
    keeps every start's command line."""
    workdir = copy_run(base, tmp_path)
    first = (workdir / "command.txt").read_text()
    assert json.loads((workdir / "config.json").read_text())["steps"] == 10
    done = train(workdir, base, "steps=12", flags=["--allow-change", "steps"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((workdir / "config.json").read_text())["steps"] == 12
    assert not list(workdir.glob("config.json.tmp*")), "written to a temporary name, then renamed over the old one"
    lines = (workdir / "command.txt").read_text().splitlines()
    assert "\n".join(lines[:-1]) + "\n" == first, "the earlier command lines are kept"
    assert "steps=12" in lines[-1] and "--allow-change steps" in lines[-1] and lines[-1].endswith(
        "# resumed at step 10")


@pytest.mark.slow
def test_a_corpus_that_gained_a_file_is_refused_although_the_source_reads_the_same(base, tmp_path):
    corpus = {**base, "source": write_corpus(tmp_path / "src")}
    workdir = tmp_path / "run"
    assert train(workdir, corpus, "steps=5").returncode == 0
    with open(os.path.join(corpus["source"], "new.txt"), "w") as f:
        f.write("one more document\n")
    done = train(workdir, corpus, "steps=5")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "data.source (files): '30 files," in done.stderr and "-> '31 files," in done.stderr
    assert "data.source: " not in done.stderr, "the config's data.source did not change"


@pytest.mark.slow
def test_a_checkpoint_without_a_data_fingerprint_still_resumes_and_gains_one(base, tmp_path):
    workdir = copy_run(base, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "10")
    path = workdir / "checkpoints" / "5" / "data" / "metadata"
    record = json.loads(path.read_text())
    del record["source"]  # as written before the fingerprint existed
    path.write_text(json.dumps(record))
    done = train(workdir, base)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "note: checkpoint step 5 predates data fingerprints" in done.stdout
    saved = json.loads((workdir / "checkpoints" / "10" / "data" / "metadata").read_text())
    assert saved["source"]["source"] == f"dir:{base['source']}" and saved["source"]["tokenizer"] == "bytes"


def test_harmless_fields_are_not_changes_and_every_other_field_is():
    from matrixmagic.configs.train_config import MeshConfig, TrainConfig, config_to_json

    saved = config_to_json(TrainConfig())
    moved = config_to_json(TrainConfig(workdir="elsewhere", eval_every=7, log_every=3, checkpoint_every=9,
                                       microbatches=2, mesh=MeshConfig(data=1, fsdp=-1)))
    assert run_changes(saved, moved, None, {}) == []
    dropout = json.loads(json.dumps(saved))
    dropout["model"]["dropout_rate"], dropout["seed"] = 0.2, 1
    assert [c.field for c in run_changes(saved, dropout, None, {})] == ["model.dropout_rate", "seed"]
    fp = {"source": "stdlib", "files": "3 files", "tokenizer": "bytes"}
    changes = run_changes(saved, saved, fp, {**fp, "tokenizer": "sp-0123"})
    assert [(c.field, c.label, c.old, c.new) for c in changes] == [
        ("data.tokenizer", "data.tokenizer (tokenizer)", "bytes", "sp-0123")]


# ----------------------------------------------------------------------------- readers and quiet recovery


@pytest.mark.slow
def test_generate_and_explain_fall_back_past_a_corrupt_latest_step(base, tmp_path):
    workdir = copy_run(base, tmp_path)
    garble(workdir, 10)
    for args in (["generate", "--workdir", workdir, "--prompt", "ab", "--max-new-tokens", "4", "--temperature", "0"],
                 ["explain", "--workdir", workdir, "--text", "ab"]):
        done = magic(*args)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "skipped corrupt or partial checkpoint step 10 (" in done.stderr and "loaded step 5" in done.stderr
        assert not any(n in done.stdout + done.stderr for n in NOISE), done.stderr[-3000:]
    assert os.path.isdir(workdir / "checkpoints" / "10"), "a reader leaves the run as it is"
    with pytest.warns(CheckpointWarning, match="skipped corrupt or partial checkpoint step 10"):
        params, _ = load_params(str(workdir))
    got, want = flat(params), params_of(workdir, 5, params)
    assert got.keys() == want.keys() and all(got[k].tobytes() == want[k].tobytes() for k in want)
    with pytest.warns(CheckpointWarning, match="--init-from .*skipped corrupt or partial checkpoint step 10"):
        _, step = restore_params(str(workdir), jax.eval_shape(lambda: params))
    assert step == 5


@pytest.mark.slow
def test_readers_verify_only_the_params(base, tmp_path):
    """Damage confined to the optimizer state (its fingerprint no longer matches, which a
    resume refuses: tests/test_checkpoint.py) does not stop a reader or --init-from."""
    workdir = copy_run(base, tmp_path)
    path = workdir / "checkpoints" / "10" / "integrity" / "metadata"
    record = json.loads(path.read_text())
    name = next(k for k in record["fingerprint"] if k.startswith("opt_state/"))
    record["fingerprint"][name] ^= 1
    path.write_text(json.dumps(record))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # no step is skipped
        like, _ = load_params(str(workdir))
        params, step = restore_params(str(workdir), jax.eval_shape(lambda: like))
    assert step == 10 and flat(params).keys() == flat(like).keys()


@pytest.mark.slow
def test_train_quarantines_a_corrupt_step_quietly(base, tmp_path):
    workdir = copy_run(base, tmp_path)
    garble(workdir, 10)
    done = train(workdir, base)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: checkpoint step 10 in" in done.stderr and "is corrupt or partial (DATA_LOSS" in done.stderr
    moved = os.listdir(workdir / "checkpoints.corrupt")
    assert len(moved) == 1 and f"moved it to {workdir / 'checkpoints.corrupt' / moved[0]}" in done.stderr
    assert not any(n in done.stdout + done.stderr for n in NOISE), done.stderr[-3000:]
    assert "starting from checkpoint step 5" in done.stdout


def test_a_full_disk_during_a_save_is_one_error_with_the_space_needed(tmp_path, monkeypatch, caplog):
    """The metadata write of orbax's background save thread raises ENOSPC, as on a full disk."""
    from orbax.checkpoint._src.path import async_path
    from test_checkpoint import small_state

    from matrixmagic.configs.train_config import TrainConfig

    ckpt = Checkpointer(str(tmp_path / "run"), keep=2)
    ckpt.save(1, small_state(1), {}, TrainConfig())
    ckpt.wait()

    async def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(async_path, "write_text", full)
    ckpt.save(2, small_state(2), {}, TrainConfig())
    with pytest.raises(DiskFullError) as err:
        ckpt.save(3, small_state(3), {}, TrainConfig())  # the previous save's failure surfaces here
    message = str(err.value)
    assert "saving checkpoint step 2 failed (no space left on device)" in message
    assert "One checkpoint of this state needs about" in message and "keep_checkpoints=2 needs about" in message
    assert "The last good checkpoint is step 1" in message
    ckpt.close()  # reported once: closing does not raise it again
    assert not [r for r in caplog.records if r.exc_info], "orbax's ENOSPC tracebacks are dropped"
    # the partial `2.orbax-checkpoint-tmp*` is gone with the error: it would keep the disk full
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1"]
