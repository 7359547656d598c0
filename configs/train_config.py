"""TrainConfig: everything a run needs besides the model shape, validated up front.

`train_config_for(preset)` starts from a preset (its model and its paper's
optimizer settings scaled to the run) and `apply_overrides` applies
`--set field=value` strings (configs/overrides.py parses them into typed values,
naming a misspelt field's right name, and builds the config from them once).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Literal, Optional, get_args

from .model_config import (
    SPLASH_BLOCK,
    ConfigError,
    ModelConfig,
    fail,
    finite,
    side_lengths,
    suggest,
    untiled_lengths,
)
from .overrides import field_types as _field_types  # noqa: F401 (tests/test_fields.py reads it here)
from .overrides import parse_assignments, with_values
from .pipeline import check_pipeline
from .presets import SCHEDULES, Schedule, get_preset
from .ramp import BatchRamp

# The train state's step counter is int32 (train/state.py): a run of more steps would wrap.
MAX_STEPS = 2**31 - 1
# jax's PRNG keys take 32-bit seeds, and a larger one wraps onto another (2**40 gives seed 0's
# draws): every seed a user gives (--set seed, magic generate --seed) is refused past this.
MAX_SEED = 2**32 - 1
SEED_FIX = f"use an integer in 0..{MAX_SEED} (jax keys take 32-bit seeds: larger ones wrap onto others)."
TOKENIZER_NAMES = ("bytes", "sentencepiece")  # or a path to a sentencepiece .model or a Hugging Face tokenizer.json
Layout = Literal["dp", "fsdp", "tp", "fsdp+tp"]  # how weights split over the mesh (sharding/rules.py)
LAYOUTS = get_args(Layout)
# Mesh axes, outermost first (sharding/mesh.py says why this order); MeshConfig has one field each.
MESH_AXES = ("data", "stage", "fsdp", "context", "tensor")
MESH_FLAG_KEYS = MESH_AXES + ("dcn_data",)  # what --mesh accepts
# How attention sees the keys of other context shards (model/context.py, model/ring_attention.py).
ContextAttention = Literal["all_gather", "ring"]
CONTEXT_ATTENTION: tuple[str, ...] = get_args(ContextAttention)

def parse_mixture(text: str) -> tuple[tuple[str, float], ...]:
    """'code:0.7,prose:0.3' -> (('code', 0.7), ('prose', 0.3)); errors name data.mixture."""
    pairs = []
    for part in text.split(","):
        name, sep, weight = part.strip().rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = None
        if not sep or not name or value is None:
            fail("data.mixture", text, f"write NAME:WEIGHT pairs separated by commas, e.g. code:0.7,prose:0.3 "
                                       f"({part.strip()!r} is not one).")
        if not finite(value) or value < 0:
            fail("data.mixture", text, f"weights must be finite and >= 0 ({name}:{weight} is not).")
        pairs.append((name, value))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        fail("data.mixture", text, "name each source once.")
    if sum(w for _, w in pairs) <= 0:
        fail("data.mixture", text, "the weights sum to 0: give at least one source a positive weight.")
    return tuple(pairs)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # 'stdlib' (the Python standard library's own .py files), a directory of text
    # files, or 'tfds:<catalog name>' (e.g. tfds:lm1b) prepared in data_dir.
    source: str = "stdlib"
    # 'bytes', 'sentencepiece' (train it with `magic data`), or a path to a .model file or to a
    # Hugging Face tokenizer.json (`magic hf import` puts one in the run directory)
    tokenizer: str = "bytes"
    data_dir: Optional[str] = None  # TFDS data dir; None: ~/.cache/matrixmagic/tfds
    seq_len: int = 128  # decoder/encoder length; enc-dec: encoder and decoder each get half
    # 'NAME:WEIGHT,...' over sources prepared with `magic data prepare --name NAME` (in data_dir/prepared):
    # each row is drawn from a source with probability weight / sum (train/data/mixture.py); replaces source.
    mixture: Optional[str] = None

    def __post_init__(self):
        if self.mixture is not None:
            parse_mixture(self.mixture)
            if self.source != "stdlib":
                fail("data.mixture", self.mixture, f"a mixture names its sources itself: drop data.source "
                                                   f"(now {self.source!r}), or drop data.mixture.")
            if self.tokenizer == "sentencepiece":
                fail("data.tokenizer", self.tokenizer, "'sentencepiece' names the model beside data.source's dataset, "
                                                       "and a mixture has none: give the .model path its sources "
                                                       "were prepared with.")
        if self.seq_len <= 1:
            fail("data.seq_len", self.seq_len, "use a sequence length of at least 2.")
        if self.tokenizer not in TOKENIZER_NAMES and not self.tokenizer.endswith((".model", ".json")):
            fail("data.tokenizer", self.tokenizer,
                  f"use {' or '.join(map(repr, TOKENIZER_NAMES))}, a path to a sentencepiece .model file or to a "
                  f"Hugging Face tokenizer.json.")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3  # peak
    schedule: Schedule = "cosine"  # learning-rate schedule: cosine, linear, rsqrt or constant
    warmup_steps: Optional[int] = None  # None: from warmup_tokens, else 10% of the decay, at most 100 steps
    decay_steps: Optional[int] = None  # None: from decay_tokens, else decay over the whole run
    # A paper's schedule in tokens (presets with a paper recipe fill these): converted to steps
    # with the run's tokens per step, rounded. An explicit warmup_steps / decay_steps wins.
    warmup_tokens: Optional[int] = None
    decay_tokens: Optional[int] = None  # the decay in tokens, as warmup_tokens
    final_ratio: float = 0.1  # cosine ends at 10% of peak (GPT-3 Appendix B)
    b1: float = 0.9  # Adam beta1
    b2: float = 0.95  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.1  # AdamW decoupled weight decay on weight matrices and embeddings
    clip_norm: float = 1.0  # gradients clipped to this global norm
    label_smoothing: float = 0.0  # probability mass spread over the vocabulary in the loss

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            fail("optimizer.schedule", self.schedule,
                  f"choose one of {', '.join(SCHEDULES)}.{suggest(self.schedule, SCHEDULES)}")
        if not finite(self.learning_rate) or self.learning_rate <= 0:
            fail("optimizer.learning_rate", self.learning_rate, "use a positive learning rate such as 3e-4.")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            if not finite(value) or not 0 <= value < 1:
                fail(f"optimizer.{name}", value, "use an Adam decay rate in [0, 1), e.g. 0.9 for b1, 0.95 for b2.")
        if not finite(self.eps) or self.eps <= 0:
            fail("optimizer.eps", self.eps, "use a small positive number such as 1e-8.")
        if not finite(self.weight_decay) or self.weight_decay < 0:
            fail("optimizer.weight_decay", self.weight_decay, "use 0 (none) or a positive decay such as 0.1.")
        if not finite(self.clip_norm) or self.clip_norm <= 0:
            fail("optimizer.clip_norm", self.clip_norm, "use a positive global gradient norm such as 1.0.")
        for name in ("warmup_steps", "decay_steps"):
            value = getattr(self, name)
            if value is not None and value > MAX_STEPS:
                fail(f"optimizer.{name}", value, f"use at most {MAX_STEPS:,} steps (the step counter is int32).")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            fail("optimizer.warmup_steps", self.warmup_steps, "use 0 or more steps.")
        if self.warmup_tokens is not None and self.warmup_tokens < 0:
            fail("optimizer.warmup_tokens", self.warmup_tokens, "use 0 or more tokens.")
        if self.decay_tokens is not None and self.decay_tokens <= 0:
            fail("optimizer.decay_tokens", self.decay_tokens, "use a positive number of tokens (or leave it unset).")
        if not 0 <= self.final_ratio <= 1:
            fail("optimizer.final_ratio", self.final_ratio, "use a fraction of the peak in [0, 1].")
        if not 0 <= self.label_smoothing < 1:
            fail("optimizer.label_smoothing", self.label_smoothing, "use a value in [0, 1).")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Device-mesh axis sizes; -1 fills with the remaining devices.
    data: int = -1
    stage: int = 1  # pipeline stages: devices that each hold a contiguous share of the layers
    fsdp: int = 1  # devices that split the batch and every weight matrix
    context: int = 1  # devices that split the sequence (context parallelism)
    tensor: int = 1  # devices that split attention heads and the MLP (Megatron)
    layout: Layout = "dp"  # which weights the axes split: dp, fsdp, tp or fsdp+tp
    # Multi-slice TPU pods: how many slices (joined by the slower DCN) split the data axis.
    dcn_data: int = 1
    # Replace rule-table entries (sharding/rules.py), e.g. "embed=fsdp,mlp=tensor,heads=none".
    rules_override: str = ""
    # Pipeline (mesh.stage > 1; configs/pipeline.py): microbatches each step's (or accumulation
    # microbatch's) rows are cut into as they flow through the stages; 0: one per stage.
    pipeline_microbatches: int = 0
    pipeline_repeats: int = 1  # times each microbatch loops through the stages (circular schedule)
    # With context > 1, how each shard's queries reach the other shards' keys: all_gather (every
    # shard gathers all K/V, Llama 3 section 3.3.2) or ring (K/V blocks passed round, Liu et al. 2023).
    context_attention: ContextAttention = "all_gather"
    # With a tp layout and tensor > 1: the residual stream between the tensor-parallel blocks (norm and
    # dropout inputs, each layer's saved input) split over `tensor` along the sequence, as Megatron's
    # sequence parallelism does (Korthikanti et al. 2022, section 4.2.2): each all-reduce becomes a
    # reduce-scatter + all-gather pair of the same traffic, and those activations take 1/tensor the memory.
    sequence_parallel: bool = True

    def __post_init__(self):
        if self.context_attention not in CONTEXT_ATTENTION:
            fail("mesh.context_attention", self.context_attention,
                 f"choose one of {', '.join(CONTEXT_ATTENTION)}.{suggest(self.context_attention, CONTEXT_ATTENTION)}")


def check_context_split(config, context: int) -> None:
    """What a sequence split over `context` devices needs (its size resolved: sharding/validate.py
    calls this again once a -1 is filled in). The sequence is cut into 2 x context chunks, shard i
    holding chunks i and 2C-1-i (load-balanced causal striping, model/context.py)."""
    if context <= 1:
        return
    model, seq = config.model, config.data.seq_len
    if model.family != "decoder":
        fail("mesh.context", context, f"context parallelism splits the sequence of decoder-only models, and "
                                      f"model.family={model.family!r} (bidirectional or cross attention) is not "
                                      f"supported yet: use mesh.context=1.")
    if model.attention_impl == "splash":
        fail("model.attention_impl", "splash", f"the splash kernel is not split over the context axis "
                                               f"(mesh.context={context}): use model.attention_impl=matrices or "
                                               f"fused, or mesh.context=1.")
    if seq % (2 * context):
        fail("mesh.context", context, f"data.seq_len={seq} must cut into 2 x mesh.context = {2 * context} equal "
                                      f"chunks (each context shard holds one early and one late chunk, so causal "
                                      f"work is balanced): use a data.seq_len that is a multiple of {2 * context}, "
                                      f"or a mesh.context dividing {seq // 2}.")
    if config.mesh.context_attention == "ring" and model.attention_dropout_rate:
        fail("mesh.context_attention", "ring", f"ring attention never forms the attention weights, so it cannot "
                                               f"drop them out (model.attention_dropout_rate="
                                               f"{model.attention_dropout_rate}): set model.attention_dropout_rate=0, "
                                               f"or mesh.context_attention=all_gather.")


@dataclasses.dataclass(frozen=True)
class RampConfig:
    # The batch-size ramp (GPT-3, Brown et al. 2020, Appendix B): the batch grows linearly in
    # tokens from start_tokens (whole sequences) to batch_size over the first `tokens` tokens,
    # in whole multiples of the start (configs/ramp.py). tokens=0: no ramp.
    start_tokens: int = 0
    tokens: int = 0  # tokens over which the ramp reaches the full batch; 0: no ramp

    def __post_init__(self):
        for name in ("start_tokens", "tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(f"ramp.{name}", value, "use a whole number of tokens >= 0 (ramp.tokens=0 turns the ramp off).")


def mesh_assignments(text: str) -> list[str]:
    """`--mesh fsdp=-1,tensor=8` -> ['mesh.data=1', 'mesh.fsdp=-1', 'mesh.tensor=8'] in every
    command: axes not named are 1 (-1 fills); an unknown axis names the allowed ones."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise ConfigError(f"--mesh {item!r} is invalid: write axis=size, e.g. --mesh data=2,fsdp=2,tensor=2.")
        if key not in MESH_FLAG_KEYS:
            raise ConfigError(f"--mesh {item!r}: unknown mesh axis {key!r}; the axes are "
                              f"{', '.join(MESH_FLAG_KEYS)}.{suggest(key, MESH_FLAG_KEYS)}")
        try:  # checked here, so the message names --mesh as typed, not the --set it becomes
            int(value)
        except ValueError:
            raise ConfigError(f"--mesh {item} is invalid: give each axis a size, e.g. --mesh {key}=8 or "
                              f"{key}=-1 (-1 fills the devices left).") from None
        out.append(f"mesh.{key}={value}")
    named = {a.split("=")[0].removeprefix("mesh.") for a in out}
    return [f"mesh.{axis}=1" for axis in MESH_AXES if axis not in named] + out


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    # Evals during training, beyond the held-out loss (train/evals/): at eval steps, into
    # metrics.jsonl and TensorBoard. They read the weights only: changing them resumes the run.
    tasks: str = ""  # lm-eval task names, comma-separated (the `eval` extra), e.g. "hellaswag,piqa"; "" = none
    text: str = ""  # a text file or directory of them: perplexity (nats/token, bits/byte); "" = none
    every: int = 0  # steps between these evals; 0 = every eval_every steps
    limit: int = 0  # documents per task; 0 = all
    num_fewshot: int = -1  # examples before each question; -1 = each task's own
    include_path: str = ""  # a folder of task YAML files of your own
    batch_size: int = 16  # rows per scoring batch

    def __post_init__(self):
        for name in ("every", "limit"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                fail(f"eval.{name}", getattr(self, name), "use 0 (the default) or a positive integer.")
        if self.num_fewshot < -1:
            fail("eval.num_fewshot", self.num_fewshot, "use -1 (each task's own), 0 or more.")
        if self.batch_size < 1:
            fail("eval.batch_size", self.batch_size, "use 1 or more rows, e.g. 16.")
        if self.tasks and not any(t.strip() for t in self.tasks.split(",")):
            fail("eval.tasks", self.tasks, "name lm-eval tasks separated by commas, e.g. hellaswag,piqa.")

    @property
    def active(self) -> bool:
        return bool(self.tasks or self.text)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    preset: str = "gpt-tiny"  # the preset this run started from (set it with --preset)
    model: ModelConfig = dataclasses.field(default_factory=lambda: get_preset("gpt-tiny").model)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    ramp: RampConfig = dataclasses.field(default_factory=RampConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    workdir: str = "runs/default"  # run directory; default runs/<preset>-<hash of the config> (train/rundir.py)
    seed: int = 0  # seeds the init, dropout and the data order
    batch_size: int = 32  # global, in sequences
    microbatches: int = 1  # gradient accumulation steps inside one train step
    # The default run fits minutes on a 2-core CPU (measured: docs/benchmarks.md).
    steps: int = 1300
    eval_every: int = 325  # steps between validation evals
    eval_batches: int = 16  # validation batches per eval; 0: no eval
    log_every: int = 50  # steps between metrics rows (and progress-bar figures)
    checkpoint_every: int = 325  # steps between checkpoints (one is always saved at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept
    # Also keep the checkpoint with the lowest eval loss (steps where an eval and a save coincide).
    keep_best_checkpoint: bool = False
    # Non-finite loss/grad-norm steps are skipped (update not applied); stop after more than this many.
    max_nonfinite_skips: int = 0
    # Start a new run from this run directory's (or step directory's) params: fresh optimizer, step 0.
    init_from: str = ""
    # Peak FLOP/s of one device for MFU. 0: the chip table's bf16 peak on accelerators; on
    # CPU this machine's f32 matmul peak, probed once and cached (train/metrics.py).
    peak_flops: float = 0.0
    sample_tokens: int = 120  # generated after training as a smoke check; 0 = none

    def __post_init__(self):
        for name in ("batch_size", "microbatches", "steps", "eval_every", "log_every", "checkpoint_every",
                     "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                fail(name, value, "use a positive integer.")
        for name in ("steps", "eval_every", "log_every", "checkpoint_every"):
            if getattr(self, name) > MAX_STEPS:
                fail(name, getattr(self, name), f"use at most {MAX_STEPS:,} steps (the step counter is int32).")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            fail("seed", self.seed, SEED_FIX)
        if not finite(self.peak_flops) or self.peak_flops < 0:
            fail("peak_flops", self.peak_flops, "use 0 (measure it) or a device's peak FLOP/s such as 4.59e14.")
        if self.sample_tokens < 0:
            fail("sample_tokens", self.sample_tokens, "use 0 (no sample) or a positive count.")
        if self.max_nonfinite_skips < 0:
            fail("max_nonfinite_skips", self.max_nonfinite_skips, "use 0 (stop at the first) or more.")
        if self.eval_batches < 0:
            fail("eval_batches", self.eval_batches, "use 0 (no eval) or more.")
        if self.batch_size % self.microbatches:
            fail("microbatches", self.microbatches,
                  f"batch_size={self.batch_size} must be divisible by it; pick a divisor of {self.batch_size}.")
        self._check_ramp()
        if self.mesh.stage > 0:  # -1 (fill) is checked once resolved: sharding/validate.py
            check_pipeline(self, self.mesh.stage)
        if self.eval.active and self.model.family == "encoder":
            field = "eval.tasks" if self.eval.tasks else "eval.text"
            fail(field, getattr(self.eval, field.split(".")[1]),
                 f"these evals score decoder-only and encoder-decoder models; a BERT-style encoder gives no "
                 f"left-to-right likelihood: leave {field} empty (the held-out loss is still evaluated).")
        if self.optimizer.schedule in ("cosine", "linear") and self.warmup_steps >= self.decay_steps:
            field, value = (("optimizer.warmup_tokens", self.optimizer.warmup_tokens)
                            if self.optimizer.warmup_steps is None and self.optimizer.warmup_tokens is not None
                            else ("optimizer.warmup_steps", self.optimizer.warmup_steps))
            fail(field, value, f"warmup must end before the decay does: warmup {self.warmup_steps} steps "
                               f"({self.schedule_source('warmup')}), decay {self.decay_steps} steps "
                               f"({self.schedule_source('decay')}); lower the warmup, or raise the decay "
                               f"(optimizer.decay_tokens, optimizer.decay_steps or steps).")
        lengths = side_lengths(self.model.family, self.data.seq_len)
        untiled = untiled_lengths(self.model.family, self.data.seq_len)
        if self.model.attention_impl == "splash" and untiled:
            fail("model.attention_impl", "splash",
                 f"the splash kernel tiles attention in blocks of {SPLASH_BLOCK}, and data.seq_len={self.data.seq_len} "
                 f"gives {', '.join(f'{side} length {n}' for side, n in untiled.items())}: use a data.seq_len that "
                 f"is a multiple of {len(lengths) * SPLASH_BLOCK}, or model.attention_impl=matrices or fused.")
        check_context_split(self, self.mesh.context)
        positions_needed = max(lengths.values())
        if positions_needed > self.model.max_len:
            fail("data.seq_len", self.data.seq_len,
                  f"the model has only {self.model.max_len} positions (model.max_len); "
                  f"lower data.seq_len or raise model.max_len.")

    def _check_ramp(self) -> None:
        """A ramp must come in whole sequences and whole multiples of its start."""
        start, seq = self.ramp.start_tokens, self.data.seq_len
        if not self.ramp.tokens:
            return
        if start == 0 or start % seq:
            fail("ramp.start_tokens", start,
                 f"the ramp starts with whole sequences of data.seq_len={seq} tokens: use a positive multiple of "
                 f"{seq}, e.g. {max(1, start // seq) * seq} (or ramp.tokens=0 for no ramp).")
        rows = start // seq
        if rows > self.batch_size:
            fail("ramp.start_tokens", start,
                 f"the ramp starts larger than the full batch (batch_size={self.batch_size} x data.seq_len={seq} = "
                 f"{self.tokens_per_step:,} tokens): lower ramp.start_tokens or raise batch_size.")
        if self.batch_size % rows:
            fail("batch_size", self.batch_size,
                 f"the ramp grows in whole multiples of its start, ramp.start_tokens={start} = {rows} sequences: "
                 f"use a multiple of {rows} (e.g. {max(rows, self.batch_size // rows * rows)}) or a "
                 f"ramp.start_tokens whose sequences divide {self.batch_size}.")

    @property
    def warmup_steps(self) -> int:
        opt = self.optimizer
        if opt.warmup_steps is not None:
            return opt.warmup_steps
        if opt.warmup_tokens is not None:
            return round(opt.warmup_tokens / self.tokens_per_step)
        return min(100, self.decay_steps // 10)

    @property
    def decay_steps(self) -> int:
        opt = self.optimizer
        if opt.decay_steps:
            return opt.decay_steps
        if opt.decay_tokens is not None:
            return round(opt.decay_tokens / self.tokens_per_step)
        return self.steps

    def schedule_source(self, which: str) -> str:
        """Where the resolved warmup or decay length came from, for the run header and print-config."""
        opt = self.optimizer
        steps, tokens = getattr(opt, f"{which}_steps"), getattr(opt, f"{which}_tokens")
        if (steps is not None) if which == "warmup" else bool(steps):  # as warmup_steps / decay_steps read them
            return (f"optimizer.{which}_steps={steps}, an override of the recipe's optimizer.{which}_tokens={tokens:,}"
                    if tokens is not None else f"optimizer.{which}_steps={steps}")
        if tokens is not None:
            return f"optimizer.{which}_tokens={tokens:,} / {self.tokens_per_step:,} tokens per step, rounded"
        return "10% of the decay, at most 100 steps" if which == "warmup" else f"steps={self.steps}"

    @property
    def tokens_per_step(self) -> int:
        """Tokens of a full batch (during a batch ramp a step has fewer: `batch_ramp`)."""
        return self.batch_size * self.data.seq_len

    @property
    def batch_ramp(self) -> BatchRamp:
        """The batch of every step (configs/ramp.py): one level of batch_size without a ramp."""
        return BatchRamp.build(self.batch_size, self.data.seq_len, self.ramp.start_tokens // self.data.seq_len,
                               self.ramp.tokens)


def config_to_json(config: TrainConfig) -> dict:
    """Plain JSON types (checkpoints and run summaries record the resolved config)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_json(d: dict) -> TrainConfig:
    return TrainConfig(**{**d, "model": ModelConfig(**d["model"]), "data": DataConfig(**d["data"]),
                          "optimizer": OptimizerConfig(**d["optimizer"]), "mesh": MeshConfig(**d["mesh"]),
                          "ramp": RampConfig(**d.get("ramp", {})),  # runs saved before the ramp existed
                          "eval": EvalConfig(**d.get("eval", {}))})


def batch_for_tokens(tokens: int, seq_len: int, multiple: int = 1) -> int:
    """A recipe's batch in tokens as whole sequences, rounded down to a multiple of `multiple`
    (what the mesh and microbatches can split), at least one multiple: GPT-3's 3.2M tokens at
    2048 are 1562 sequences, 1536 on a data x fsdp x microbatches of 256 (the paper's 1536)."""
    return max(multiple, tokens // seq_len // multiple * multiple)


def recipe_batch(tokens: int, seq_len: int, splits: int = 1, ramp_start_tokens: int = 0, ramp_tokens: int = 0) -> int:
    """The batch, in sequences, of a recipe's `tokens` for a run of `seq_len` whose batch splits
    `splits` ways (data x fsdp x microbatches): a multiple of that and, with a batch ramp, of the
    ramp's start rows, so the ramp grows in whole levels of whole microbatches (GPT-3 175B on
    256-way data parallelism keeps the paper's 1536 = 96 x 16). A ramp whose start is not whole
    sequences or exceeds the batch adds nothing here: TrainConfig's check names its field."""
    multiple = max(1, splits)
    if ramp_tokens > 0 and 0 < ramp_start_tokens <= tokens and ramp_start_tokens % seq_len == 0:
        multiple = math.lcm(multiple, ramp_start_tokens // seq_len)
    return batch_for_tokens(tokens, seq_len, multiple)


def train_config_for(preset_name: str, **overrides) -> TrainConfig:
    """Defaults for a preset: its model, and its paper's optimizer, context and batch:
    sequences of the model's max_len, and the paper's batch_tokens in whole sequences
    (the tiny presets' recipe gives the CPU demo's 32 x 128). A paper's recipe also gives
    the schedule in tokens (warmup, decay) and GPT-3's batch ramp; the tiny demo presets
    keep their step-based defaults, so the demo run stays what it was."""
    preset = get_preset(preset_name)
    recipe = preset.recipe
    paper = preset.paper_params is not None  # None: a demo preset, not a paper's recipe
    optimizer = OptimizerConfig(learning_rate=recipe.peak_learning_rate, schedule=recipe.schedule,
                                b1=recipe.adam_b1, b2=recipe.adam_b2, eps=recipe.adam_eps,
                                weight_decay=recipe.weight_decay,
                                warmup_tokens=recipe.warmup_tokens if paper else None,
                                decay_tokens=(recipe.decay_tokens or None) if paper else None)  # rsqrt: no decay
    seq_len = preset.model.max_len
    ramp = RampConfig(recipe.ramp_start_tokens, recipe.ramp_tokens) if paper else RampConfig()
    defaults = dict(data=DataConfig(seq_len=seq_len), ramp=ramp,
                    batch_size=recipe_batch(recipe.batch_tokens, seq_len, 1, ramp.start_tokens, ramp.tokens))
    return TrainConfig(preset=preset_name, model=preset.model, optimizer=optimizer,
                       workdir=os.path.join("runs", preset_name), **{**defaults, **overrides})


def apply_overrides(config: TrainConfig, assignments: list[str]) -> TrainConfig:
    """`config` with 'dotted.field=value' strings applied: parsed once into typed values
    (`parse_assignments`: each names its field and the fix when it is bad), then the nested
    dataclasses are built once (`with_values`), so their checks see the final values and a
    cross-field error names its field too."""
    return with_values(config, parse_assignments(TrainConfig, assignments))
