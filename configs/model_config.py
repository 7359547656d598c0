"""ModelConfig: every shape and switch of a Transformer, validated when it is built.

One frozen dataclass describes all three families. A bad value raises
`ConfigError` naming the field and the fix, before any array is allocated.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal, NoReturn, Optional, get_args

# Every list of choices, once: the Literal types the fields (and --set, configs/overrides.py) read, and the
# tuples that error messages, CLI choices and the model's tables are checked against.
Family = Literal["decoder", "encoder", "encoder_decoder"]
# swiglu is the gated feed-forward (model/gated_ffn.py): three matrices instead of two.
Activation = Literal["relu", "gelu", "gelu_tanh", "swiglu"]
NormPosition = Literal["pre", "post"]
Norm = Literal["layernorm", "rmsnorm"]
# rope rotates queries and keys inside attention (model/rotary.py); the other two are added to the embeddings.
Positional = Literal["learned", "sinusoidal", "rope"]
RopeScaling = Literal["none", "llama3"]
RematPolicy = Literal["none", "full", "save_dots", "save_dots_no_batch"]
DType = Literal["float32", "bfloat16", "float16"]
# How attention is computed (model/attention.py): "matrices" forms QK^T/sqrt(d_k), the mask,
# the softmax weights and A V as arrays (the readable reference, and what `magic explain`
# shows); "fused" calls jax.nn.dot_product_attention, which never exposes the weights;
# "splash" runs jax's Pallas splash-attention kernel (model/splash.py), TPU only.
AttentionImpl = Literal["matrices", "fused", "splash"]
(FAMILIES, ACTIVATIONS, NORM_POSITIONS, NORMS, POSITIONAL, ROPE_SCALINGS, REMAT_POLICIES, DTYPES,
 ATTENTION_IMPLS) = (get_args(t) for t in (Family, Activation, NormPosition, Norm, Positional, RopeScaling, RematPolicy,
                                          DType, AttentionImpl))


# The stacks of each family, in the order a packed row feeds them (model/families.py reads this).
FAMILY_SIDES = {"decoder": ("decoder",), "encoder": ("encoder",), "encoder_decoder": ("encoder", "decoder")}


# The splash kernel tiles every attention length in blocks of a multiple of 128 (the TPU's lanes).
SPLASH_BLOCK = 128


def side_lengths(family: str, seq_len: int) -> dict[str, int]:
    """Tokens per stack for a run's data.seq_len: the encoder-decoder splits its window in two
    equal halves, the encoder reading the first and the decoder writing the second."""
    sides = FAMILY_SIDES[family]
    return {side: seq_len // len(sides) for side in sides}


def untiled_lengths(family: str, seq_len: int) -> dict[str, int]:
    """{side: length} of the stacks whose attention length SPLASH_BLOCK does not divide."""
    return {side: n for side, n in side_lengths(family, seq_len).items() if n % SPLASH_BLOCK}


class ConfigError(ValueError):
    """A config field has a bad value. The message names the field and the fix."""


def _number(v) -> bool:
    """A real number: bools and strings are not (and NaN fails every comparison)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def finite(v) -> bool:
    """A real number that is neither NaN nor infinite (what every float field needs first)."""
    return _number(v) and math.isfinite(v)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def fail(field: str, value, fix: str) -> NoReturn:
    """Raise the ConfigError every validation uses: the field, its value, the fix."""
    raise ConfigError(f"{field}={value!r} is invalid: {fix}")


def suggest(name: str, choices) -> str:
    """' Did you mean X?' for a misspelt name, else ''."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: Family = "decoder"  # decoder (GPT), encoder (BERT) or encoder_decoder (Vaswani et al.)
    vocab_size: int = 50257  # rows of the embedding table (padded to a multiple of 128 for the tokenizer)
    # Ids >= num_valid_tokens are padding rows of the embedding table (the table is
    # padded to a multiple of 128 for fast matmuls); their logits are masked so they
    # are never predicted. None: every id is valid.
    num_valid_tokens: Optional[int] = None
    d_model: int = 768  # width of the residual stream: every token is a vector of this size
    num_heads: int = 12  # attention heads; each head is d_model / num_heads wide
    num_layers: int = 12  # per stack: the encoder-decoder has this many in each
    d_ff: int = 3072  # hidden width of the feed-forward network
    max_len: int = 1024  # positions the model has (the longest sequence it reads)
    activation: Activation = "gelu_tanh"  # feed-forward nonlinearity: relu, gelu or gelu_tanh
    norm_position: NormPosition = "pre"  # LayerNorm before each sublayer (GPT-2) or after the residual add
    positional: Positional = "learned"  # learned position embeddings, the fixed sinusoidal table, or rotary (RoPE)
    norm: Norm = "layernorm"  # LayerNorm, or RMSNorm (no mean, no bias: Llama)
    # Grouped-query attention (Ainslie et al. 2023): this many key/value heads, each shared by
    # num_heads // num_kv_heads query heads. None: one per query head (plain multi-head); 1: multi-query.
    num_kv_heads: Optional[int] = None
    rope_theta: float = 10000.0  # RoPE's base: pair i turns by pos / theta^(2i/head_dim) (Su et al. 2021)
    # Llama 3.1's stretch of RoPE's slow frequencies for long contexts (model/rotary.py), and its four
    # numbers, named as Hugging Face's rope_scaling dict names them (factor, low/high_freq_factor,
    # original_max_position_embeddings).
    rope_scaling: RopeScaling = "none"  # none, or llama3 (Llama 3.1's long-context frequency stretch)
    rope_scaling_factor: float = 8.0  # llama3: slow frequencies are divided by this
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above rope_original_max_len / this are slow
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below rope_original_max_len / this are kept
    rope_original_max_len: int = 8192  # llama3: the context length the model was pre-trained at
    tie_embeddings: bool = True  # the output layer reuses the token embedding matrix
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (Vaswani 3.4)
    type_vocab_size: int = 0  # BERT's segment (sentence A/B) embeddings; 0 = none
    use_bias: bool = True  # biases in the attention and feed-forward projections
    layer_norm_eps: float = 1e-5  # added to the variance inside LayerNorm
    dropout_rate: float = 0.1  # dropout on embeddings and sublayer outputs (training only)
    attention_dropout_rate: float = 0.1  # dropout on the softmax attention weights (matrices only)
    init_std: float = 0.02  # standard deviation of the normal init of weight matrices
    dtype: DType = "float32"  # compute dtype
    param_dtype: DType = "float32"  # dtype the parameters are stored in
    scan_layers: bool = True  # stack the layers with nn.scan (one compiled layer body)
    # Layers per scan iteration. Unrolling a small model's scan lets XLA fuse across
    # layers (~15% faster on CPU) while weights keep their stacked [layers, ...] layout.
    scan_unroll: int = 1
    remat_policy: RematPolicy = "none"  # what the backward pass recomputes instead of storing
    attention_impl: AttentionImpl = "matrices"  # matrices, fused or splash (TPU): see AttentionImpl above

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_len", "scan_unroll"):
            value = getattr(self, name)
            if not _count(value) or value <= 0:
                fail(name, value, "use a positive integer.")
        for name, choices in (
            ("family", FAMILIES),
            ("activation", ACTIVATIONS),
            ("norm_position", NORM_POSITIONS),
            ("norm", NORMS),
            ("positional", POSITIONAL),
            ("rope_scaling", ROPE_SCALINGS),
            ("remat_policy", REMAT_POLICIES),
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
            ("attention_impl", ATTENTION_IMPLS),
        ):
            value = getattr(self, name)
            if value not in choices:
                fail(name, value, f"choose one of {', '.join(choices)}.{suggest(str(value), choices)}")
        if self.d_model % self.num_heads:
            near = min((h for h in range(1, self.d_model + 1) if self.d_model % h == 0),
                       key=lambda h: (abs(h - self.num_heads), h))  # a real divisor, even when d_model < 64
            fail(
                "num_heads",
                self.num_heads,
                f"d_model={self.d_model} must be divisible by num_heads; "
                f"pick a divisor of {self.d_model} (e.g. {near} heads of {self.d_model // near}).",
            )
        self._check_kv_heads()
        self._check_rope()

        for name in ("dropout_rate", "attention_dropout_rate"):
            value = getattr(self, name)
            if not _number(value) or not 0.0 <= value < 1.0:
                fail(name, value, "use a probability in [0, 1).")
        if self.attention_impl != "matrices" and self.attention_dropout_rate:
            fail("model.attention_impl", self.attention_impl,
                 f"the {self.attention_impl} kernel never forms the attention weights, so it cannot drop them out "
                 f"(attention_dropout_rate={self.attention_dropout_rate}): set model.attention_dropout_rate=0, or "
                 f"model.attention_impl=matrices.")
        # The platform (splash: TPU only) and the sequence lengths are checked where they are known:
        # train/run.py resolve_config and TrainConfig.
        if not finite(self.layer_norm_eps) or not self.layer_norm_eps > 0:
            fail("layer_norm_eps", self.layer_norm_eps, "use a small positive number such as 1e-5.")
        if not finite(self.init_std) or not self.init_std > 0:
            fail("init_std", self.init_std, "use a positive standard deviation such as 0.02.")
        if not _count(self.type_vocab_size) or self.type_vocab_size < 0:
            fail("type_vocab_size", self.type_vocab_size, "use 0 (no segment embeddings) or a positive count.")
        if self.num_valid_tokens is not None and (
                not _count(self.num_valid_tokens) or not 0 < self.num_valid_tokens <= self.vocab_size):
            fail("num_valid_tokens", self.num_valid_tokens, f"use a count in 1..vocab_size={self.vocab_size}, or None.")

    def _check_kv_heads(self) -> None:
        kv = self.num_kv_heads
        if kv is None:
            return
        if not _count(kv) or kv <= 0:
            fail("num_kv_heads", kv, "use a positive integer (1: multi-query), or None for one per query head.")
        if self.num_heads % kv:
            groups = [k for k in range(1, self.num_heads + 1) if self.num_heads % k == 0]
            fail("num_kv_heads", kv, f"num_heads={self.num_heads} must be a multiple of it (each key/value head serves "
                                     f"an equal group of query heads); choose one of {', '.join(map(str, groups))}.")

    def _check_rope(self) -> None:
        if not finite(self.rope_theta) or not self.rope_theta > 1:
            fail("rope_theta", self.rope_theta, "use a base above 1, such as 10000 (Llama 2) or 500000 (Llama 3).")
        if self.positional == "rope" and self.head_dim % 2:
            fail("positional", "rope", f"rotary embeddings turn pairs of dimensions, so the head dimension d_model / "
                                       f"num_heads = {self.head_dim} must be even; change d_model or num_heads.")
        if self.rope_scaling == "none":
            return
        if self.positional != "rope":
            fail("rope_scaling", self.rope_scaling, f"it scales rotary frequencies, but positional="
                                                    f"{self.positional!r}; set positional=rope or rope_scaling=none.")
        for name in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            value = getattr(self, name)
            if not finite(value) or not value > 0:
                fail(name, value, "use a positive number (Llama 3.1: factor 8, low 1, high 4).")
        if not self.rope_high_freq_factor > self.rope_low_freq_factor:
            fail("rope_high_freq_factor", self.rope_high_freq_factor,
                 f"it must exceed rope_low_freq_factor={self.rope_low_freq_factor} (Llama 3.1: 4 and 1).")
        if not _count(self.rope_original_max_len) or self.rope_original_max_len <= 0:
            fail("rope_original_max_len", self.rope_original_max_len, "use the context length the model was "
                                                                      "pre-trained at (Llama 3: 8192).")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: num_kv_heads, or one per query head."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def has_decoder(self) -> bool:
        return "decoder" in FAMILY_SIDES[self.family]

    @property
    def has_encoder(self) -> bool:
        return "encoder" in FAMILY_SIDES[self.family]

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)
