"""Named presets: published architectures with their papers' training settings.

Sources (cited per preset below):
  GPT-3: Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1
         (shapes, batch, learning rate), Table D.1 (parameter counts), Appendix B
         (AdamW, cosine decay to 10% over 260B tokens, 375M-token linear warmup, and the
         batch ramp: linear from 32k tokens to the full batch over the first 4-12B tokens).
  GPT-2: Radford et al. 2019, Table 2 (shapes), Section 2.3 (1024 context, batch 512).
  BERT:  Devlin et al. 2019, Section 3 (shapes), Appendix A.2 (batch 256 x 512,
         lr 1e-4, 10k warmup, linear decay, 1M steps).
  Transformer: Vaswani et al. 2017, Table 3 (base/big shapes and 65M/213M params),
         Section 5.3 (eq. 3 schedule, warmup 4000), Section 5.1 (~25k+25k tokens a batch).
  Llama 2: Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models",
         Table 1 (context 4k, GQA for 70B, lr, 2T tokens), Section 2.2 (AdamW 0.9/0.95,
         eps 1e-5, cosine to 10%, 2000 warmup steps, wd 0.1, 4M-token batches); shapes and
         exact parameter counts from the released checkpoints' config.json / model cards.
  Llama 3: Llama Team 2024, "The Llama 3 Herd of Models", Table 3 (layers, widths, FFN,
         heads, 8 KV heads, vocabulary 128k, RoPE base 500,000, lr) and Section 3.4.1
         (405B: 4M-token batches at 4k, warmup 8000 steps, cosine); Llama 3.1's rope
         scaling (factor 8, low 1, high 4, original 8192) from its released config.json.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional, TypedDict, get_args

from .model_config import ConfigError, ModelConfig, suggest

Schedule = Literal["cosine", "linear", "rsqrt", "constant"]
SCHEDULES = get_args(Schedule)


@dataclasses.dataclass(frozen=True)
class PaperRecipe:
    """How the paper trained this model: the training issue turns it into optax."""

    batch_tokens: int
    peak_learning_rate: float
    schedule: Schedule
    warmup_tokens: int
    decay_tokens: int  # tokens over which the schedule decays (cosine: to 10% of peak)
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    # Batch-size ramp (GPT-3 only): the batch grows linearly from ramp_start_tokens to
    # batch_tokens over the first ramp_tokens tokens; 0 = no ramp.
    ramp_start_tokens: int = 0
    ramp_tokens: int = 0
    source: str = ""

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is invalid: choose one of {', '.join(SCHEDULES)}.")


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    recipe: PaperRecipe
    paper_params: Optional[int]  # the paper's parameter count, None for tiny demo presets
    source: str


_GPT3_SOURCE = "Brown et al. 2020, Table 2.1 (shape), Table D.1 (params)"


# GPT-3 Appendix B: "we also gradually increase the batch size linearly from a small value
# (32k tokens) to the full value over the first 4-12 billion tokens of training, depending on
# the model size". 32k = 16 sequences of 2048. The paper gives only the range, not each model's
# length; OUR rule interpolates linearly in log(parameters) from 4B tokens at the smallest model
# (125M, Table D.1) to 12B at the largest (174.6B), rounded to 0.1B tokens.
GPT3_RAMP_START_TOKENS = 16 * 2048
_GPT3_RAMP_RANGE = ((125_000_000, 4_000_000_000), (174_600_000_000, 12_000_000_000))


def gpt3_ramp_tokens(params: int) -> int:
    """Tokens over which the batch ramps up for a GPT-3 model of `params` (Table D.1): our
    log-linear reading of Appendix B's "4-12 billion tokens ... depending on the model size"."""
    (p0, t0), (p1, t1) = _GPT3_RAMP_RANGE
    fraction = min(1.0, max(0.0, math.log(params / p0) / math.log(p1 / p0)))
    return round((t0 + fraction * (t1 - t0)) / 1e8) * 100_000_000


def _gpt3_recipe(batch_tokens: int, lr: float, params: int) -> PaperRecipe:
    # GPT-3 Appendix B: warmup over the first 375M tokens, cosine decay to 10% over 260B tokens.
    return PaperRecipe(
        batch_tokens=batch_tokens,
        peak_learning_rate=lr,
        schedule="cosine",
        warmup_tokens=375_000_000,
        decay_tokens=260_000_000_000,
        ramp_start_tokens=GPT3_RAMP_START_TOKENS,
        ramp_tokens=gpt3_ramp_tokens(params),
        source="GPT-3 Table 2.1 (batch, lr); Appendix B (Adam 0.9/0.95, eps 1e-8, wd 0.1, schedule, batch ramp)",
    )


def _gpt3(layers: int, d_model: int, heads: int) -> ModelConfig:
    return ModelConfig(
        family="decoder",
        vocab_size=50257,
        d_model=d_model,
        num_heads=heads,
        num_layers=layers,
        d_ff=4 * d_model,
        max_len=2048,
        activation="gelu_tanh",
        norm_position="pre",
        positional="learned",
        tie_embeddings=True,
        layer_norm_eps=1e-5,
    )


# (name, layers, d_model, heads, batch in millions of tokens, lr, Table D.1 params)
_GPT3_TABLE = [
    ("gpt3-small", 12, 768, 12, 0.5, 6.0e-4, 125_000_000),
    ("gpt3-medium", 24, 1024, 16, 0.5, 3.0e-4, 356_000_000),
    ("gpt3-large", 24, 1536, 16, 0.5, 2.5e-4, 760_000_000),
    # Table 2.1 prints 24 heads of 128 for XL, which is 3072, not d_model 2048.
    # We keep the 128-wide heads used by every larger model: 16 heads x 128 = 2048.
    ("gpt3-xl", 24, 2048, 16, 1.0, 2.0e-4, 1_320_000_000),
    ("gpt3-2.7b", 32, 2560, 32, 1.0, 1.6e-4, 2_650_000_000),
    ("gpt3-6.7b", 32, 4096, 32, 2.0, 1.2e-4, 6_660_000_000),
    # Table 2.1 prints d_model 5140; 40 heads x 128 = 5120, and only 5120 gives
    # Table D.1's 12,850M parameters.
    ("gpt3-13b", 40, 5120, 40, 2.0, 1.0e-4, 12_850_000_000),
    ("gpt3-175b", 96, 12288, 96, 3.2, 0.6e-4, 174_600_000_000),
]


def _gpt2(layers: int, d_model: int, heads: int) -> ModelConfig:
    return ModelConfig(
        family="decoder",
        vocab_size=50257,
        d_model=d_model,
        num_heads=heads,
        num_layers=layers,
        d_ff=4 * d_model,
        max_len=1024,
        activation="gelu_tanh",
        norm_position="pre",
        positional="learned",
        tie_embeddings=True,
    )


# GPT-2 paper Section 2.3: batch 512 x 1024 tokens. It does not publish the learning
# rate; we use GPT-3 Table 2.1's rate for the matching size.
def _gpt2_recipe(lr: float) -> PaperRecipe:
    return PaperRecipe(
        batch_tokens=512 * 1024,
        peak_learning_rate=lr,
        schedule="cosine",
        warmup_tokens=375_000_000,
        decay_tokens=260_000_000_000,
        source="GPT-2 Section 2.3 (batch); lr from GPT-3 Table 2.1 (GPT-2 publishes none)",
    )


def _bert(layers: int, d_model: int, heads: int) -> ModelConfig:
    return ModelConfig(
        family="encoder",
        vocab_size=30522,
        d_model=d_model,
        num_heads=heads,
        num_layers=layers,
        d_ff=4 * d_model,
        max_len=512,
        activation="gelu",
        norm_position="post",
        positional="learned",
        tie_embeddings=True,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
    )


# BERT Appendix A.2: 256 sequences x 512 tokens, Adam lr 1e-4, b2 0.999, wd 0.01,
# 10k warmup steps then linear decay over 1M steps.
_BERT_RECIPE = PaperRecipe(
    batch_tokens=256 * 512,
    peak_learning_rate=1e-4,
    schedule="linear",
    warmup_tokens=10_000 * 256 * 512,
    decay_tokens=1_000_000 * 256 * 512,
    adam_b2=0.999,
    adam_eps=1e-6,
    weight_decay=0.01,
    source="BERT Appendix A.2",
)


# Vaswani et al. 2017 use a 37000-token shared BPE vocabulary for EN-DE (Section 5.1).
TRANSFORMER_VOCAB = 37000


def _transformer(d_model: int, heads: int, d_ff: int, dropout: float) -> ModelConfig:
    return ModelConfig(
        family="encoder_decoder",
        vocab_size=TRANSFORMER_VOCAB,
        d_model=d_model,
        num_heads=heads,
        num_layers=6,
        d_ff=d_ff,
        max_len=1024,
        activation="relu",
        norm_position="post",
        positional="sinusoidal",
        tie_embeddings=True,
        scale_embeddings=True,
        layer_norm_eps=1e-6,
        dropout_rate=dropout,
        attention_dropout_rate=0.0,  # the paper drops sublayer outputs and embedding sums
    )


def _transformer_recipe(d_model: int) -> PaperRecipe:
    # Section 5.3, eq. 3: lr = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), warmup 4000;
    # Adam b1 0.9, b2 0.98, eps 1e-9; ~25k source + 25k target tokens a batch (Section 5.1).
    return PaperRecipe(
        batch_tokens=50_000,
        peak_learning_rate=d_model**-0.5 * 4000**-0.5,
        schedule="rsqrt",
        warmup_tokens=4000 * 50_000,
        decay_tokens=0,
        adam_b1=0.9,
        adam_b2=0.98,
        adam_eps=1e-9,
        weight_decay=0.0,
        source="Vaswani 2017 Sections 5.1, 5.3 (eq. 3)",
    )


# Sized for a default run of minutes on a 2-core CPU (measured: docs/benchmarks.md):
# at this budget a 0.8M-parameter model fed ~5M tokens beats a 3M one fed 2.5M
# (Chinchilla's compute-optimal trade, Hoffmann et al. 2022, Table 3, at toy scale).
# Peak lr 4e-3..8e-3 tied at 700 steps; 2e-3 was 0.13 nats worse.
_TINY_RECIPE = PaperRecipe(
    batch_tokens=32 * 128,
    peak_learning_rate=5e-3,
    schedule="cosine",
    warmup_tokens=100 * 32 * 128,
    decay_tokens=1300 * 32 * 128,
    source="matrixmagic demo settings (not from a paper)",
)


class _TinyShape(TypedDict):
    """The ModelConfig fields the tiny presets share (a TypedDict so `**tiny` keeps each field's type)."""

    vocab_size: int
    d_model: int
    num_heads: int
    num_layers: int
    d_ff: int
    max_len: int
    dropout_rate: float
    attention_dropout_rate: float
    scan_unroll: int


def _llama(layers: int, d_model: int, heads: int, kv_heads: int, d_ff: int, vocab: int, max_len: int,
           theta: float, scaled: bool = False) -> ModelConfig:
    """Llama's decoder: RoPE, RMSNorm (eps 1e-5), SwiGLU, grouped-query attention, no biases,
    untied output layer, no dropout."""
    return ModelConfig(
        family="decoder", vocab_size=vocab, d_model=d_model, num_heads=heads, num_kv_heads=kv_heads,
        num_layers=layers, d_ff=d_ff, max_len=max_len, activation="swiglu", norm_position="pre", norm="rmsnorm",
        positional="rope", rope_theta=theta, rope_scaling="llama3" if scaled else "none", tie_embeddings=False,
        use_bias=False, layer_norm_eps=1e-5, dropout_rate=0.0, attention_dropout_rate=0.0)


def _llama_recipe(batch_tokens: int, lr: float, warmup_steps: int, decay_tokens: int, source: str) -> PaperRecipe:
    # Llama 2 Section 2.2 and Llama 3 Section 3.4.1: AdamW 0.9/0.95, wd 0.1, cosine decay to 10% of peak
    # (Llama 2 states eps 1e-5).
    return PaperRecipe(batch_tokens=batch_tokens, peak_learning_rate=lr, schedule="cosine",
                       warmup_tokens=warmup_steps * batch_tokens, decay_tokens=decay_tokens, adam_eps=1e-5,
                       source=source)


# (name, layers, d_model, heads, kv heads, d_ff, vocab, context, rope theta, llama3 scaling, lr, params)
# Parameter counts: the released checkpoints' (Hugging Face model cards / safetensors index totals).
_LLAMA_TABLE = [
    ("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 4096, 1e4, False, 3.0e-4, 6_738_415_616),
    ("llama2-13b", 40, 5120, 40, 40, 13824, 32000, 4096, 1e4, False, 3.0e-4, 13_015_864_320),
    ("llama2-70b", 80, 8192, 64, 8, 28672, 32000, 4096, 1e4, False, 1.5e-4, 68_976_648_192),
    ("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, 5e5, False, 3.0e-4, 8_030_261_248),
    ("llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192, 5e5, False, 1.5e-4, 70_553_706_496),
    # 405B exists only as Llama 3.1, whose released config scales RoPE for 128k contexts.
    ("llama3-405b", 126, 16384, 128, 8, 53248, 128256, 8192, 5e5, True, 8.0e-5, 405_853_388_800),
]


def _build() -> dict[str, Preset]:
    presets: dict[str, Preset] = {}

    def add(name, model, recipe, paper_params, source):
        presets[name] = Preset(name, model, recipe, paper_params, source)

    for name, layers, d, heads, batch_m, lr, params in _GPT3_TABLE:
        add(name, _gpt3(layers, d, heads), _gpt3_recipe(int(batch_m * 1e6), lr, params), params, _GPT3_SOURCE)
    # GPT-2 counts as the Hugging Face reference counts them (tied head, no output bias).
    for name, layers, d, heads, params, lr in (
        ("gpt2", 12, 768, 12, 124_439_808, 6.0e-4),
        ("gpt2-medium", 24, 1024, 16, 354_823_168, 3.0e-4),
        ("gpt2-large", 36, 1280, 20, 774_030_080, 2.5e-4),
        ("gpt2-xl", 48, 1600, 25, 1_557_611_200, 2.0e-4),
    ):
        add(name, _gpt2(layers, d, heads), _gpt2_recipe(lr), params, "Radford et al. 2019, Table 2")
    # BERT counts include the pooler and exclude the MLM head (as Hugging Face BertModel).
    add("bert-base", _bert(12, 768, 12), _BERT_RECIPE, 109_482_240, "Devlin et al. 2019, Section 3")
    add("bert-large", _bert(24, 1024, 16), _BERT_RECIPE, 335_141_888, "Devlin et al. 2019, Section 3")
    add("transformer-base", _transformer(512, 8, 2048, 0.1), _transformer_recipe(512), 65_000_000,
        "Vaswani et al. 2017, Table 3")
    add("transformer-big", _transformer(1024, 16, 4096, 0.3), _transformer_recipe(1024), 213_000_000,
        "Vaswani et al. 2017, Table 3")

    # Tiny presets for tests and the CPU demo. vocab 384 = 256 bytes + specials, padded to 128.
    # Fully unrolled scans: ~15% faster on CPU for 2-4 layers, same stacked weights.
    # 2 heads of 64 rather than 4 of 32: 1.416 vs 1.434 nats/byte after 1,400 default steps, 8% faster.
    tiny = _TinyShape(vocab_size=384, d_model=128, num_heads=2, num_layers=4, d_ff=512, max_len=128,
                      dropout_rate=0.0, attention_dropout_rate=0.0, scan_unroll=4)
    tiny_2_layers: _TinyShape = {**tiny, "num_layers": 2, "scan_unroll": 2}
    add("gpt-tiny", ModelConfig(family="decoder", activation="gelu_tanh", norm_position="pre",
                                positional="learned", **tiny), _TINY_RECIPE, None, "demo")
    add("bert-tiny", ModelConfig(family="encoder", activation="gelu", norm_position="post",
                                 positional="learned", type_vocab_size=2, layer_norm_eps=1e-12, **tiny),
        _TINY_RECIPE, None, "demo")
    add("transformer-tiny", ModelConfig(family="encoder_decoder", activation="relu", norm_position="post",
                                        positional="sinusoidal", scale_embeddings=True,
                                        **tiny_2_layers),
        _TINY_RECIPE, None, "demo")
    for name, layers, d, heads, kv, d_ff, vocab, context, theta, scaled, lr, params in _LLAMA_TABLE:
        llama2 = name.startswith("llama2")
        recipe = (_llama_recipe(4 * 2**20, lr, 2000, 2 * 10**12, "Llama 2 Table 1, Section 2.2") if llama2 else
                  _llama_recipe(4 * 2**20, lr, 8000, 15 * 10**12, "Llama 3 Table 3, Section 3.4.1"))
        add(name, _llama(layers, d, heads, kv, d_ff, vocab, context, theta, scaled), recipe, params,
            "Touvron et al. 2023 (Llama 2), Table 1" if llama2 else "Llama Team 2024 (Llama 3), Table 3")
    tiny_llama: _TinyShape = {**tiny, "d_ff": 368}
    # The Llama options at gpt-tiny's size: 2 query heads sharing 1 key/value head (multi-query), an
    # untied output layer and d_ff 368, so its parameters match gpt-tiny's within 0.3%.
    add("llama-tiny", ModelConfig(family="decoder", activation="swiglu", norm_position="pre", norm="rmsnorm",
                                  positional="rope", num_kv_heads=1, use_bias=False, tie_embeddings=False,
                                  **tiny_llama), _TINY_RECIPE, None, "demo")
    return presets


PRESETS: dict[str, Preset] = _build()


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(
            f"preset={name!r} is unknown.{suggest(name, PRESETS)} Known presets: {', '.join(PRESETS)}."
        )
    return PRESETS[name]
