"""Hugging Face Llama (and Mistral) checkpoints in and out, against transformers' own output.

The references are golden fixtures written once by transformers (tests/fixtures/hf/llama and
llama3_scaled, made by tests/fixtures/make_hf_fixtures.py's 'llama' part): a tiny random
LlamaForCausalLM with grouped-query attention and an untied head, and one with the Llama 3
rope scaling, multi-query attention, tied embeddings and biases; their logits on fixed ids,
greedy continuations, the tensor names save_pretrained writes. What cannot be expressed
(Qwen2's attention biases, Mistral's sliding window, other rope scalings, ...) is refused
before a weight is read, naming the config.json field. No torch here.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_helpers import FIXTURES, golden, keys, rejected, tensors, variant, with_config

from matrixmagic.configs import PRESETS, ModelConfig
from matrixmagic.model.attention import MASK_VALUE
from matrixmagic.model.build import build_model
from matrixmagic.model.generate import Sampling, generate
from matrixmagic.train.data.tokenizers import HFTokenizer, prompt_start
from matrixmagic.train.hf.api import export_hf, import_hf, preset_for
from matrixmagic.train.hf.config import exportable, hf_config_from_model, model_config_from_hf
from matrixmagic.train.hf.errors import HFError
from matrixmagic.train.hf.tensorfile import read_checkpoint
from matrixmagic.train.hf.tokenizer import find_tokenizer, write_tokenizer
from matrixmagic.train.integrity import flat_by_name
from matrixmagic.train.reading import read_run
from matrixmagic.train.run import load_run

TOL = 1e-4  # float32 logits of two implementations
G = golden()
FIXTURE_NAMES = ("llama", "llama3_scaled")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("imported")
    return {name: import_hf(os.path.join(FIXTURES, name), str(root / name)).path for name in FIXTURE_NAMES}


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict:
    """Each imported fixture exported once (LlamaForCausalLM, float32), for the tests that read it."""
    root = tmp_path_factory.mktemp("exported")
    return {name: export_hf(run, str(root / name)).path for name, run in runs.items()}


@pytest.fixture()
def no_reads(monkeypatch):
    """Fail the test if any tensor's bytes are read: the error must come from headers and configs."""
    def refuse(info):
        raise AssertionError(f"read {info.name} before the error")
    monkeypatch.setattr("matrixmagic.train.hf.checkpoint.read", refuse)


def logits_of(run: str, ids) -> np.ndarray:
    config, params, _ = load_run(run)
    return np.asarray(build_model(config).apply({"params": params}, jnp.asarray(ids)))


def params_of(run: str) -> dict:
    return flat_by_name(jax.device_get(load_run(run)[1]))


# ----------------------------------------------------------------------------- against transformers


def test_the_translated_configs_have_llamas_options(runs):
    gqa, scaled = (load_run(runs[n])[0] for n in FIXTURE_NAMES)
    for model in (gqa, scaled):
        assert (model.family, model.positional, model.norm, model.activation, model.norm_position) == (
            "decoder", "rope", "rmsnorm", "swiglu", "pre")
        assert (model.d_model, model.num_heads, model.num_layers, model.d_ff, model.layer_norm_eps) == (
            32, 4, 2, 88, 1e-5)
        assert model.vocab_size == 384 and model.num_valid_tokens == 320
    assert (gqa.num_kv_heads, gqa.rope_theta, gqa.rope_scaling, gqa.tie_embeddings, gqa.use_bias, gqa.max_len) == (
        2, 50000.0, "none", False, False, 128)
    assert (scaled.num_kv_heads, scaled.rope_theta, scaled.tie_embeddings, scaled.use_bias, scaled.max_len) == (
        1, 20000.0, True, True, 512)
    assert (scaled.rope_scaling, scaled.rope_scaling_factor, scaled.rope_low_freq_factor, scaled.rope_high_freq_factor,
            scaled.rope_original_max_len) == ("llama3", 8.0, 1.0, 4.0, 128)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_logits_equal_transformers_and_table_padding_is_masked(runs, name):
    logits = logits_of(runs[name], G[f"{name}_ids"])
    want = G[f"{name}_logits"]
    np.testing.assert_allclose(logits[..., :want.shape[-1]], want, atol=TOL, rtol=0)
    assert np.all(logits[..., want.shape[-1]:] == MASK_VALUE), "padding rows are never predicted"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_greedy_generation_equals_transformers(runs, name):
    config, params, _ = load_run(runs[name])
    want = G[f"{name}_greedy_tokens"][0]
    out = generate(build_model(config), params, [G[f"{name}_greedy_prompt"][0].tolist()], max_new_tokens=len(want),
                   eot_id=-1, sampling=Sampling(temperature=0.0), rng=jax.random.key(0))
    np.testing.assert_array_equal(out.tokens[0], want)


def test_magic_generate_starts_a_prompt_with_begin_of_text_as_transformers_does(runs):
    _, tokenizer = read_run(runs["llama"])  # what `magic generate --workdir RUN` reads
    text = "Errors should never pass silently."
    ids = [*prompt_start(tokenizer), *tokenizer.encode(text).tolist()]
    assert ids == G["llama_text_ids"].tolist(), "transformers' tokenizer(text): <|begin_of_text|> then the text"
    assert (tokenizer.bos_id, tokenizer.eot_id) == (318, 319)  # <|begin_of_text|>, <|end_of_text|>
    assert tokenizer.pad_id >= 320 and tokenizer.mask_id >= 320, "no pad or mask in Llama 3: rows past the vocabulary"
    assert tokenizer.decode(tokenizer.encode(text)) == text


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_export_reproduces_the_checkpoint_bit_for_bit_and_reimports_bit_exactly(runs, exports, name, tmp_path):
    out = exports[name]
    original, exported = tensors(os.path.join(FIXTURES, name)), tensors(out)
    assert exported.keys() == original.keys()
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    first, second = params_of(runs[name]), params_of(import_hf(out, str(tmp_path / "again")).path)
    assert first.keys() == second.keys()
    for key in first:
        assert np.array_equal(first[key], second[key]), key


@pytest.mark.parametrize("entry,source,architecture", [
    ("LlamaForCausalLM", "llama", None), ("LlamaModel", "llama", "LlamaModel"),
    ("llama3_scaled/LlamaForCausalLM", "llama3_scaled", None)])  # tied: no lm_head.weight; biases
def test_export_writes_exactly_the_names_and_shapes_save_pretrained_writes(runs, exports, entry, source,
                                                                           architecture, tmp_path):
    expected = keys()[entry]
    assert expected["loaded"] == {"missing_keys": [], "unexpected_keys": []}, "what transformers reported loading them"
    out = export_hf(runs[source], str(tmp_path / "out"), architecture=architecture).path if architecture else \
        exports[source]
    written = {name: list(info.shape) for name, info in read_checkpoint(out).items()}
    assert written == expected["saved"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_exported_config_json_is_the_fixtures_and_translates_back_to_the_same_model(runs, exports, name):
    out = exports[name]
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        theirs = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        ours = json.load(f)
    fields = [k for k in theirs if k not in ("transformers_version", "use_cache")]
    assert {k: ours.get(k) for k in fields} == {k: theirs[k] for k in fields}
    # transformers 4.x's spelling beside 5's: rope_theta and rope_scaling (null without scaling)
    assert ours["rope_theta"] == theirs["rope_parameters"]["rope_theta"]
    assert ours["rope_scaling"] == ({k: v for k, v in theirs["rope_parameters"].items() if k != "rope_theta"}
                                    if name == "llama3_scaled" else None)
    imported = load_run(runs[name])[0]
    back = model_config_from_hf(ours).model
    assert back == imported.replace(vocab_size=back.vocab_size, num_valid_tokens=None)
    assert model_config_from_hf({**ours, "rope_parameters": None}).model == back, "4.x's fields alone say the same"
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<|begin_of_text|>", "<|end_of_text|>")


@pytest.mark.parametrize("preset", ["llama-tiny", "llama2-7b", "llama2-70b", "llama3-8b", "llama3-405b"])
def test_config_translation_round_trips_every_llama_preset(preset):
    model = PRESETS[preset].model
    back = model_config_from_hf(hf_config_from_model(model, "LlamaForCausalLM", model.vocab_size, "float32"))
    assert back.model == model.replace(init_std=back.model.init_std, scan_unroll=1)  # unroll: the run's choice
    assert back.model_type == "llama" and preset_for(back.model_type, back.model) == preset


def test_a_decoder_with_some_of_llamas_options_names_the_field_the_export_needs():
    llama = PRESETS["llama-tiny"].model
    for field, value in (("norm", "layernorm"), ("activation", "gelu"), ("positional", "learned")):
        with pytest.raises(HFError, match=f"model.{field}='{value}': llama needs"):
            exportable(llama.replace(**{field: value}))
    with pytest.raises(HFError, match="model.num_kv_heads=2: gpt2 needs 4"):
        exportable(ModelConfig(d_model=32, num_heads=4, num_kv_heads=2))
    with pytest.raises(HFError, match="'GPT2LMHeadModel': a llama run exports as LlamaForCausalLM or LlamaModel or "
                                      "MistralForCausalLM or MistralModel"):
        hf_config_from_model(llama, "GPT2LMHeadModel", 320, "float32")
    with pytest.raises(HFError, match="model.use_bias=True: mistral has no biases"):
        hf_config_from_model(llama.replace(use_bias=True), "MistralForCausalLM", 320, "float32")


# ----------------------------------------------------------------------------- Mistral, and what is refused


def mistral_config(**changes) -> dict:
    with open(os.path.join(FIXTURES, "refusals", "mistral", "config.json")) as f:
        return {**json.load(f), **changes}


def test_mistral_without_a_sliding_window_is_llama_in_and_out(tmp_path):
    source = with_config(tmp_path, "llama", **mistral_config(sliding_window=None))
    report = import_hf(source, str(tmp_path / "run"))
    assert (report.model_type, report.architecture) == ("mistral", "MistralForCausalLM")
    np.testing.assert_allclose(logits_of(report.path, G["llama_ids"])[..., :320], G["llama_logits"], atol=TOL, rtol=0)
    out = export_hf(report.path, str(tmp_path / "out"), architecture="MistralForCausalLM").path
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["model_type"], config["sliding_window"]) == ("mistral", None) and "attention_bias" not in config
    assert tensors(out).keys() == tensors(os.path.join(FIXTURES, "llama")).keys()


@pytest.mark.parametrize("changes,match", [
    (mistral_config(), r"mistral with sliding_window=32 cannot be expressed.*set max_position_embeddings to 32"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e4}}, r"rope_parameters\.rope_type='yarn'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling\.rope_type='linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e4}},
     r"rope_parameters of rope_type llama3 has no 'low_freq_factor'"),
    ({"head_dim": 16}, r"llama with head_dim=16 cannot be expressed.*32 / 4 = 8"),
    ({"mlp_bias": True}, r"llama with mlp_bias=True cannot be expressed.*attention_bias=False"),
    ({"hidden_act": "gelu"}, r"llama with hidden_act='gelu'.*SwiGLU"),
    ({"num_key_value_heads": 3}, r"num_kv_heads=3 is invalid"),
])
def test_a_llama_config_we_cannot_express_is_refused_naming_the_field(tmp_path, no_reads, changes, match):
    message = rejected(with_config(tmp_path, "llama", **changes), tmp_path, match)
    assert message.startswith("config.json:")


def test_qwen2_is_refused_for_its_attention_biases(tmp_path, no_reads):
    with open(os.path.join(FIXTURES, "refusals", "qwen2", "config.json")) as f:
        qwen2 = json.load(f)
    source = variant("llama", str(tmp_path / "src"), config=qwen2)
    rejected(source, tmp_path, r"qwen2 \(Qwen2ForCausalLM\).*attention biases are q_proj, k_proj and v_proj with no "
                               r"o_proj bias.*model\.use_bias")


def test_a_llama_tokenizer_json_without_tokenizer_config_takes_its_roles_from_the_vocabulary(tmp_path):
    shutil.copy(os.path.join(FIXTURES, "llama", "tokenizer.json"), tmp_path)  # and no tokenizer_config.json
    tok, config = find_tokenizer(str(tmp_path), "llama")
    assert (config["bos_token"], config["eos_token"]) == ("<|begin_of_text|>", "<|end_of_text|>")
    tokenizer = HFTokenizer(write_tokenizer(tok, config, str(tmp_path / "run"), 128)).as_imported()
    assert (tokenizer.bos_id, tokenizer.eot_id, tuple(prompt_start(tokenizer))) == (318, 319, (318,))
