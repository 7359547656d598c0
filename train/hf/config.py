"""Hugging Face `config.json` <-> our ModelConfig, both ways.

GPT-2 is our decoder with pre-LN, learned positions, biases, GELU (tanh form) and a tied
head; BERT is our encoder with post-LN, learned positions, segment embeddings, exact
GELU, a pooler and the masked-LM head; Llama (and Mistral without a sliding window, the
same network) is our decoder with pre-RMSNorm, RoPE (Llama 3's scaling or none), SwiGLU,
grouped-query attention, usually no biases and an untied head. Qwen2 is recognized to be
refused: its attention has q/k/v biases but no o_proj bias, which one `use_bias` cannot say.
Which of gpt2 and llama a decoder exports as follows its options (`exportable`).

Every HF field that changes the forward pass either maps to a field of ours or, when we
cannot express it, is an error naming the field, its value and what we support (before any
tensor is read). Fields that only
matter to training in PyTorch or to other heads are listed in `Translation.notes`.

The embedding table is translated unpadded here (vocab_size = the checkpoint's rows);
the import pads it to a multiple of 128 together with the tokenizer's extra ids
(train/hf/api.py), and the export writes back only the checkpoint's rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, cast

from matrixmagic.configs import ModelConfig
from matrixmagic.configs.model_config import DType, suggest
from matrixmagic.configs.model_config import Family as FamilyName
from matrixmagic.model.families import FAMILY_RECORDS, family_of

from .errors import HFError

ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
    "bert": ("BertForMaskedLM", "BertForPreTraining", "BertModel"),
    "llama": ("LlamaForCausalLM", "LlamaModel"),
    "mistral": ("MistralForCausalLM", "MistralModel"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Model"),  # recognized, and refused by name (_qwen2)
}
# The Llama-shaped model types: one network (names.py has one table for them), our decoder with
# the options below.
LLAMA_TYPES = ("llama", "mistral", "qwen2")
LLAMA_OPTIONS = {"positional": "rope", "norm": "rmsnorm", "activation": "swiglu", "norm_position": "pre",
                 "scale_embeddings": False}
# model_type -> our family: the family records' own hf_model_type (model/families.py: the decoder's
# is gpt2, its default) and the Llama-shaped decoders.
FAMILY_OF: dict[str, FamilyName] = {
    **{f.hf_model_type: f.name for f in FAMILY_RECORDS.values() if f.hf_model_type},
    **{t: "decoder" for t in LLAMA_TYPES}}
assert set(FAMILY_OF) == set(ARCHITECTURES), "each exported model_type needs its architectures here"
# HF activation names (transformers.activations.ACT2FN) -> ours. gelu_new, gelu_fast and
# gelu_pytorch_tanh are all 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (Hendrycks & Gimpel
# 2016, eq. 2's approximation), written three ways.
ACTIVATIONS_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "relu": "relu"}
ACTIVATIONS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class Translation:
    model: ModelConfig  # vocab_size = the checkpoint's rows (unpadded)
    model_type: str
    architecture: str
    notes: tuple[str, ...] = ()  # what was ignored or approximated, for the import report


# The keys of each model type that fix a tensor's shape and have no default worth trusting:
# transformers' save_pretrained writes them all, so one missing means a hand-edited or foreign
# config.json, and a default (GPT-2's 768 wide, say) would only surface as every tensor mis-shaped.
REQUIRED = {
    "gpt2": ("vocab_size", "n_embd", "n_head", "n_layer", "n_positions"),
    "bert": ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
             "max_position_embeddings"),
    "llama": ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
              "max_position_embeddings"),
}
REQUIRED["mistral"] = REQUIRED["qwen2"] = REQUIRED["llama"]
ALIASES = {"n_embd": ("hidden_size",), "n_head": ("num_attention_heads",), "n_layer": ("num_hidden_layers",),
           "n_positions": ("max_position_embeddings",)}  # transformers' GPT2Config reads both spellings


def _found(hf: dict, name: str, aliases) -> Optional[str]:
    """The key (`name` or an alias) that holds a value, or None."""
    return next((key for key in (name, *aliases) if key in hf and hf[key] is not None), None)


def _get(hf: dict, name: str, default=None, *aliases):
    key = _found(hf, name, aliases)
    return default if key is None else hf[key]


def _count(hf: dict, name: str, default: Optional[int] = None, *aliases, within: str = "") -> int:
    """A whole number: int() would read 2.5 layers as 2 and True heads as 1, silently."""
    key = _found(hf, name, aliases)
    if key is None:
        if default is None:
            raise AssertionError(f"{name} is in REQUIRED, checked before")
        return default
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value % 1:
        raise HFError(f"config.json {within}{key}={value!r} is invalid: a count must be a whole number.")
    return int(value)


def _real(hf: dict, name: str, default: float, *aliases, within: str = "") -> float:
    """A finite number: an epsilon, theta or rate of NaN or inf would make every output NaN."""
    key = _found(hf, name, aliases)
    if key is None:
        return default
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HFError(f"config.json {within}{key}={value!r} is invalid: a constant must be a finite number.")
    return float(value)


def check_required(hf: dict, model_type: str) -> None:
    """Every key that fixes a shape is there (REQUIRED), named when it is not."""
    for name in REQUIRED[model_type]:
        aliases = ALIASES.get(name, ()) if model_type == "gpt2" else ()
        if _found(hf, name, aliases) is None:
            also = f" (or {aliases[0]!r})" if aliases else ""
            raise HFError(f"config.json has no {name!r}{also}: a {model_type} config.json gives it, as it fixes the "
                          f"weights' shapes. Give the config.json saved with these weights (save_pretrained writes "
                          f"every such key), or add {name!r} to this one.")


def _refuse(model_type: str, field: str, value, why: str):
    raise HFError(f"config.json: {model_type} with {field}={value!r} cannot be expressed here: {why}.")


def architecture_of(hf: dict) -> tuple[str, str]:
    """(model_type, architecture), or an error naming what is supported."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        supported = ", ".join(f"{t} ({', '.join(a)})" for t, a in ARCHITECTURES.items())
        raise HFError(f"config.json: model_type={model_type!r} is not supported; importable: {supported}."
                      f"{suggest(str(model_type), ARCHITECTURES)}")
    archs = hf.get("architectures") or [ARCHITECTURES[model_type][0]]
    arch = archs[0]
    if arch not in ARCHITECTURES[model_type]:
        raise HFError(f"config.json: architectures={archs!r}: {arch} has a head we do not have; importable "
                      f"{model_type} architectures: {', '.join(ARCHITECTURES[model_type])}.")
    return model_type, arch


def _activation(model_type: str, field: str, value) -> str:
    if value not in ACTIVATIONS_IN:
        _refuse(model_type, field, value, f"the activations we have are {', '.join(ACTIVATIONS_IN)}")
    return ACTIVATIONS_IN[value]


def _gpt2(hf: dict, notes: list) -> dict:
    for field, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if bool(hf.get(field, ok)) != ok:
            why = {"scale_attn_weights": "attention here always scales scores by 1/sqrt(d_k)",
                   "scale_attn_by_inverse_layer_idx": "attention here has no per-layer 1/(layer+1) score scale",
                   "add_cross_attention": "our decoder-only model has no cross attention"}[field]
            _refuse("gpt2", field, hf.get(field), why)
    if hf.get("reorder_and_upcast_attn"):
        notes.append("reorder_and_upcast_attn=true: scores and softmax are float32 here anyway")
    d = _count(hf, "n_embd", None, "hidden_size")
    resid, embd = _real(hf, "resid_pdrop", 0.1), _real(hf, "embd_pdrop", 0.1)
    if embd != resid:
        notes.append(f"embd_pdrop={embd} differs from resid_pdrop={resid}: one dropout_rate here, {resid} (training "
                     f"only)")
    return dict(vocab_size=_count(hf, "vocab_size"), d_model=d,
                num_heads=_count(hf, "n_head", None, "num_attention_heads"),
                num_layers=_count(hf, "n_layer", None, "num_hidden_layers"),
                d_ff=_count(hf, "n_inner", 4 * d), max_len=_count(hf, "n_positions", None, "max_position_embeddings"),
                activation=_activation("gpt2", "activation_function", _get(hf, "activation_function", "gelu_new")),
                norm_position="pre", positional="learned", type_vocab_size=0,
                layer_norm_eps=_real(hf, "layer_norm_epsilon", 1e-5), dropout_rate=resid,
                attention_dropout_rate=_real(hf, "attn_pdrop", 0.1))


def _bert(hf: dict, notes: list) -> dict:
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        _refuse("bert", "position_embedding_type", position, "only absolute (learned) position embeddings are "
                "supported here, not relative-position attention (Shaw et al. 2018)")
    for field in ("is_decoder", "add_cross_attention"):
        if hf.get(field):
            _refuse("bert", field, hf[field], "the encoder here is bidirectional and has no cross attention")
    if hf.get("classifier_dropout") is not None:
        notes.append("classifier_dropout: no classification head here")
    return dict(vocab_size=_count(hf, "vocab_size"), d_model=_count(hf, "hidden_size"),
                num_heads=_count(hf, "num_attention_heads"), num_layers=_count(hf, "num_hidden_layers"),
                d_ff=_count(hf, "intermediate_size"), max_len=_count(hf, "max_position_embeddings"),
                activation=_activation("bert", "hidden_act", _get(hf, "hidden_act", "gelu")),
                norm_position="post", positional="learned", type_vocab_size=_count(hf, "type_vocab_size", 2),
                layer_norm_eps=_real(hf, "layer_norm_eps", 1e-12), dropout_rate=_real(hf, "hidden_dropout_prob", 0.1),
                attention_dropout_rate=_real(hf, "attention_probs_dropout_prob", 0.1))


def _rope(hf: dict, model_type: str) -> dict:
    """RoPE's fields. transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; 4.x
    wrote rope_theta and rope_scaling ({rope_type or type, ...} or null): both are read."""
    params = hf.get("rope_parameters") or {}
    spec, field = (params, "rope_parameters") if params else (hf.get("rope_scaling") or {}, "rope_scaling")
    theta = _real(params, "rope_theta", _real(hf, "rope_theta", 10000.0), within="rope_parameters.")
    kind = _get(spec, "rope_type", "default", "type")
    partial = _real(hf, "partial_rotary_factor", _real(spec, "partial_rotary_factor", 1.0, within=f"{field}."))
    if partial != 1.0:
        _refuse(model_type, "partial_rotary_factor", partial, "RoPE here turns every dimension of a head")
    if kind == "default":
        return dict(rope_theta=theta, rope_scaling="none")
    if kind != "llama3":
        _refuse(model_type, f"{field}.rope_type", kind, "the rope scalings here are none (rope_type default) and "
                "llama3 (Llama 3.1's); linear, dynamic, yarn, longrope and the others would change the frequencies")
    needs = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if missing := [k for k in needs if spec.get(k) is None]:
        raise HFError(f"config.json: {model_type} {field} of rope_type llama3 has no {missing[0]!r}; it needs factor, "
                      f"low_freq_factor, high_freq_factor and original_max_position_embeddings.")
    within = f"{field}."
    return dict(rope_theta=theta, rope_scaling="llama3", rope_scaling_factor=_real(spec, "factor", 0, within=within),
                rope_low_freq_factor=_real(spec, "low_freq_factor", 0, within=within),
                rope_high_freq_factor=_real(spec, "high_freq_factor", 0, within=within),
                rope_original_max_len=_count(spec, "original_max_position_embeddings", within=within))


def _qwen2(hf: dict) -> None:
    raise HFError("config.json: qwen2 (Qwen2ForCausalLM) cannot be expressed here: its attention biases are "
                  "q_proj, k_proj and v_proj with no o_proj bias (always: no config field turns them off), and "
                  "model.use_bias here is one switch for every projection's bias, attention and feed-forward.")


def _llama(hf: dict, notes: list, model_type: str) -> dict:
    """Llama and Mistral: the same network (Mistral's sliding window aside)."""
    if model_type == "qwen2":
        _qwen2(hf)
    d, heads = _count(hf, "hidden_size"), _count(hf, "num_attention_heads")
    max_len = _count(hf, "max_position_embeddings")
    window = hf.get("sliding_window")
    if window is not None and _count(hf, "sliding_window") < max_len:
        _refuse(model_type, "sliding_window", window, f"attention here sees the whole context, and past "
                f"{window} tokens this model sees only the last {window}. On contexts of at most {window} tokens the "
                f"two agree: to use it so, set max_position_embeddings to {window} in config.json (setting "
                f"sliding_window to null instead keeps the longer context, where the two differ)")
    if hf.get("head_dim") is not None and heads and _count(hf, "head_dim") != d // heads:
        _refuse(model_type, "head_dim", hf["head_dim"], f"a head here is hidden_size / num_attention_heads = "
                f"{d} / {heads} = {d // heads} wide")
    act = _get(hf, "hidden_act", "silu")
    if act != "silu":
        _refuse(model_type, "hidden_act", act, "the gated feed-forward here is SwiGLU, silu(x W_gate) * (x W_up)")
    bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if bias != mlp_bias:
        _refuse(model_type, "mlp_bias", hf.get("mlp_bias"), f"attention_bias={bias} differs, and model.use_bias here "
                f"is one switch for the attention and the feed-forward projections' biases")
    if _count(hf, "pretraining_tp", 1) != 1:
        notes.append(f"pretraining_tp={hf['pretraining_tp']}: PyTorch's split of the same matmuls; one matmul here")
    return dict(vocab_size=_count(hf, "vocab_size"), d_model=d, num_heads=heads,
                num_kv_heads=_count(hf, "num_key_value_heads", heads),
                num_layers=_count(hf, "num_hidden_layers"), d_ff=_count(hf, "intermediate_size"),
                max_len=max_len, use_bias=bias, layer_norm_eps=_real(hf, "rms_norm_eps", 1e-6),
                dropout_rate=0.0, attention_dropout_rate=_real(hf, "attention_dropout", 0.0), type_vocab_size=0,
                **LLAMA_OPTIONS, **_rope(hf, model_type))


def model_config_from_hf(hf: dict, param_dtype: str = "float32") -> Translation:
    """ModelConfig of a Hugging Face config.json (a dict); HFError for what we cannot express."""
    model_type, arch = architecture_of(hf)
    check_required(hf, model_type)
    notes: list[str] = []
    llama = model_type in LLAMA_TYPES
    fields = (_llama(hf, notes, model_type) if llama else _gpt2(hf, notes) if model_type == "gpt2" else
              _bert(hf, notes))
    fields = {"use_bias": True, "scale_embeddings": False, **fields}
    try:  # transformers' default for tie_word_embeddings: True for GPT-2 and BERT, False for Llama and Mistral
        model = ModelConfig(family=FAMILY_OF[model_type],
                            tie_embeddings=bool(hf.get("tie_word_embeddings", not llama)),
                            init_std=_real(hf, "initializer_range", 0.02),
                            param_dtype=cast(DType, param_dtype), **fields)  # ModelConfig checks the name
    except ValueError as err:  # ConfigError: e.g. hidden size not divisible by the heads
        raise HFError(f"config.json: {err}") from None
    return Translation(model, model_type, arch, tuple(notes))


# ----------------------------------------------------------------------------- ours -> HF


def _llama_like(model: ModelConfig) -> bool:
    """A decoder with any of Llama's options exports as llama (then it needs all of them)."""
    return model.family == "decoder" and any(getattr(model, f) == v for f, v in LLAMA_OPTIONS.items()
                                             if f in ("positional", "norm", "activation"))


def exportable(model: ModelConfig) -> str:
    """The model_type a ModelConfig exports as, or an error naming the field that stops it: a
    decoder with RoPE, RMSNorm or SwiGLU is a llama, another decoder a gpt2, an encoder a bert."""
    model_type = "llama" if _llama_like(model) else family_of(model).hf_model_type
    if model_type is None:
        raise HFError(f"model.family={model.family} has no Hugging Face counterpart here; decoder (gpt2, llama) and "
                      f"encoder (bert) export.")
    if model_type == "llama":
        needs: dict = dict(LLAMA_OPTIONS)
        why = "a decoder with rope, rmsnorm or swiglu exports as llama, which has all three"
    else:
        needs = {"norm_position": "pre" if model_type == "gpt2" else "post", "positional": "learned",
                 "norm": "layernorm", "use_bias": True, "scale_embeddings": False, "kv_heads": model.num_heads}
        if model_type == "gpt2":
            needs["type_vocab_size"] = 0
        why = f"the only one {model_type} has"
    for field, value in needs.items():
        if getattr(model, field) != value:
            name = "num_kv_heads" if field == "kv_heads" else field
            raise HFError(f"model.{name}={getattr(model, name)!r}: {model_type} needs {value!r} ({why}), so this run "
                          f"cannot be exported as {model_type}.")
    return model_type


def _rope_out(model: ModelConfig) -> tuple[dict, Optional[dict]]:
    """(rope_parameters as transformers 5 writes it, rope_scaling as 4.x did); both are written."""
    if model.rope_scaling == "none":
        return {"rope_type": "default", "rope_theta": model.rope_theta}, None
    scaling = {"rope_type": "llama3", "factor": model.rope_scaling_factor, "low_freq_factor": model.rope_low_freq_factor,
               "high_freq_factor": model.rope_high_freq_factor,
               "original_max_position_embeddings": model.rope_original_max_len}
    return {**scaling, "rope_theta": model.rope_theta}, scaling


def _llama_out(model: ModelConfig, model_type: str, specials: dict) -> dict:
    if model_type == "mistral" and model.use_bias:
        raise HFError("model.use_bias=True: mistral has no biases; export as LlamaForCausalLM (the default), whose "
                      "attention_bias and mlp_bias say it.")
    parameters, scaling = _rope_out(model)
    fields = dict(hidden_size=model.d_model, intermediate_size=model.d_ff, num_hidden_layers=model.num_layers,
                  num_attention_heads=model.num_heads, num_key_value_heads=model.kv_heads, head_dim=model.head_dim,
                  hidden_act="silu", max_position_embeddings=model.max_len, rms_norm_eps=model.layer_norm_eps,
                  rope_parameters=parameters, rope_theta=model.rope_theta, rope_scaling=scaling,
                  attention_dropout=model.attention_dropout_rate, use_cache=True,
                  bos_token_id=specials.get("bos_token_id"), eos_token_id=specials.get("eos_token_id"),
                  pad_token_id=specials.get("pad_token_id"))
    if model_type == "mistral":
        return dict(fields, sliding_window=None)
    return dict(fields, attention_bias=model.use_bias, mlp_bias=model.use_bias, pretraining_tp=1)


def export_type(model: ModelConfig, architecture: str) -> str:
    """The model_type `architecture` writes for this model (a llama run may be written as mistral)."""
    model_type = exportable(model)
    types = ("llama", "mistral") if model_type == "llama" else (model_type,)
    for t in types:
        if architecture in ARCHITECTURES[t]:
            return t
    choices = [a for t in types for a in ARCHITECTURES[t] if a != "BertForPreTraining"]
    raise HFError(f"architecture={architecture!r}: a {model_type} run exports as {' or '.join(choices)}.")


def hf_config_from_model(model: ModelConfig, architecture: str, vocab_size: int, dtype: str,
                         specials: Optional[dict] = None) -> dict:
    """config.json for `architecture` (one of ARCHITECTURES[model_type]) with `vocab_size` rows.
    `specials`: {'bos_token_id', 'eos_token_id', 'pad_token_id'} from the tokenizer."""
    model_type = export_type(model, architecture)
    specials = specials or {}
    common = dict(architectures=[architecture], model_type=model_type, vocab_size=vocab_size, dtype=dtype,
                  torch_dtype=dtype,  # transformers < 5 reads torch_dtype, 5 reads dtype
                  initializer_range=model.init_std, tie_word_embeddings=model.tie_embeddings)
    if model_type in LLAMA_TYPES:
        return dict(common, **_llama_out(model, model_type, specials))
    if model_type == "gpt2":
        return dict(common, n_embd=model.d_model, n_head=model.num_heads, n_layer=model.num_layers,
                    n_inner=None if model.d_ff == 4 * model.d_model else model.d_ff, n_positions=model.max_len,
                    activation_function=ACTIVATIONS_OUT[model.activation], layer_norm_epsilon=model.layer_norm_eps,
                    resid_pdrop=model.dropout_rate, embd_pdrop=model.dropout_rate,
                    attn_pdrop=model.attention_dropout_rate, scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, add_cross_attention=False,
                    bos_token_id=specials.get("bos_token_id"), eos_token_id=specials.get("eos_token_id"),
                    pad_token_id=specials.get("pad_token_id"))
    return dict(common, hidden_size=model.d_model, num_attention_heads=model.num_heads,
                num_hidden_layers=model.num_layers, intermediate_size=model.d_ff,
                max_position_embeddings=model.max_len, hidden_act=ACTIVATIONS_OUT[model.activation],
                layer_norm_eps=model.layer_norm_eps, hidden_dropout_prob=model.dropout_rate,
                attention_probs_dropout_prob=model.attention_dropout_rate,
                type_vocab_size=max(1, model.type_vocab_size),  # 0 here: one all-zero row there adds nothing
                position_embedding_type="absolute", is_decoder=False, add_cross_attention=False,
                pad_token_id=specials.get("pad_token_id"))
