"""End-to-end training: every family's loss falls, and bad input fails early and clearly."""

from __future__ import annotations

import json
import os
import shutil
import sysconfig

import pytest

from matrixmagic.configs import ConfigError
from matrixmagic.configs.train_config import apply_overrides, train_config_for
from matrixmagic.train.loop import train

TINY = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.d_ff=128", "data.seq_len=64",
        "batch_size=8", "eval_batches=2", "log_every=5", "sample_tokens=0", "checkpoint_every=1000"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A few real stdlib modules: big enough to learn from, small enough to build in a second."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "string.py",
                 "colorsys.py", "keyword.py", "copy.py"):
        shutil.copy(os.path.join(stdlib, name), root / name)
    return str(root)


def _config(preset, corpus, tmp_path, *extra):
    config = train_config_for(preset)
    return apply_overrides(config, TINY + [f"data.source={corpus}", f"data.data_dir={tmp_path / 'data'}",
                                           f"workdir={tmp_path / 'run'}", *extra])


@pytest.mark.parametrize("preset,steps,lr", [("gpt-tiny", 60, "3e-3"), ("bert-tiny", 60, "1e-3"),
                                             ("transformer-tiny", 60, "3e-3")])
def test_loss_falls_for_each_family(preset, steps, lr, corpus, tmp_path):
    config = _config(preset, corpus, tmp_path, f"steps={steps}", f"eval_every={steps}",
                     f"optimizer.learning_rate={lr}", "optimizer.schedule=constant")
    summary = train(config, quiet=True)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < losses[0] - 0.5, losses  # starts near ln(384) = 5.95
    assert summary["final_eval"]["loss"] < losses[0]
    assert os.path.exists(tmp_path / "run" / "loss_curve.png")
    assert any(p.startswith("events") for p in os.listdir(tmp_path / "run" / "tensorboard"))
    train_row = next(r for r in rows if r["split"] == "train")
    assert {"tokens_per_second", "step_time", "mfu", "learning_rate", "grad_norm"} <= train_row.keys()


def test_sequence_longer_than_positions_is_rejected_before_work(corpus, tmp_path):
    with pytest.raises(ConfigError, match="data.seq_len"):
        _config("gpt-tiny", corpus, tmp_path, "data.seq_len=512", "model.max_len=256")


def test_unwritable_workdir_fails_before_data_is_read(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = _config("gpt-tiny", corpus, tmp_path, f"workdir={blocker / 'run'}", "steps=5")
    with pytest.raises(ConfigError, match="workdir"):
        train(config, quiet=True)
    assert not (tmp_path / "data").exists()  # nothing expensive started


@pytest.mark.parametrize("assignment,needle", [
    ("stepz=3", "Did you mean 'steps'"),
    ("steps=many", "steps expects int"),
    ("model.activation=gelo", "Did you mean 'gelu'"),
    ("optimizer.schedule=cosin", "Did you mean 'cosine'"),
    ("model.d_model=129", "num_heads"),
    ("no_equals_sign", "field=value"),
])
def test_bad_overrides_name_the_field(assignment, needle):
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(train_config_for("gpt-tiny"), [assignment])


def test_overrides_change_related_fields_together():
    config = apply_overrides(train_config_for("gpt-tiny"), ["model.d_model=100", "model.num_heads=5", "steps=7"])
    assert (config.model.d_model, config.model.num_heads, config.steps) == (100, 5, 7)
    assert config.warmup_steps == 0  # 10% of 7 steps


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    from matrixmagic.train.cli import main

    assert main(["train", "--set", "stepz=3"]) == 2
    assert "Did you mean 'steps'" in capsys.readouterr().err
