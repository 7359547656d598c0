"""`magic train --help-fields`: every field with its type, its preset's default and its meaning,
the meaning read from the dataclass comments (the one place it is written)."""

from __future__ import annotations

import re
from pathlib import Path

from matrixmagic.configs.fields import field_meanings
from matrixmagic.configs.train_config import TrainConfig, _field_types
from matrixmagic.train.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_has_a_meaning():
    meanings = field_meanings()
    assert set(meanings) == set(_field_types(TrainConfig))
    assert [name for name, text in meanings.items() if not text] == []


def test_meanings_are_the_source_comments():
    source = (ROOT / "configs" / "model_config.py").read_text()
    trailing = re.search(r"^    scale_embeddings: bool = False  # (.*)$", source, re.M).group(1)
    assert field_meanings()["model.scale_embeddings"] == trailing
    source = (ROOT / "configs" / "train_config.py").read_text()
    block = re.search(r"((?:^    # .*\n)+)    keep_best_checkpoint:", source, re.M).group(1)
    assert field_meanings()["keep_best_checkpoint"] == " ".join(line.strip()[2:] for line in block.splitlines())


def test_help_fields_shows_the_presets_defaults(capsys):
    assert main(["train", "--help-fields"]) == 0
    tiny = capsys.readouterr().out
    assert re.search(r"model\.d_model +int += 128\n +width of the residual stream", tiny)
    assert re.search(r"steps +int += 1300\n", tiny)
    assert main(["train", "--preset", "gpt2", "--help-fields"]) == 0
    assert re.search(r"model\.d_model +int += 768\n", capsys.readouterr().out)
