"""Hugging Face GPT-2 and BERT checkpoints in and out, against transformers' own output.

The references are golden fixtures written once by transformers (tests/fixtures/hf/, made by
tests/fixtures/make_hf_fixtures.py): tiny random models, their logits on fixed ids, GPT-2's
greedy continuation, and the tensor names save_pretrained writes. No torch here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hf_helpers import FIXTURES, golden, keys, tensors, variant

from matrixmagic.configs import PRESETS
from matrixmagic.configs.train_config import config_from_json
from matrixmagic.model.attention import MASK_VALUE
from matrixmagic.model.build import build_model
from matrixmagic.model.generate import Sampling, generate
from matrixmagic.train.checkpoint import saved_run_config
from matrixmagic.train.data.tokenizers import HFTokenizer, load_tokenizer
from matrixmagic.train.hf.api import export_hf, import_hf, preset_for
from matrixmagic.train.hf.config import hf_config_from_model, model_config_from_hf
from matrixmagic.train.hf.tensorfile import read_checkpoint
from matrixmagic.train.hf.tokenizer import find_tokenizer
from matrixmagic.train.integrity import flat_by_name
from matrixmagic.train.run import load_run, resolve_config

TOL = 1e-4  # float32 logits of two implementations (measured here: ~2e-6)
G = golden()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("imported")
    return {name: import_hf(os.path.join(FIXTURES, name), str(root / name)).path
            for name in ("gpt2", "bert", "bert_pretraining")}


def logits_of(run: str, ids, **inputs) -> np.ndarray:
    config, params, _ = load_run(run)
    return np.asarray(build_model(config).apply({"params": params}, jnp.asarray(ids),
                                                **{k: jnp.asarray(v) for k, v in inputs.items()}))


# ----------------------------------------------------------------------------- against transformers


def test_gpt2_logits_equal_transformers_and_table_padding_is_masked(runs):
    logits = logits_of(runs["gpt2"], G["gpt2_ids"])
    vocab = G["gpt2_logits"].shape[-1]
    np.testing.assert_allclose(logits[..., :vocab], G["gpt2_logits"], atol=TOL, rtol=0)
    assert logits.shape[-1] == 384, "320 rows padded to a multiple of 128"
    assert np.all(logits[..., vocab:] == MASK_VALUE), "padding rows are never predicted"


def test_gpt2_greedy_generation_equals_transformers(runs):
    config, params, _ = load_run(runs["gpt2"])
    want = G["gpt2_greedy_tokens"][0]
    out = generate(build_model(config), params, [G["gpt2_greedy_prompt"][0].tolist()], max_new_tokens=len(want),
                   eot_id=-1, sampling=Sampling(temperature=0.0), rng=jax.random.key(0))
    np.testing.assert_array_equal(out.tokens[0], want)


@pytest.mark.parametrize("name,key", [("bert", "bert_logits"), ("bert_pretraining", "bert_pretraining_logits")])
def test_bert_masked_lm_logits_equal_transformers_with_segment_b(runs, name, key):
    logits = logits_of(runs[name], G["bert_ids"], token_types=G["bert_token_types"])
    np.testing.assert_allclose(logits[..., :200], G[key], atol=TOL, rtol=0)


def test_bert_pooler_equals_transformers_when_the_checkpoint_has_one(runs):
    config, params, _ = load_run(runs["bert_pretraining"])
    _, state = build_model(config).apply({"params": params}, jnp.asarray(G["bert_ids"]),
                                         token_types=jnp.asarray(G["bert_token_types"]), mutable=["intermediates"])
    np.testing.assert_allclose(state["intermediates"]["pooled"][0], G["bert_pretraining_pooled"], atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- the run directory


def test_an_imported_run_records_its_command_and_config_as_every_run_does(runs, tmp_path):
    """RUN/command.txt and RUN/config.json (docs/training.md), config.json as `magic train`
    writes it: it reads back as the config the checkpoint holds."""
    for run in runs.values():
        with open(os.path.join(run, "config.json")) as f:
            assert config_from_json(json.load(f)) == saved_run_config(run)
        assert Path(run, "command.txt").read_text().count("\n") == 1
    argv = ["/venv/bin/magic", "hf", "import", os.path.join(FIXTURES, "gpt2"), "--workdir", str(tmp_path / "r")]
    run = import_hf(os.path.join(FIXTURES, "gpt2"), str(tmp_path / "r"), argv=argv).path
    assert Path(run, "command.txt").read_text() == \
        f"magic hf import {os.path.join(FIXTURES, 'gpt2')} --workdir {tmp_path / 'r'}\n"
    with open(os.path.join(run, "config.json")) as f:
        config = config_from_json(json.load(f))
    assert config == saved_run_config(run) and config.workdir == run and config.preset == "gpt2"


def test_a_fine_tune_of_an_imported_run_decays_over_its_own_steps(runs):
    """Not over GPT-2's 260B tokens of pre-training (docs/hugging-face.md's fine-tune command)."""
    config = resolve_config(None, [f"init_from={runs['gpt2']}", "batch_size=8", "steps=500",
                                   "optimizer.learning_rate=1e-4"], devices=1, platform="cpu")
    assert (config.warmup_steps, config.decay_steps) == (50, 500)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_export_reproduces_the_checkpoint_bit_for_bit_and_reimports_bit_exactly(runs, name, tmp_path):
    out = export_hf(runs[name], str(tmp_path / "out")).path
    original, exported = tensors(os.path.join(FIXTURES, name)), tensors(out)
    assert exported.keys() == original.keys()
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    again = import_hf(out, str(tmp_path / "again")).path
    first, second = (flat_by_name(jax.device_get(load_run(r)[1])) for r in (runs[name], again))
    assert first.keys() == second.keys()
    for key in first:
        assert np.array_equal(first[key], second[key]), key


@pytest.mark.parametrize("architecture,source", [("GPT2LMHeadModel", "gpt2"), ("GPT2Model", "gpt2"),
                                                 ("BertForMaskedLM", "bert"), ("BertModel", "bert_pretraining")])
def test_export_writes_exactly_the_names_and_shapes_save_pretrained_writes(runs, architecture, source, tmp_path):
    expected = keys()[architecture]
    assert expected["loaded"] == {"missing_keys": [], "unexpected_keys": []}, "what transformers reported loading them"
    out = export_hf(runs[source], str(tmp_path / "out"), architecture=architecture).path
    written = {name: list(info.shape) for name, info in read_checkpoint(out).items()}
    assert written == expected["saved"]


def test_exported_config_is_the_fixture_config_for_every_field_that_shapes_the_model(runs, tmp_path):
    import json

    for name in ("gpt2", "bert"):
        out = export_hf(runs[name], str(tmp_path / name)).path
        with open(os.path.join(FIXTURES, name, "config.json")) as f:
            theirs = json.load(f)
        with open(os.path.join(out, "config.json")) as f:
            ours = json.load(f)
        shaping = [k for k in theirs if k not in ("transformers_version", "use_cache", "classifier_dropout",
                                                  "bos_token_id", "eos_token_id", "pad_token_id") and
                   not k.startswith("summary_")]
        assert {k: ours.get(k) for k in shaping} == {k: theirs[k] for k in shaping}, name
        assert os.path.isfile(os.path.join(out, "tokenizer.json")) and os.path.isfile(
            os.path.join(out, "tokenizer_config.json"))


def test_export_in_bfloat16_and_in_shards(runs, tmp_path):
    import safetensors.numpy

    original = tensors(os.path.join(FIXTURES, "gpt2"))
    out = export_hf(runs["gpt2"], str(tmp_path / "bf16"), dtype="bfloat16").path
    for key, value in tensors(out).items():
        assert value.dtype == ml_dtypes.bfloat16 and np.array_equal(value, original[key].astype(ml_dtypes.bfloat16))
    sharded = export_hf(runs["gpt2"], str(tmp_path / "shards"), max_shard_size="40kB").path
    files = sorted(os.listdir(sharded))
    assert "model.safetensors.index.json" in files and sum(f.startswith("model-0") for f in files) > 2
    merged = {}
    for f in files:  # the reference reader agrees with ours, shard by shard
        if f.startswith("model-0"):
            merged.update(safetensors.numpy.load_file(os.path.join(sharded, f)))
    assert merged.keys() == original.keys() and all(np.array_equal(merged[k], original[k]) for k in merged)


# ----------------------------------------------------------------------------- checkpoint variants


def params_of(run: str) -> dict:
    return flat_by_name(jax.device_get(load_run(run)[1]))


def test_gpt2_variants_without_prefix_with_buffers_tied_copy_fp16_bf16_and_shards(runs, tmp_path):
    reference = params_of(runs["gpt2"])
    source = tensors(os.path.join(FIXTURES, "gpt2"))
    bare = variant("gpt2", str(tmp_path / "bare"), rename=lambda n: n.removeprefix("transformer."), add={
        "h.0.attn.bias": np.tril(np.ones((1, 1, 64, 64), bool)), "h.1.attn.masked_bias": np.float32(-1e4)[None],
        "lm_head.weight": source["transformer.wte.weight"]})  # GPT2Model names, old buffers, the tied copy
    sharded = variant("gpt2", str(tmp_path / "sharded"), max_shard_bytes=30_000)
    for directory in (bare, sharded):
        imported = params_of(import_hf(directory, str(tmp_path / f"run_{os.path.basename(directory)}")).path)
        assert all(np.array_equal(imported[k], reference[k]) for k in reference), directory
    for dtype in (np.float16, ml_dtypes.bfloat16):
        low = variant("gpt2", str(tmp_path / f"d{np.dtype(dtype).name}"), dtype=dtype)
        imported = params_of(import_hf(low, str(tmp_path / f"run_{np.dtype(dtype).name}")).path)
        for key, value in reference.items():  # cast to param_dtype float32, exactly the rounded values
            assert imported[key].dtype == np.float32
            assert np.array_equal(imported[key], value.astype(dtype).astype(np.float32)), key


def test_bert_variants_gamma_beta_decoder_bias_nsp_and_bare_bert_model(runs, tmp_path):
    def legacy(name):
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        return name.replace("cls.predictions.bias", "cls.predictions.decoder.bias")

    old = import_hf(variant("bert_pretraining", str(tmp_path / "tf_era"), rename=legacy), str(tmp_path / "r1"))
    assert any("next-sentence" in n for n in old.notes)
    reference = params_of(runs["bert_pretraining"])
    assert all(np.array_equal(params_of(old.path)[k], v) for k, v in reference.items())

    bare = variant("bert_pretraining", str(tmp_path / "bare"), rename=lambda n: n.removeprefix("bert."),
                   drop={n for n in tensors(os.path.join(FIXTURES, "bert_pretraining")) if n.startswith("cls.")},
                   config={"architectures": ["BertModel"]})
    report = import_hf(bare, str(tmp_path / "r2"))
    assert any("masked-LM head: initialized" in n for n in report.notes)
    imported = params_of(report.path)
    assert all(np.array_equal(imported[k], v) for k, v in reference.items() if not k.startswith("mlm_head/"))
    assert np.all(imported["mlm_head/output_head/bias"] == 0) and np.all(imported["mlm_head/transform_norm/scale"] == 1)


# ----------------------------------------------------------------------------- tokenizers and configs


@pytest.mark.parametrize("name,text_ids", [("gpt2", "gpt2_text_ids"), ("bert", "bert_text_ids")])
def test_tokenizer_from_tokenizer_json_and_from_the_legacy_files_equal_transformers(runs, name, text_ids):
    text = "Errors should never pass silently."
    ours = load_tokenizer(os.path.join(runs[name], "tokenizer.json"))
    want = G[text_ids]  # transformers' ids (BERT's without [CLS]/[SEP]: specials are never part of a text)
    np.testing.assert_array_equal(ours.encode(text), want)
    legacy, _ = find_tokenizer(os.path.join(FIXTURES, name, "legacy"), "gpt2" if name == "gpt2" else "bert")
    assert legacy.encode(text, add_special_tokens=False).ids == want.tolist()


def test_tokenizer_roles_never_emitted_and_extra_ids_inside_the_table(runs):
    gpt2 = load_tokenizer(os.path.join(runs["gpt2"], "tokenizer.json"))
    assert isinstance(gpt2, HFTokenizer) and gpt2.vocab_size == 320
    assert (gpt2.eot_id, gpt2.bos_id, gpt2.pad_id, gpt2.mask_id) == (319, 319, 320, 321)  # no pad/mask in GPT-2
    assert gpt2.padded_vocab_size(1) == 322 and gpt2.padded_vocab_size(128) == 384  # rows for pad and mask too
    assert gpt2.eot_id not in gpt2.encode("a <|endoftext|> b"), "specials' text is text in documents"
    assert gpt2.decode(gpt2.encode("Now is better than never.")) == "Now is better than never."
    assert gpt2.decode([319, 320]) == "<|endoftext|><|pad|>"
    bert = load_tokenizer(os.path.join(runs["bert"], "tokenizer.json"))
    assert (bert.eot_id, bert.pad_id, bert.mask_id) == (2, 0, 4)  # [CLS] starts documents, [PAD], [MASK]
    assert set(bert.special_ids) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "bert-base", "bert-large"])
def test_config_translation_round_trips_every_gpt2_and_bert_preset(preset):
    model = PRESETS[preset].model
    architecture = "GPT2LMHeadModel" if model.family == "decoder" else "BertForMaskedLM"
    back = model_config_from_hf(hf_config_from_model(model, architecture, model.vocab_size, "float32"))
    assert back.model == model.replace(dropout_rate=back.model.dropout_rate, init_std=back.model.init_std)
    assert preset_for(back.model_type, back.model) == preset
