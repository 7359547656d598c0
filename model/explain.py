"""`magic explain`: one forward pass of a real model, matrix by matrix.

Every matrix shown comes out of the model itself: the attention module `sow`s q, k, v,
scores, weights, heads_concatenated and its output projection; `capture_intermediates`
records the outputs of the embedding, positional, LayerNorm, feed-forward and layer
modules. Nothing is recomputed here except two additions the model does inline
(the enc-dec embedding sum and the pre-LN residual x + attention), and the mask and
the vocabulary softmax, which call the model's own functions (masks.py, output_head.py).

Presets too large to hold (GPT-3 175B) run the same code under `jax.eval_shape`: every
shape and dtype with no weights and no activations allocated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from matrixmagic.configs import ModelConfig

from .accounting import human
from .add_norm import NORMS
from .build import abstract_variables, build_model, init_params
from .embeddings import TokenEmbedding
from .families import family_of
from .feed_forward import GATED, FeedForward, GatedFeedForward
from .layers import DecoderLayer, EncoderLayer
from .masks import self_attention_mask
from .output_head import vocab_softmax
from .positional import POSITIONAL_KINDS
from .walk import Stage, add, captured, layer_output, layer_tree, norm_name, stage

# Above this many parameters, explain runs on shapes only (no weights allocated).
MAX_MATERIALIZED_PARAMS = 200_000_000
DEFAULT_TEXT = "Attention is all you need."
_CAPTURED = (TokenEmbedding, *(kind.module for kind in POSITIONAL_KINDS.values()),
             *(module for module, _ in NORMS.values()), FeedForward, GatedFeedForward, EncoderLayer, DecoderLayer)


@dataclasses.dataclass(frozen=True)
class Explanation:
    config: ModelConfig
    layer: int
    labels: Optional[list]  # token strings (None on shape-only runs without text)
    stages: list
    shapes_only: bool
    label: Optional[Callable[[int], str]] = None  # id -> printable label (from the tokenizer)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in self.stages)}")


def token_label(tokenizer, token_id: int) -> str:
    """A short printable label of one id, from its tokenizer: a special's own text
    (<|endoftext|>, ...), a byte tokenizer's control or partial-UTF-8 bytes as \\xNN, and
    spaces made visible."""
    if tokenizer.cache_key == "bytes" and 0 <= token_id < 256:
        return _byte_label(token_id)
    return tokenizer.decode([token_id]).replace(" ", "␣")


def _byte_label(token_id: int) -> str:
    """An id as a byte (printable ASCII, else \\xNN); ids past 255 as <id>."""
    if 32 <= token_id < 127:
        return {" ": "␣"}.get(chr(token_id), chr(token_id))
    return f"\\x{token_id:02x}" if 0 <= token_id < 256 else f"<{token_id}>"


def _capture(module: nn.Module, method_name: str) -> bool:
    return method_name == "__call__" and isinstance(module, _CAPTURED)


def model_inputs(config: ModelConfig, ids, bos_id: int = 0) -> dict:
    """Keyword arguments of the family's __call__ for token ids [B, T] (enc-dec: source = ids,
    target = [bos] + ids[:-1], teacher forcing)."""
    if not family_of(config).cross_attention:
        return {"inputs": ids}
    target = jnp.concatenate([jnp.full(ids.shape[:1] + (1,), bos_id, ids.dtype), ids[:, :-1]], axis=1)
    return {"encoder_inputs": ids, "decoder_inputs": target}


def forward(config: ModelConfig, params, ids, bos_id: int = 0) -> tuple[jnp.ndarray, dict, jnp.ndarray, jnp.ndarray]:
    """The real model's forward pass -> (logits, intermediates, vocabulary softmax, self-attention
    mask [1, 1, T, T] as the model builds it; all-True for the bidirectional encoder)."""
    logits, state = build_model(config).apply({"params": params}, **model_inputs(config, ids, bos_id),
                                              capture_intermediates=_capture, mutable=["intermediates"])
    length = ids.shape[1]
    mask = self_attention_mask(None, causal=family_of(config).causal).dense(length, length)
    mask = jnp.ones((1, 1, length, length), bool) if mask is None else mask
    return logits, state["intermediates"], vocab_softmax(logits), mask


def _split_heads(concat, heads: int, d_k: int):
    """[B, T, H d_k] -> [B, T, H, d_k]: the per-head weighted values, as the model reshapes them."""
    shape = concat.shape[:2] + (heads, d_k)
    if isinstance(concat, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(shape, concat.dtype)
    return concat.reshape(shape)


def _attention_stages(cfg, layer, layer_input, mask, B, S, prefix="", kind="self_attention"):
    """Q, K, V, scores, mask, weights, weighted values, concat, W_o, add & norm of one attention sublayer."""
    att = layer[kind]
    q, k, v = (captured(att, n, 0) for n in ("q", "k", "v"))
    d, H, G, dk = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    Tq, Tk = q.shape[1], k.shape[1]
    norm = norm_name(cfg)
    stages = []
    if cfg.norm_position == "pre":
        stages.append(S(f"{prefix}attention input ({norm})", f"pre-LN: {norm}(x) feeds Q, K, V",
                        captured(layer, f"{kind}_norm", "__call__", 0)))
    src = "the encoder output" if kind == "cross_attention" else "X"
    turned = kind == "self_attention" and not POSITIONAL_KINDS[cfg.positional].additive
    rot = ("rotate(", ", pos) (RoPE: pairs (i, i + d_k/2) turned by pos w_i)") if turned else ("", "")
    shared = (f"; {G} key/value head{'s' * (G > 1)} for {H} query heads, {H // G} queries per K/V head "
              f"(grouped-query: attention repeats them)") if G != H else ""
    stages += [
        S(f"{prefix}Q", f"Q_h = {rot[0]}X W_q[h]{rot[1]} per head [B, T, d_k]", q, 2 * B * Tq * d * d, head_axis=2),
        S(f"{prefix}K", f"K_g = {rot[0]}{src} W_k[g]{rot[1]} per head [B, T, d_k]{shared}", k,
          2 * B * Tk * d * G * dk, head_axis=2),
        S(f"{prefix}V", f"V_g = {src} W_v[g] per head [B, T, d_k]", v, 2 * B * Tk * d * G * dk, head_axis=2),
        S(f"{prefix}scores", "S_h = Q_h K_h^T / sqrt(d_k) [B, H, Tq, Tk], masked entries set to -1e9",
          captured(att, "scores", 0), 2 * B * H * Tq * Tk * dk),
    ]
    if mask is not None:
        stages.append(S(f"{prefix}mask", "True where query q may attend key k (broadcast over heads)", mask))
    concat = captured(att, "heads_concatenated", 0)
    out = captured(att, "output_projection", 0)
    stages += [
        S(f"{prefix}attention weights", "A_h = softmax(S_h) over keys (rows sum to 1, float32)",
          captured(att, "weights", 0)),
        S(f"{prefix}weighted values", "O_h = A_h V_h per head [B, T, d_k]", _split_heads(concat, H, dk),
          2 * B * H * Tq * Tk * dk, head_axis=2),
        S(f"{prefix}heads concatenated", "concat(O_1 .. O_H) [B, T, H d_k = d_model]", concat),
        S(f"{prefix}output projection", "concat W_o", out, 2 * B * Tq * d * d),
    ]
    name = f"add & norm ({kind.replace('_', ' ')})"
    if cfg.norm_position == "post":
        added = captured(layer, f"{kind}_norm", "__call__", 0)
        stages.append(S(name, f"{norm}(x + attention(x)) (post-LN)", added))
    else:  # pre-LN adds inline; the residual sum is not a module output
        added = add(layer_input, out)
        stages.append(S(name, f"x + attention({norm}(x)) (pre-LN residual)", added))
    return stages, added


def runs_on_shapes(config: ModelConfig, params_given: bool) -> bool:
    """Whether explain walks shapes only by default: no weights given and too many to draw."""
    abstract = nn.meta.unbox(abstract_variables(config)["params"])
    n_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract))
    return not params_given and n_params > MAX_MATERIALIZED_PARAMS


def explain(config: ModelConfig, params=None, ids=None, layer: int = 0, batch: int = 1,
            shapes_only: Optional[bool] = None, labels: Optional[list] = None, tokenizer=None) -> Explanation:
    """Walk one forward pass. ids [B, T] (default: DEFAULT_TEXT encoded by `tokenizer`, or as
    UTF-8 bytes without one; max_len zeros on shape-only runs); params None = fresh random
    init, or shapes only for presets over MAX_MATERIALIZED_PARAMS parameters. `tokenizer`
    (encode, decode, bos_id, cache_key: train/data/tokenizers.py) labels the tokens and gives
    the encoder-decoder's start token; without one tokens are labelled as bytes."""
    cfg = config.replace(attention_impl="matrices")  # the walk shows the matrices, whatever the run computed with
    if not 0 <= layer < cfg.num_layers:
        raise ValueError(f"layer={layer} is invalid: this model has layers 0..{cfg.num_layers - 1}.")
    abstract = nn.meta.unbox(abstract_variables(cfg)["params"])
    if shapes_only is None:
        shapes_only = runs_on_shapes(cfg, params is not None)
    if tokenizer is None and not shapes_only and family_of(cfg).cross_attention:
        raise ValueError("explain of an encoder-decoder needs tokenizer= (its bos id starts the decoder), "
                         "e.g. ByteTokenizer() from matrixmagic.train.data.tokenizers.")
    label = functools.partial(token_label, tokenizer) if tokenizer is not None else _byte_label
    bos_id = tokenizer.bos_id if tokenizer is not None else 0  # shape-only runs never read it
    if ids is None:
        text = tokenizer.encode(DEFAULT_TEXT) if tokenizer is not None else np.frombuffer(DEFAULT_TEXT.encode(),
                                                                                          np.uint8)
        ids = (jax.ShapeDtypeStruct((batch, cfg.max_len), jnp.int32) if shapes_only
               else np.tile(np.asarray(text, np.int32), (batch, 1)))
    if labels is None and not isinstance(ids, jax.ShapeDtypeStruct):
        labels = [label(int(i)) for i in np.asarray(ids)[0]]
    if labels is not None and family_of(cfg).cross_attention:
        labels = [label(bos_id) if tokenizer is not None else "<bos>"] + list(labels[:-1])  # decoder input
    if not shapes_only:
        ids = jnp.asarray(ids, jnp.int32)
        params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)) if params is None else params
        outputs = forward(cfg, params, ids, bos_id)
    else:
        ids = jax.ShapeDtypeStruct(tuple(ids.shape), jnp.int32)
        outputs = jax.eval_shape(functools.partial(forward, cfg, bos_id=bos_id), abstract, ids)
    return Explanation(cfg, layer, labels, _stages(cfg, ids, *outputs, layer, shapes_only), shapes_only,
                       label if tokenizer is not None else None)


def _stages(cfg, ids, logits, inter, probs, mask, n, shapes_only) -> list:
    B, T = ids.shape
    d, V = cfg.d_model, cfg.vocab_size
    S = functools.partial(stage, shapes_only=shapes_only)
    family = family_of(cfg)
    stack = family.sides[-1]  # the stack the logits come from: the decoder, or BERT's encoder
    stages, stack_input = family.explain_prelude(cfg, inter, ids, S)
    layer = layer_tree(inter, stack, n, cfg)
    x = stack_input if n == 0 else layer_output(inter, stack, n - 1, cfg)
    attention, x = _attention_stages(cfg, layer, x, mask, B, S)
    stages += attention
    if family.cross_attention:
        cross, x = _attention_stages(cfg, layer, x, None, B, S, prefix="cross ", kind="cross_attention")
        shown = {f"cross {part}" for part in ("Q", "K", "V", "attention weights", "output projection")}
        stages += [s for s in cross if s.name in shown] + [cross[-1]]
    stages += _ffn_stages(cfg, layer, inter, stack, n, B, T, S)
    stages += family.explain_head(cfg, inter, B, T, S)
    tied = "E^T (tied to the token embedding)" if cfg.tie_embeddings else "W_out"
    stages += [S("logits (final linear)", f"h {tied} [B, T, vocab]", logits, 2 * B * T * d * V),
               S("softmax over vocabulary", "p(next token) = softmax(logits) (float32)", probs)]
    return stages


def _ffn_stages(cfg, layer, inter, stack, n, B, T, S) -> list:
    """The FFN sublayer: its norm (pre-LN), hidden units (the gate first when gated), output, add & norm."""
    d, f = cfg.d_model, cfg.d_ff
    ffn, norm = layer["feed_forward"], norm_name(cfg)
    stages = []
    if cfg.norm_position == "pre":
        stages.append(S(f"FFN input ({norm})", f"pre-LN: {norm}(x) feeds the FFN",
                        captured(layer, "feed_forward_norm", "__call__", 0)))
    if cfg.activation in GATED:
        stages += [
            S("FFN gate", "silu(x W_gate) [B, T, d_ff] (SwiGLU: a learned gate per hidden unit)",
              captured(ffn, "gate_activated", 0), 2 * B * T * d * f),
            S("FFN hidden", "silu(x W_gate) * (x W_up) [B, T, d_ff]", captured(ffn, "activated", 0),
              2 * B * T * d * f),
        ]
    else:
        stages.append(S("FFN hidden", f"act(x W_1 + b_1), act = {cfg.activation} [B, T, d_ff]",
                        captured(ffn, "activated", 0), 2 * B * T * d * f))
    down = "hidden W_down" if cfg.activation in GATED else "hidden W_2 + b_2"
    return stages + [
        S("FFN output", f"{down} [B, T, d_model]", captured(ffn, "__call__", 0), 2 * B * T * f * d),
        S("add & norm (FFN)", f"{norm}(x + FFN(x))" if cfg.norm_position == "post" else f"x + FFN({norm}(x))",
          layer_output(inter, stack, n, cfg), note=f"layer {n} output; {cfg.num_layers - n - 1} more layers follow"),
    ]


def _preview(stage: Stage, rows: int = 4, cols: int = 6) -> str:
    x = np.asarray(stage.value)
    x = x[0] if x.ndim >= 2 else x  # batch 0
    if stage.head_axis is not None:
        x = np.take(x, 0, axis=stage.head_axis - 1)  # head 0
    while x.ndim > 2:
        x = x[0]
    x = x.reshape(1, -1) if x.ndim == 1 else x
    part = x[:rows, :cols]
    fmt = (lambda v: f"{int(v):d}") if x.dtype.kind in "iub" else (lambda v: f"{v: .3g}")
    lines = ["[" + " ".join(f"{fmt(v):>9}" for v in row) + (" ..." if x.shape[1] > cols else "") + "]" for row in part]
    where = "batch 0" + (", head 0" if stage.head_axis is not None else "")
    return f"({where}, top-left {part.shape[0]}x{part.shape[1]})\n        " + "\n        ".join(lines)


def format_explanation(e: Explanation, decode_token: Optional[Callable[[int], str]] = None) -> str:
    """The readable walk: name, formula, shape, dtype, matmul FLOPs, a few values."""
    cfg = e.config
    mode = "shapes only (jax.eval_shape: no weights allocated)" if e.shapes_only else "real forward pass"
    out = [(f"{cfg.family} model: d_model={cfg.d_model} heads={cfg.num_heads} d_k={cfg.head_dim} "
            f"layers={cfg.num_layers} vocab={cfg.vocab_size}; showing layer {e.layer}; {mode}")]
    if e.labels:
        out.append("text: " + " ".join(repr(t) for t in e.labels))
    for i, s in enumerate(e.stages, 1):
        line = f"{i:2d}. {s.name:<28} {list(s.shape)!s:<24} {s.dtype:<8}"
        if s.head_axis is not None:
            line += f" per head {list(s.per_head_shape)} x {s.shape[s.head_axis]}"
        if s.flops:
            line += f"  matmul {human(s.flops, 'FLOP')}"
        out.append(line)
        out.append(f"      {s.formula}" + (f"  [{s.note}]" if s.note else ""))
        if s.value is not None and s.name != "mask":
            out.append("      values " + _preview(s))
        elif s.value is not None:
            m = np.asarray(s.value)[0, 0].astype(int)
            out.append("      " + "\n      ".join(" ".join(map(str, r[:16])) for r in m[:8]))
    probs = e.stages[-1].value
    decode_token = decode_token or e.label
    if probs is not None and decode_token is not None:
        top = np.argsort(-probs[0, -1])[:5]
        masked = family_of(cfg).generation == "fill_masks"
        what = "MLM prediction at the last position" if masked else "next token after the last one"
        out.append(f"{what}: " +
                   ", ".join(f"{decode_token(int(t))!r} {probs[0, -1, t]:.3f}" for t in top))
    total = sum(s.flops or 0 for s in e.stages)
    out.append(f"matmul FLOPs shown (one layer + head): {human(total, 'FLOP')}")
    return "\n".join(out)
