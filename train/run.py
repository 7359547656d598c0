"""A run, composed in one place: config -> state, shardings and the jitted steps.

`resolve_config` is THE config of a run: `magic train` trains it and `magic compile`
compiles it, from the same flags, so an executable serialized by one is loaded by
the other. `train_run` composes the train step both of them run (and
train/aot.py lowers) from that config.

Sharded init follows Flax's lm1b: `jax.eval_shape` -> logical axes -> the rule
table's NamedShardings (sharding/partition.py) -> `jax.jit(init, out_shardings=...)`,
so every array is born in its shards.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import optax
from jax.sharding import NamedSharding

from matrixmagic.configs import ConfigError, ModelConfig, get_preset
from matrixmagic.configs.model_config import untiled_lengths
from matrixmagic.configs.overrides import parse_assignments, values_of, with_values
from matrixmagic.configs.train_config import TrainConfig, recipe_batch, train_config_for
from matrixmagic.model.families import family_of
from matrixmagic.sharding.mesh import axis_sizes, make_mesh
from matrixmagic.sharding.partition import batch_sharding_for, param_shardings, replicated, with_rules, with_shardings
from matrixmagic.sharding.rules import BATCH_AXES, rules_for
from matrixmagic.sharding.validate import validate_mesh

from . import storage
from .checkpoint import load_params, resolve_checkpoint, saved_run_records
from .data.pipeline import open_tokenizer
from .data.tokenizers import round_up
from .guards import skip_nonfinite
from .rundir import default_workdir
from .state import TrainState, create_train_state
from .step import bind_train_step, eval_step

VOCAB_MULTIPLE = 128  # embedding rows padded to a multiple of 128: full MXU / tensor-core tiles


# ----------------------------------------------------------------------------- the config


# The TPU's attention: the splash kernel, which forms no weights to drop out, so the preset's
# attention dropout goes with it. A layer above that chooses either field keeps its own choice.
SPLASH_DEFAULTS = {"model.attention_impl": "splash", "model.attention_dropout_rate": 0.0}


def platform_defaults(platform: str) -> dict[str, Any]:
    """What runs best on `platform`, as typed values the layers above override: bf16 compute on
    TPU and GPU (params, optimizer state, softmax statistics and the loss stay float32),
    float32 on CPU, where bf16 matmuls are slower; on TPU, splash attention (SPLASH_DEFAULTS:
    the [T, T] score matrices never reach HBM). Elsewhere attention stays `matrices`: jax
    0.10's dot_product_attention (`fused`) runs the same XLA computation unless a cuDNN or
    Pallas kernel is asked for."""
    if platform == "cpu":
        return {}
    return {"model.dtype": "bfloat16", **(SPLASH_DEFAULTS if platform == "tpu" else {})}


def _splash_by_default(family: str, seq_len: int, above: Mapping[str, Any]) -> bool:
    """Splash is the TPU default unless the layers above chose the attention (its impl, or a
    dropout the kernel cannot do) or the sequence length is one its blocks do not tile."""
    if "model.attention_impl" in above or above.get("model.attention_dropout_rate"):
        return False
    return not untiled_lengths(family, seq_len)


def infer_layout(sizes: dict[str, int]) -> str:
    """The layout a mesh implies: split weights over every axis that has devices."""
    fsdp, tp = sizes["fsdp"] > 1, sizes["tensor"] > 1
    return "fsdp+tp" if fsdp and tp else "fsdp" if fsdp else "tp" if tp else "dp"


DEFAULT_PRESET = "gpt-tiny"
# Model fields a run chooses for itself instead of inheriting them with the params it starts
# from: the platform's compute dtype, remat, the attention implementation and the scan unroll.
RUN_CHOICES = ("dtype", "remat_policy", "attention_impl", "scan_unroll")


def model_values(model: ModelConfig, skip: Sequence[str] = RUN_CHOICES) -> dict[str, Any]:
    """A ModelConfig as {'model.field': value} (the fields in `skip` left out)."""
    return values_of(model, "model.", skip)


def model_assignments(model: ModelConfig, skip: Sequence[str] = RUN_CHOICES) -> list[str]:
    """`model_values` as 'model.field=value' strings (`magic hf import` passes these)."""
    return [f"{field}={value}" for field, value in model_values(model, skip).items()]


# What a fine-tune of a `magic hf import` run inherits in place of its preset's schedule in tokens.
IMPORTED_SCHEDULE: dict[str, Any] = {"optimizer.warmup_tokens": None, "optimizer.decay_tokens": None}


def inherited_values(path: str) -> tuple[str, dict[str, Any]]:
    """(preset, typed values) a run started with --init-from PATH inherits from that run: its
    model (the params fit no other shapes), its sequence length, and its tokenizer unless that
    lives beside a dataset ('sentencepiece' is then named by its file). A run imported with
    `magic hf import` so fine-tunes with `magic train --init-from RUN --set data.source=DIR`.

    From an imported run the schedule also drops the preset's paper lengths in tokens
    (`IMPORTED_SCHEDULE`): GPT-2's decay over 260B tokens is the pre-training that made the
    checkpoint, and on a fine-tune of a few hundred steps it meant a learning rate that never
    decayed. The fine-tune then warms up over 10% of its steps (at most 100) and decays over its
    `steps`, as a run without a recipe does; explicit optimizer.* flags still win."""
    workdir, _ = resolve_checkpoint(path)
    if not storage.is_dir(storage.join(workdir, "checkpoints")):
        raise ConfigError(f"--init-from {path!r}: no checkpoint found there; give a run directory (its checkpoints/ "
                          f"holds numbered steps) or a step directory like RUN/checkpoints/500.")
    source, record = saved_run_records(workdir)
    tokenizer = source.data.tokenizer
    if tokenizer == "sentencepiece":
        tokenizer = str(run_tokenizer(source).path)
    schedule = IMPORTED_SCHEDULE if record.get("imported_from") else {}
    return source.preset, {**model_values(source.model), "data.seq_len": source.data.seq_len,
                           "data.tokenizer": tokenizer, **schedule}


def _value(config, values: Mapping[str, Any], field: str):
    """A dotted field's value: from `values` where they set it, else `config`'s."""
    if field in values:
        return values[field]
    for name in field.split("."):
        config = getattr(config, name)
    return config


def platform_layer(platform: str, base: TrainConfig, above: Mapping[str, Any], sizes: dict[str, int]) -> dict[str, Any]:
    """The platform's defaults for this run: `platform_defaults`, less the splash pair where the
    layers `above` chose the attention or the run's lengths do not tile (`_splash_by_default`),
    less splash itself under a context split (its attention dropout of 0 stays, so ring attention
    fits), and the layout the mesh implies."""
    defaults = {**platform_defaults(platform), "mesh.layout": infer_layout(sizes)}
    if not _splash_by_default(_value(base, above, "model.family"), _value(base, above, "data.seq_len"), above):
        defaults = {k: v for k, v in defaults.items() if k not in SPLASH_DEFAULTS}
    if sizes.get("context", 1) > 1:  # splash is not split over context (model/context.py): attention as the preset says
        defaults.pop("model.attention_impl", None)
    return defaults


def sized_recipe(base: TrainConfig, above: Mapping[str, Any], sizes: dict[str, int]) -> dict[str, Any]:
    """The preset's paper recipe sized for this run: its batch_tokens as whole sequences of the
    run's data.seq_len, a multiple of data x fsdp x microbatches and of a batch ramp's start rows
    (`recipe_batch`), with the values the layers `above` give those fields."""
    seq_len = _value(base, above, "data.seq_len")
    if seq_len < 2:  # no batch of such sequences: DataConfig's check names data.seq_len
        return {}
    splits = math.prod(sizes[a] for a in BATCH_AXES) * max(1, _value(base, above, "microbatches"))
    return {"batch_size": recipe_batch(get_preset(base.preset).recipe.batch_tokens, seq_len, splits,
                                       _value(base, above, "ramp.start_tokens"), _value(base, above, "ramp.tokens"))}


def layered(preset: TrainConfig, platform: Mapping[str, Any], recipe: Mapping[str, Any],
            flags: Mapping[str, Any]) -> TrainConfig:
    """THE precedence of a run's config, lowest first: preset < platform default < recipe < flag.

    `preset` is the preset's TrainConfig (`train_config_for`); the platform's defaults are what
    the devices imply (compute dtype, attention, the mesh's layout); the recipe is what this run
    derives from the paper's recipe (its batch, sized for the mesh) or inherits (--init-from);
    the flags are the user's. Each layer above the preset maps dotted fields to typed values,
    and a field two layers set takes the higher one's value. The config is built once from all
    four (`with_values`), so its checks see only the final values."""
    return with_values(preset, {**platform, **recipe, **flags})


def resolve_config(preset: Optional[str], flags: Sequence[str] | Mapping[str, Any] = (), *,
                   devices: Optional[int] = None, platform: Optional[str] = None) -> TrainConfig:
    """The TrainConfig of a run on `devices` devices of `platform` ('cpu', 'gpu', 'tpu'; by
    default this process's runtime, as `magic train` sees it).

    `flags` are the run's flags: 'field=value' strings (--set), parsed here once, or the typed
    values `cli/flags.config_assignments` makes of every config flag (--set, --mesh, --layout,
    --remat, ...). Over the preset's TrainConfig (its model, its recipe's optimizer, sequence
    length and batch) come, in the order `layered` states:
      - the platform's defaults: its dtype and attention (`platform_defaults`), and the layout
        the mesh implies;
      - the recipe sized for this run: the paper's batch_tokens as whole sequences, a multiple of
        the data-parallel size times microbatches and of a batch ramp's start rows
        (`recipe_batch`); with an `init_from=RUN` flag, RUN's model, sequence length and
        tokenizer (`inherited_values`), and `preset` None means RUN's preset (else gpt-tiny);
      - the flags, which win.
    Then, without a `workdir` flag, the workdir is `runs/<preset>-<hash of the config>`
    (train/rundir.py). The embedding table follows the tokenizer later
    (`with_tokenizer_vocab`), once its vocabulary is known."""
    devices = jax.device_count() if devices is None else devices
    platform = jax.devices()[0].platform if platform is None else platform
    flags = dict(flags) if isinstance(flags, Mapping) else parse_assignments(TrainConfig, flags)
    inherited: dict[str, Any] = {}
    source = str(flags.get("init_from") or "").strip()
    if source:
        inherited_preset, inherited = inherited_values(source)
        preset = preset or inherited_preset
    preset = preset or DEFAULT_PRESET
    base = train_config_for(preset)
    above = {**inherited, **flags}  # what the layers below give way to
    sizes = axis_sizes(with_values(base.mesh, {k.removeprefix("mesh."): v for k, v in above.items()
                                               if k.startswith("mesh.")}), devices)
    config = layered(base, platform_layer(platform, base, above, sizes),
                     {**inherited, **sized_recipe(base, above, sizes)}, flags)
    if config.model.attention_impl == "splash" and platform != "tpu":
        raise ConfigError(f"model.attention_impl='splash' is invalid on {platform}: splash is a Pallas kernel for "
                          f"TPU. Use model.attention_impl=matrices or fused here (or compile for a TPU from this "
                          f"machine: magic compile --topology v5p-8 ...).")
    if "workdir" not in flags:  # runs/<preset>-<hash>: same flags, same run (train/rundir.py)
        config = dataclasses.replace(config, workdir=default_workdir(config))
    return run_paths(config)


def run_paths(config: TrainConfig) -> TrainConfig:
    """The config's run paths through their one gate (train/storage.py): `~` expanded, a gs://
    URL checked, any other scheme refused naming the field. A relative local path stays as
    written (it is what the run header and the README show)."""
    def gate(value, field):
        if not value or not (storage.is_url(value) or value.startswith("~")):
            return value
        return storage.normalize(value, field)

    data = config.data
    data = dataclasses.replace(data, source=gate(data.source, "data.source"),
                               data_dir=gate(data.data_dir, "data.data_dir"),
                               tokenizer=gate(data.tokenizer, "data.tokenizer"))
    return dataclasses.replace(config, workdir=gate(config.workdir, "workdir"), data=data,
                               init_from=gate(config.init_from, "init_from"))  # the mesh is checked against the model once the table is sized (`sized_for_data`)


def with_tokenizer_vocab(config: TrainConfig, tokenizer) -> TrainConfig:
    """The embedding table fits the tokenizer: the preset's table is kept when the
    tokenizer's ids fit in it (so a preset stays the paper's shape), else it grows to
    the tokenizer's; padded to a multiple of 128 either way, with the ids past the
    tokenizer's vocabulary masked so they are never predicted. A model.vocab_size that is
    not the preset's was asked for (--set, or a run's model under --init-from): one too
    small for the tokenizer is refused, not grown behind the user's back."""
    table = max(round_up(config.model.vocab_size, VOCAB_MULTIPLE), tokenizer.padded_vocab_size(VOCAB_MULTIPLE))
    requested = config.model.vocab_size != train_config_for(config.preset).model.vocab_size
    if requested and config.model.vocab_size < tokenizer.vocab_size:
        default = max(round_up(train_config_for(config.preset).model.vocab_size, VOCAB_MULTIPLE),
                      tokenizer.padded_vocab_size(VOCAB_MULTIPLE))
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is too small for the tokenizer's "
                          f"{tokenizer.vocab_size} ids: use at least {tokenizer.vocab_size} (padded up to a multiple "
                          f"of {VOCAB_MULTIPLE}), or leave it out (the table is then {default} rows).")
    model = config.model.replace(vocab_size=table, num_valid_tokens=tokenizer.vocab_size)
    return dataclasses.replace(config, model=model)


def sized_for_data(config: TrainConfig, tokenizer, devices: int, processes: int = 1) -> TrainConfig:
    """The config with its table sized for the tokenizer, checked against the mesh: the last
    step before anything is read or compiled, the same for `magic train` and `magic compile`."""
    config = with_tokenizer_vocab(config, tokenizer)
    validate_mesh(config, devices, processes)  # model dims vs the mesh's splits, batch vs hosts
    return config


def run_tokenizer(config: TrainConfig):
    """The tokenizer of the run's data (bytes and .model paths need no dataset)."""
    return open_tokenizer(config.data.tokenizer, config.data.source, config.data.data_dir)


def reading_model(model: ModelConfig) -> ModelConfig:
    """The model config a trained run is read with: a run trained with splash attention (TPU)
    runs `fused`, the same attention computed densely, so prompts and texts have any length,
    which the kernel's blocks do not tile."""
    return model.replace(attention_impl="fused") if model.attention_impl == "splash" else model


def load_run(workdir: str):
    """(ModelConfig, params on the host, tokenizer) of a trained run directory (`magic train --workdir`)."""
    params, config = load_params(workdir)
    return reading_model(config.model), jax.device_get(params), run_tokenizer(config)


# ----------------------------------------------------------------------------- the step


def abstract_batch(config: TrainConfig, sharding: Optional[NamedSharding]) -> dict:
    """ShapeDtypeStructs of one global batch, from the family record: what the
    pipeline feeds `magic train` and what `magic compile` lowers."""
    shapes = family_of(config.model).batch_shapes(config.batch_size, config.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


@dataclasses.dataclass
class ShardedRun:
    mesh: Any
    rules: tuple
    state_shardings: Any
    batch_sharding: NamedSharding
    abstract_state: Any  # ShapeDtypeStructs carrying their shardings (for restore / AOT)
    init_state: Callable
    train_step: Callable
    eval_step: Callable

    def put_batch(self, batch: dict) -> dict:
        """Global arrays from this process's rows of the batch (batch_size / process_count of
        them: the pipeline's slice for this host); each device keeps only its own rows."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}


def state_shardings(model_config, tx: optax.GradientTransformation, mesh, rules) -> TrainState:
    """Params by the rule table; the optimizer's moments like their params; counters replicated."""
    params = param_shardings(model_config, mesh, rules)
    abstract = jax.eval_shape(lambda: create_train_state(model_config, tx, jax.random.PRNGKey(0)))
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, params,
                                transform_non_params=lambda _: replicated(mesh))
    # A TrainState whose leaves are shardings (jit's out_shardings), not the arrays its fields are typed as.
    return TrainState(step=replicated(mesh), params=params, opt_state=opt, rng=replicated(mesh))  # type: ignore[arg-type]


def sharded_abstract_state(model_config, tx, shardings) -> TrainState:
    """ShapeDtypeStructs of the whole state with their shardings: no memory allocated."""
    abstract = jax.eval_shape(lambda: create_train_state(model_config, tx, jax.random.PRNGKey(0)))
    return with_shardings(abstract, shardings)


def shard_run(config: TrainConfig, tx, step_fn, eval_fn, devices=None) -> ShardedRun:
    """Mesh, shardings and jitted init/train/eval steps for `config`.

    `devices`: None for jax.devices(); a subset (tests) or TPU topology devices to
    AOT-compile (train/aot.py). Mesh errors are raised here, before compiling.
    """
    devices = jax.devices() if devices is None else list(devices)
    validate_mesh(config, len(devices), jax.process_count())
    mesh = make_mesh(config.mesh, devices)
    rules = rules_for(config.mesh)
    shardings = state_shardings(config.model, tx, mesh, rules)
    batch_sharding = batch_sharding_for(mesh, rules)
    abstract = sharded_abstract_state(config.model, tx, shardings)

    init = jax.jit(partial(create_train_state, config.model, tx), out_shardings=shardings)
    kind = config.mesh.context_attention  # how attention crosses a sequence split (model/context.py)
    train = jax.jit(with_rules(step_fn, mesh, rules, kind), in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, None), donate_argnums=0)
    evaluate = jax.jit(with_rules(partial(eval_fn, config=config), mesh, rules, kind),
                       in_shardings=(shardings.params, batch_sharding))
    return ShardedRun(mesh, rules, shardings, batch_sharding, abstract, init, train, evaluate)


def train_run(config: TrainConfig, devices=None):
    """(tx, ShardedRun) with THE train step: what `magic train` runs and `magic compile`
    AOT-lowers (train/aot.py). One place composes it, so the two can never differ."""
    tx, step_fn = bind_train_step(config)
    return tx, shard_run(config, tx, skip_nonfinite(step_fn), eval_step, devices)  # NaN/Inf steps keep the old state
