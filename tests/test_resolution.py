"""Config resolution, typed end to end: the user's strings are parsed once into typed values,
every derived value is computed on typed values, and one function (train/run.py `layered`)
states the precedence preset < platform default < recipe < flag. Each layer is shown winning
over the one below on a field both set, through `layered` itself and through resolve_config."""

from __future__ import annotations

import itertools

import pytest

from matrixmagic.configs import ConfigError
from matrixmagic.configs.overrides import parse_assignments, values_of, with_values
from matrixmagic.configs.train_config import TrainConfig, apply_overrides, recipe_batch, train_config_for
from matrixmagic.train import run
from matrixmagic.train.cli.flags import config_assignments
from matrixmagic.train.cli.main import build_parser
from matrixmagic.train.loop import schedule_line
from matrixmagic.train.run import layered, resolve_config
from matrixmagic.train.step import make_learning_rate

# ----------------------------------------------------------------------------- the precedence


LAYERS = ("platform", "recipe", "flags")  # above the preset, lowest first
STEPS = {"platform": 1, "recipe": 2, "flags": 3}  # the preset's is 1300


@pytest.mark.parametrize("set_at", [s for n in range(4) for s in itertools.combinations(LAYERS, n)])
def test_the_highest_layer_that_sets_a_field_wins(set_at):
    """`steps` set at every combination of layers, a different value at each: the config takes the
    highest layer's (the preset's when no layer sets it); a field one layer alone sets passes through."""
    layers = {layer: {"steps": STEPS[layer]} if layer in set_at else {} for layer in LAYERS}
    layers["recipe"]["seed"] = 5
    config = layered(train_config_for("gpt-tiny"), layers["platform"], layers["recipe"], layers["flags"])
    assert config.steps == (STEPS[set_at[-1]] if set_at else 1300)
    assert config.seed == 5


def test_layers_are_built_once_so_checks_see_the_final_values():
    """The recipe's batch of 30 is no multiple of microbatches=4; the flag's 32 is. Built layer by
    layer the intermediate config would be refused; built once, only the final values are checked."""
    config = layered(train_config_for("gpt-tiny"), {}, {"batch_size": 30}, {"batch_size": 32, "microbatches": 4})
    assert (config.batch_size, config.microbatches) == (32, 4)


def test_platform_default_over_the_preset():
    assert train_config_for("gpt-tiny").model.dtype == "float32"
    assert resolve_config("gpt-tiny", devices=1, platform="gpu").model.dtype == "bfloat16"
    gpt2 = resolve_config("gpt2", devices=8, platform="tpu").model  # the preset drops attention weights at 0.1
    assert (gpt2.attention_impl, gpt2.attention_dropout_rate) == ("splash", 0.0)
    assert train_config_for("gpt-tiny").mesh.layout == "dp"
    assert resolve_config("gpt-tiny", ["mesh.data=1", "mesh.fsdp=-1"], devices=4, platform="cpu").mesh.layout == "fsdp"


def test_recipe_over_the_preset():
    """The preset's batch is the paper's tokens on one device; the recipe sized for 256-way data
    parallelism rounds it to a multiple of 256 and of the ramp's 16 start rows."""
    assert train_config_for("gpt3-175b").batch_size == 1552
    assert resolve_config("gpt3-175b", ["mesh.data=256"], devices=256, platform="cpu").batch_size == 1536


@pytest.fixture
def source_runs(monkeypatch):
    """Fake run directories for --init-from: a gpt-tiny variant with attention dropout 0.1, one
    without, and the first as `magic hf import` records it (saved_run_records and the checkpoint
    probe replaced)."""
    trained = apply_overrides(train_config_for("gpt-tiny"), [
        "model.d_model=64", "model.num_heads=4", "model.attention_dropout_rate=0.1", "data.seq_len=64",
        "data.tokenizer=/tmp/tok.model", "model.dtype=float16"])
    runs = {"/runs/a": trained, "/runs/b": apply_overrides(trained, ["model.attention_dropout_rate=0"]),
            "/runs/imported": trained}
    records = {"/runs/imported": {"params_only": True, "imported_from": "/models/gpt2"}}
    monkeypatch.setattr(run, "saved_run_records", lambda workdir: (runs[workdir], records.get(workdir, {})))
    monkeypatch.setattr(run.storage, "is_dir", lambda path: True)
    return runs


def test_recipe_inherited_from_a_run_over_the_preset_and_the_platform(source_runs):
    config = resolve_config(None, ["init_from=/runs/a"], devices=8, platform="tpu")
    model = config.model
    assert (config.preset, model.d_model, model.num_heads, config.data.seq_len) == ("gpt-tiny", 64, 4, 64)
    assert config.data.tokenizer == "/tmp/tok.model"
    # the TPU's splash pair (attention_dropout_rate=0) gives way to the run's dropout of 0.1 ...
    assert (model.attention_impl, model.attention_dropout_rate) == ("matrices", 0.1)
    assert model.dtype == "bfloat16"  # ... the compute dtype is the platform's: not inherited (RUN_CHOICES)
    b = resolve_config(None, ["init_from=/runs/b", "data.seq_len=128"], devices=8, platform="tpu").model
    assert (b.attention_impl, b.attention_dropout_rate) == ("splash", 0.0)  # nothing inherited chose the attention


def test_a_fine_tune_of_an_imported_run_decays_over_its_own_steps(source_runs):
    """The preset's paper schedule in tokens is the pre-training that made the checkpoint: a
    fine-tune of an imported run warms up and decays over its own steps (docs/hugging-face.md)."""
    sets = ["steps=500", "batch_size=8", "optimizer.learning_rate=1e-4"]  # as the docs' fine-tune command
    config = resolve_config(None, ["init_from=/runs/imported", *sets], devices=1, platform="cpu")
    assert (config.warmup_steps, config.decay_steps) == (50, 500)
    assert schedule_line(config).startswith("cosine schedule, peak lr 0.0001: warmup 50 steps (10% of the decay, "
                                            "at most 100 steps), decay 500 steps (steps=500)")
    schedule = make_learning_rate(config)
    peak = config.optimizer.learning_rate
    assert float(schedule(50)) == pytest.approx(peak)
    assert float(schedule(500)) == pytest.approx(peak * config.optimizer.final_ratio)  # decayed within the run
    # without a warmup flag: 10% of the steps, and explicit schedule flags still win
    short = resolve_config(None, ["init_from=/runs/imported", "steps=300", "optimizer.warmup_steps=7"],
                           devices=1, platform="cpu")
    assert (short.warmup_steps, short.decay_steps) == (7, 300)
    pinned = resolve_config(None, ["init_from=/runs/imported", "steps=300", "optimizer.decay_tokens=1000000"],
                            devices=1, platform="cpu")
    assert pinned.decay_steps == round(1_000_000 / pinned.tokens_per_step)
    # a run trained here keeps its preset's schedule in tokens
    trained = resolve_config(None, ["init_from=/runs/a", *sets], devices=1, platform="cpu")
    assert trained.optimizer.decay_tokens == train_config_for("gpt-tiny").optimizer.decay_tokens


def test_flag_over_the_recipe(source_runs):
    assert resolve_config("gpt3-175b", ["mesh.data=256", "batch_size=512"], devices=256,
                          platform="cpu").batch_size == 512
    config = resolve_config(None, ["init_from=/runs/a", "data.seq_len=32", "model.attention_dropout_rate=0"],
                            devices=1, platform="cpu")
    assert (config.data.seq_len, config.model.attention_dropout_rate, config.model.d_model) == (32, 0.0, 64)


def test_flag_over_the_platform_default_and_the_preset():
    config = resolve_config("gpt2", ["model.dtype=float32", "model.attention_impl=fused",
                                     "model.attention_dropout_rate=0", "steps=9", "mesh.layout=tp"],
                            devices=8, platform="tpu")
    model = config.model
    assert (model.dtype, model.attention_impl, model.attention_dropout_rate) == ("float32", "fused", 0.0)
    assert (config.steps, config.mesh.layout) == (9, "tp")


# ----------------------------------------------------------------------------- parsed once, typed


def test_strings_are_parsed_once_into_typed_values():
    values = parse_assignments(TrainConfig, [
        "steps=500", "optimizer.learning_rate=3e-4", "model.tie_embeddings=no", "optimizer.warmup_steps=None",
        "data.data_dir=None", "mesh.layout=fsdp", "seed=x", "seed=3", " batch_size =1_024"])
    assert values == {"steps": 500, "optimizer.learning_rate": 3e-4, "model.tie_embeddings": False,
                      "optimizer.warmup_steps": None, "data.data_dir": None, "mesh.layout": "fsdp", "seed": 3,
                      "batch_size": 1024}  # a field given twice: the last value, the earlier never read
    assert type(values["optimizer.learning_rate"]) is float and type(values["steps"]) is int


@pytest.mark.parametrize("assignment, message", [
    ("steps=1e23", ("--set 'steps=1e23': steps expects int, and '1e23' is not one (invalid literal for int() with "
                   "base 10: '1e23').")),
    ("optimizer.b1=abc", ("--set 'optimizer.b1=abc': optimizer.b1 expects float, and 'abc' is not one (could not "
                         "convert string to float: 'abc').")),
    ("model.tie_embeddings=maybe", ("--set 'model.tie_embeddings=maybe': model.tie_embeddings expects bool, and "
                                   "'maybe' is not one (use true or false).")),
    ("optimizer.warmup_steps=x", ("--set 'optimizer.warmup_steps=x': optimizer.warmup_steps expects Optional[int], "
                                 "and 'x' is not one (invalid literal for int() with base 10: 'x'; or None).")),
    ("model.dtype=bf16", ("--set 'model.dtype=bf16': model.dtype must be one of float32, bfloat16, float16. Did you "
                         "mean 'bfloat16'?")),
    ("stepz=3", ("--set 'stepz=3': there is no field 'stepz'. Did you mean 'steps'? `magic train --help-fields` "
                "lists them all.")),
    ("steps", "--set 'steps' is invalid: write it as field=value, e.g. --set steps=500."),
])
def test_a_bad_string_names_the_field_and_the_fix(assignment, message):
    with pytest.raises(ConfigError) as info:
        resolve_config("gpt-tiny", [assignment], devices=1, platform="cpu")
    assert str(info.value) == message


def test_typed_values_and_strings_resolve_alike():
    strings = resolve_config("gpt3-175b", ["mesh.data=256", "microbatches=6", "model.remat_policy=full"],
                             devices=256, platform="tpu")
    typed = resolve_config("gpt3-175b", {"mesh.data": 256, "microbatches": 6, "model.remat_policy": "full"},
                           devices=256, platform="tpu")
    assert typed == strings and typed.batch_size == 1536


def test_the_cli_flags_become_typed_values_and_a_set_must_agree_with_them():
    args = build_parser().parse_args(["train", "--batch", "4", "--microbatches", "2", "--mesh", "fsdp=-1",
                                      "--set", "mesh.tensor=2", "--set", "batch_size=4", "--layout", "fsdp"])
    assert config_assignments(args) == {"batch_size": 4, "microbatches": 2, "mesh.layout": "fsdp", "mesh.data": 1,
                                        "mesh.stage": 1, "mesh.context": 1, "mesh.tensor": 2, "mesh.fsdp": -1}
    assert config_assignments(build_parser().parse_args(["train"])) == {}
    for argv in (["--batch", "8", "--set", "batch_size=4"], ["--mesh", "fsdp=-1", "--set", "mesh.fsdp=2"]):
        with pytest.raises(ConfigError, match="both set .*: keep one"):  # issue 29: no silent winner
            config_assignments(build_parser().parse_args(["train", *argv]))


def test_a_typed_int_for_a_float_field_is_the_float():
    """The run's hash reads the config's JSON, where 0 and 0.0 differ: a typed 0 must not name a new run."""
    config = with_values(train_config_for("gpt2"), {"model.attention_dropout_rate": 0, "optimizer.eps": 1})
    assert type(config.model.attention_dropout_rate) is float and type(config.optimizer.eps) is float
    with pytest.raises(ConfigError, match="there is no field 'model.d_modle'. Did you mean 'model.d_model'"):
        with_values(train_config_for("gpt2"), {"model.d_modle": 8})


def test_values_of_reads_a_config_back_as_a_layer():
    config = train_config_for("bert-tiny")
    values = values_of(config)
    assert values["model.family"] == "encoder" and values["data.seq_len"] == 128 and values["steps"] == 1300
    assert with_values(train_config_for("gpt-tiny"), values) == config


# ----------------------------------------------------------------------------- derived on typed values


@pytest.mark.parametrize("args, batch", [
    ((3_200_000, 2048, 256, 32768, 12 * 10**9), 1536),  # GPT-3 175B: the paper's 1536 = 96 x 16
    ((3_200_000, 2048, 1, 32768, 12 * 10**9), 1552),  # one device: a multiple of the 16 start rows
    ((3_200_000, 2048, 1, 32768, 0), 1562),  # no ramp: no ramp rounding
    ((3_200_000, 2048, 1, 3000, 12 * 10**9), 1562),  # a start of no whole sequences: TrainConfig names it
    ((4096, 128, 3), 30),  # gpt-tiny with 3 microbatches
    ((4096, 8192, 4), 4),  # at least one of each split
])
def test_the_recipe_batch(args, batch):
    assert recipe_batch(*args) == batch
