"""ModelConfig validation: every bad value raises ConfigError naming the field (and a
"Did you mean" for a near-miss name); presets resolve or suggest; configs are frozen."""

import dataclasses
import math

import pytest

from matrixmagic.configs import PRESETS, ConfigError, ModelConfig, PaperRecipe, get_preset

TINY = dict(vocab_size=64, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_len=16)


def make(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def raises_naming(field: str, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        make(**kw)
    message = str(info.value)
    assert message.startswith(f"{field}="), message  # the field comes first, with the bad value
    return message


def test_valid_configs_build():
    cfg = make()
    assert cfg.head_dim == 8
    assert make(num_valid_tokens=64).num_valid_tokens == 64  # == vocab_size is allowed
    assert make(dropout_rate=0.0, attention_dropout_rate=0.999).dropout_rate == 0.0
    for family in ("decoder", "encoder", "encoder_decoder"):
        make(family=family)
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize("field", ["vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_len"])
@pytest.mark.parametrize("value", [0, -3, 2.0, "8", True, None])
def test_sizes_must_be_positive_integers(field, value):
    message = raises_naming(field, **{field: value})
    assert "positive integer" in message


def test_d_model_must_divide_by_heads():
    message = raises_naming("num_heads", d_model=100, num_heads=12)
    assert "d_model=100" in message and "divisible" in message
    # the suggested head count really divides d_model, and its width is d_model / heads
    suggested, width = (int(x) for x in message.split("(e.g. ")[1].split(")")[0].split(" heads of "))
    assert 100 % suggested == 0 and suggested * width == 100
    small = raises_naming("num_heads", d_model=32, num_heads=5)  # d_model < 64: no "0 heads of 64"
    suggested, width = (int(x) for x in small.split("(e.g. ")[1].split(")")[0].split(" heads of "))
    assert suggested > 0 and suggested * width == 32


# ---------------------------------------------------------------- names, with suggestions

@pytest.mark.parametrize("field,typo,meant", [
    ("family", "decodr", "decoder"),
    ("family", "encoder-decoder", "encoder_decoder"),
    ("activation", "gleu", "gelu"),
    ("activation", "gelu-tanh", "gelu_tanh"),
    ("norm_position", "pree", "pre"),
    ("positional", "sinusoid", "sinusoidal"),
    ("remat_policy", "save_dot", "save_dots"),
    ("dtype", "bf16", "bfloat16"),
    ("param_dtype", "float23", "float32"),
])
def test_unknown_names_suggest_the_close_one(field, typo, meant):
    message = raises_naming(field, **{field: typo})
    assert f"Did you mean {meant!r}?" in message
    assert "choose one of" in message


@pytest.mark.parametrize("field,value", [
    ("family", "rnn"), ("activation", "swishy_thing"), ("norm_position", "middle"), ("positional", "rotary"),
    ("remat_policy", "everything"), ("dtype", "int8"), ("param_dtype", "complex64"),
])
def test_unknown_names_without_a_close_match_list_the_choices(field, value):
    message = raises_naming(field, **{field: value})
    assert "choose one of" in message and "Did you mean" not in message


# ---------------------------------------------------------------- rates and scalars

@pytest.mark.parametrize("field", ["dropout_rate", "attention_dropout_rate"])
@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, math.nan, "0.1", None])
def test_dropout_rates_must_be_probabilities(field, value):
    assert "[0, 1)" in raises_naming(field, **{field: value})


@pytest.mark.parametrize("value", [0.0, -1e-5, math.nan, None, "1e-5"])
def test_layer_norm_eps_must_be_positive(value):
    raises_naming("layer_norm_eps", layer_norm_eps=value)


@pytest.mark.parametrize("value", [0.0, -0.02, math.nan, "0.02"])
def test_init_std_must_be_positive(value):
    raises_naming("init_std", init_std=value)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_type_vocab_size_must_be_a_count(value):
    raises_naming("type_vocab_size", type_vocab_size=value)


@pytest.mark.parametrize("value", [0, -1, 65, 10**6, 2.5, True])
def test_num_valid_tokens_must_fit_the_vocabulary(value):
    assert "vocab_size=64" in raises_naming("num_valid_tokens", num_valid_tokens=value)


# ---------------------------------------------------------------- frozen, replace, presets

def test_config_is_frozen_and_replace_revalidates():
    cfg = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("gpt2").model.num_layers = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("gpt2").paper_params = 1
    assert cfg.replace(num_layers=3).num_layers == 3 and cfg.num_layers == 2
    with pytest.raises(ConfigError, match=r"^num_heads=5"):
        cfg.replace(num_heads=5)
    assert hash(cfg) == hash(make())  # usable as a cache key


@pytest.mark.parametrize("typo,meant", [("gpt-2", "gpt2"), ("bert_base", "bert-base"), ("gpt3-175", "gpt3-175b"),
                                        ("transformer-bigg", "transformer-big")])
def test_unknown_preset_suggests_a_close_one(typo, meant):
    with pytest.raises(ConfigError) as info:
        get_preset(typo)
    message = str(info.value)
    assert message.startswith(f"preset={typo!r}")
    assert f"Did you mean {meant!r}?" in message
    assert "gpt2-medium" in message  # and lists the known names


def test_every_preset_is_valid_and_named_after_itself():
    assert len(PRESETS) >= 17
    for name, preset in PRESETS.items():
        assert preset.name == name and get_preset(name) is preset
        assert ModelConfig(**dataclasses.asdict(preset.model)) == preset.model  # round-trips validation


def test_paper_recipe_rejects_an_unknown_schedule():
    with pytest.raises(ConfigError, match=r"^schedule='cosin'"):
        PaperRecipe(batch_tokens=1, peak_learning_rate=1e-3, schedule="cosin", warmup_tokens=0, decay_tokens=1)
