"""Bad Hugging Face input fails early with an error naming the file, tensor or field; a failed
import leaves no run directory; an imported run fine-tunes with `magic train --init-from`."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from hf_helpers import FIXTURES, rejected, tensors, variant, with_config

from matrixmagic.train.checkpoint import Checkpointer, CheckpointError
from matrixmagic.train.cli import main
from matrixmagic.train.hf import api
from matrixmagic.train.hf.api import import_hf
from matrixmagic.train.hf.config import ALIASES, REQUIRED, model_config_from_hf
from matrixmagic.train.hf.errors import HFError


@pytest.fixture()
def no_reads(monkeypatch):
    """Fail the test if any tensor's bytes are read: the error must come from headers and configs."""
    def refuse(info):
        raise AssertionError(f"read {info.name} before the error")
    monkeypatch.setattr("matrixmagic.train.hf.checkpoint.read", refuse)


def test_a_directory_without_config_json(tmp_path, no_reads):
    (tmp_path / "src").mkdir()
    shutil.copy(os.path.join(FIXTURES, "gpt2", "model.safetensors"), tmp_path / "src")
    rejected(tmp_path / "src", tmp_path, "has no config.json")
    rejected(tmp_path / "nowhere", tmp_path, "is not a directory")


def test_an_unsupported_model_type_or_head(tmp_path, no_reads):
    rejected(with_config(tmp_path, "gpt2", model_type="falcon"), tmp_path, r"model_type='falcon' is not supported.*gpt2")
    shutil.rmtree(tmp_path / "src")
    rejected(with_config(tmp_path, "bert", architectures=["BertForSequenceClassification"]), tmp_path,
             "BertForSequenceClassification has a head we do not have")


@pytest.mark.parametrize("source,field,value,match", [
    ("gpt2", "scale_attn_by_inverse_layer_idx", True, "no per-layer 1/\\(layer\\+1\\) score scale"),
    ("gpt2", "activation_function", "silu", "activation_function='silu'.*the activations we have are"),
    ("bert", "position_embedding_type", "relative_key", "only absolute"),
    ("bert", "num_attention_heads", 5, "num_heads=5"),
])
def test_a_config_we_cannot_express(tmp_path, no_reads, source, field, value, match):
    message = rejected(with_config(tmp_path, source, **{field: value}), tmp_path, match)
    assert "config.json" in message


def test_a_missing_or_misshaped_tensor_is_named(tmp_path, no_reads):
    src = variant("gpt2", str(tmp_path / "a"), drop={"transformer.h.1.mlp.c_fc.weight"})
    rejected(src, tmp_path, r"missing from the checkpoint: h\.1\.mlp\.c_fc\.weight")
    values = tensors(os.path.join(FIXTURES, "gpt2"))
    src = variant("gpt2", str(tmp_path / "b"), add={"transformer.h.0.attn.c_proj.weight": values[
        "transformer.h.0.attn.c_proj.weight"][:, :16]})
    rejected(src, tmp_path, r"transformer\.h\.0\.attn\.c_proj\.weight: \[32, 16\] in .*config.json implies \[32, 32\]")
    src = variant("gpt2", str(tmp_path / "c"), add={"score.weight": np.zeros((2, 32), np.float32)})
    rejected(src, tmp_path, r"belong to no part.*score\.weight")


def test_a_truncated_file_is_named_before_anything_is_read(tmp_path, no_reads):
    src = variant("bert", str(tmp_path / "src"))
    path = os.path.join(src, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    rejected(src, tmp_path, r"model.safetensors is truncated: tensor '.*' ends at byte")
    with open(path, "r+b") as f:
        f.truncate(20)
    rejected(src, tmp_path, "header claims .* bytes but the file has 20")


def test_a_tokenizer_larger_than_the_embedding_table(tmp_path, no_reads):
    rejected(with_config(tmp_path, "gpt2", vocab_size=300), tmp_path, "has 320 ids but the embedding table .* 300 rows")


def test_an_existing_run_directory_is_never_overwritten(tmp_path, no_reads):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(HFError, match="already exists and is not empty"):
        import_hf(os.path.join(FIXTURES, "gpt2"), str(tmp_path / "run"))
    assert os.listdir(tmp_path / "run") == ["keep.txt"]


def test_a_failure_while_writing_leaves_no_half_written_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(api, "place_params", broken)
    with pytest.raises(OSError, match="disk full"):
        import_hf(os.path.join(FIXTURES, "gpt2"), str(tmp_path / "run"))
    assert os.listdir(tmp_path) == []


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    assert main(["hf", "import", str(tmp_path), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("magic hf: error:") and "has no config.json" in err and "Traceback" not in err


def test_an_imported_run_is_not_resumed_in_place_and_says_how_to_fine_tune(tmp_path):
    run = import_hf(os.path.join(FIXTURES, "gpt2"), str(tmp_path / "run")).path
    ckpt = Checkpointer(run, read_only=True)
    with pytest.raises(CheckpointError, match=f"--init-from {run} --workdir NEW_RUN"):
        ckpt.restore_latest(abstract_state=None)
    ckpt.close()
    with open(os.path.join(run, "checkpoints", "0", "data", "metadata")) as f:
        assert json.load(f)["imported_from"] == os.path.join(FIXTURES, "gpt2")


@pytest.mark.slow
def test_init_from_an_imported_gpt2_fine_tunes_on_text_files_with_its_tokenizer(tmp_path):
    """`magic train --init-from RUN`: the model, context and tokenizer come from the run; the loss falls."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this  # the Zen of Python: the text the fixture's tokenizer was trained on
    lines = codecs.decode(this.s, "rot13").splitlines()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text("\n".join(lines[i:] + lines[:i]))
    run = import_hf(os.path.join(FIXTURES, "gpt2"), str(tmp_path / "imported")).path
    workdir = tmp_path / "tuned"
    code = main(["train", "--init-from", run, "--workdir", str(workdir), "--batch", "4",
                 *[a for s in (f"data.source={corpus}", f"data.data_dir={tmp_path / 'data'}", "steps=30",
                               "log_every=5", "eval_every=30", "eval_batches=1", "sample_tokens=0",
                               "optimizer.learning_rate=3e-3", "optimizer.schedule=constant",
                               "optimizer.warmup_steps=3",  # not the gpt2 recipe's 375M tokens: a short fine-tune
                               "model.dropout_rate=0", "model.attention_dropout_rate=0") for a in ("--set", s)]])
    assert code == 0
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < losses[0] - 0.3, losses
    with open(workdir / "checkpoints" / "30" / "config" / "metadata") as f:
        config = json.load(f)
    assert config["preset"] == "gpt2" and config["model"]["d_model"] == 32 and config["data"]["seq_len"] == 64
    assert config["data"]["tokenizer"] == os.path.join(run, "tokenizer.json")


def _fixture_config(source: str) -> dict:
    with open(os.path.join(FIXTURES, source, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("source", ["gpt2", "bert", "llama", "refusals/mistral"])
def test_a_config_without_a_shape_key_names_it(source):
    """Each key that fixes a tensor's shape is named when config.json lacks it, instead of a
    default (GPT-2's 768) that surfaces as every tensor mis-shaped (issue 29)."""
    hf = _fixture_config(source)
    for key in REQUIRED[hf["model_type"]]:
        without = {k: v for k, v in hf.items() if k not in (key, *ALIASES.get(key, ()))}
        with pytest.raises(HFError, match=f"^config.json has no '{key}'.*the config.json saved with these weights"):
            model_config_from_hf(without)


@pytest.mark.parametrize("source,changes,match", [
    ("gpt2", {"n_layer": 2.5}, r"^config\.json n_layer=2\.5 is invalid: a count must be a whole number\.$"),
    ("gpt2", {"n_head": True}, r"n_head=True is invalid: a count must be a whole number"),
    ("gpt2", {"n_embd": "32"}, r"n_embd='32' is invalid: a count"),
    ("bert", {"num_hidden_layers": 1.5}, r"num_hidden_layers=1\.5 is invalid: a count"),
    ("llama", {"num_key_value_heads": 1.5}, r"num_key_value_heads=1\.5 is invalid: a count"),
    ("gpt2", {"layer_norm_epsilon": float("nan")}, r"layer_norm_epsilon=nan is invalid: a constant must be a finite"),
    ("bert", {"layer_norm_eps": float("inf")}, r"layer_norm_eps=inf is invalid: a constant must be a finite"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}},
     r"^config\.json rope_parameters\.rope_theta=inf is invalid: a constant must be a finite number\.$"),
    ("llama", {"rope_parameters": None, "rope_theta": float("nan")}, r"^config\.json rope_theta=nan is invalid"),
    ("llama", {"rms_norm_eps": float("-inf")}, r"rms_norm_eps=-inf is invalid"),
])
def test_a_count_that_is_not_whole_or_a_constant_that_is_not_finite(source, changes, match):
    """int() read 2.5 layers as 2, and NaN epsilons went through to a model of NaNs (issue 29)."""
    with pytest.raises(HFError, match=match):
        model_config_from_hf({**_fixture_config(source), **changes})


def test_a_whole_count_written_as_a_float_is_read():
    assert model_config_from_hf({**_fixture_config("gpt2"), "n_layer": 2.0}).model.num_layers == 2


def test_a_fractional_layer_count_is_refused_before_anything_is_read(tmp_path, no_reads):
    rejected(with_config(tmp_path, "gpt2", n_layer=2.5), tmp_path, r"config\.json n_layer=2\.5 is invalid")


def test_a_tensor_of_nans_is_named_and_nothing_is_left_behind(tmp_path):
    """A damaged checkpoint: one tensor NaN, another inf. The import stops at the first it reads,
    naming it, and removes its temporary sibling (issue 29)."""
    values = tensors(os.path.join(FIXTURES, "gpt2"))
    name = "transformer.h.0.attn.c_attn.weight"
    src = variant("gpt2", str(tmp_path / "src"), add={name: np.full_like(values[name], np.nan)})
    rejected(src, tmp_path, rf"model\.safetensors: tensor '{re.escape(name)}' holds NaN or inf values: the checkpoint "
                            rf"is damaged")
    shutil.rmtree(src)
    weights = values["transformer.wte.weight"].copy()
    weights[3, 5] = np.inf
    src = variant("gpt2", str(tmp_path / "src"), add={"transformer.wte.weight": weights}, dtype=np.float16)
    rejected(src, tmp_path, r"tensor 'transformer\.wte\.weight' holds NaN or inf values")
