"""Hugging Face `config.json` <-> our ModelConfig, both ways.

GPT-2 is our decoder with pre-LN, learned positions, biases, GELU (tanh form) and a tied
head; BERT is our encoder with post-LN, learned positions, segment embeddings, exact
GELU, a pooler and the masked-LM head. Every HF field that changes the forward pass
either maps to a field of ours or, when we cannot express it, is an error naming the
field, its value and what we support (before any tensor is read). Fields that only
matter to training in PyTorch or to other heads are listed in `Translation.notes`.

The embedding table is translated unpadded here (vocab_size = the checkpoint's rows);
the import pads it to a multiple of 128 together with the tokenizer's extra ids
(train/hf/api.py), and the export writes back only the checkpoint's rows.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, cast

from matrixmagic.configs import ModelConfig
from matrixmagic.configs.model_config import DType, suggest
from matrixmagic.model.families import FAMILY_RECORDS, family_of

from .errors import HFError

ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
    "bert": ("BertForMaskedLM", "BertForPreTraining", "BertModel"),
}
# model_type -> our family, from the family records' own hf_model_type (model/families.py)
FAMILY_OF = {f.hf_model_type: f.name for f in FAMILY_RECORDS.values() if f.hf_model_type}
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


def _get(hf: dict, name: str, default=None, *aliases):
    for key in (name, *aliases):
        if key in hf and hf[key] is not None:
            return hf[key]
    return default


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
    d = int(_get(hf, "n_embd", 768, "hidden_size"))
    resid, embd = _get(hf, "resid_pdrop", 0.1), _get(hf, "embd_pdrop", 0.1)
    if embd != resid:
        notes.append(f"embd_pdrop={embd} differs from resid_pdrop={resid}: one dropout_rate here, {resid} (training "
                     f"only)")
    return dict(vocab_size=int(_get(hf, "vocab_size", 50257)), d_model=d,
                num_heads=int(_get(hf, "n_head", 12, "num_attention_heads")),
                num_layers=int(_get(hf, "n_layer", 12, "num_hidden_layers")),
                d_ff=int(_get(hf, "n_inner", 4 * d)), max_len=int(_get(hf, "n_positions", 1024, "max_position_embeddings")),
                activation=_activation("gpt2", "activation_function", _get(hf, "activation_function", "gelu_new")),
                norm_position="pre", positional="learned", type_vocab_size=0,
                layer_norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)), dropout_rate=float(resid),
                attention_dropout_rate=float(_get(hf, "attn_pdrop", 0.1)))


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
    return dict(vocab_size=int(_get(hf, "vocab_size", 30522)), d_model=int(_get(hf, "hidden_size", 768)),
                num_heads=int(_get(hf, "num_attention_heads", 12)), num_layers=int(_get(hf, "num_hidden_layers", 12)),
                d_ff=int(_get(hf, "intermediate_size", 3072)), max_len=int(_get(hf, "max_position_embeddings", 512)),
                activation=_activation("bert", "hidden_act", _get(hf, "hidden_act", "gelu")),
                norm_position="post", positional="learned", type_vocab_size=int(_get(hf, "type_vocab_size", 2)),
                layer_norm_eps=float(_get(hf, "layer_norm_eps", 1e-12)),
                dropout_rate=float(_get(hf, "hidden_dropout_prob", 0.1)),
                attention_dropout_rate=float(_get(hf, "attention_probs_dropout_prob", 0.1)))


def model_config_from_hf(hf: dict, param_dtype: str = "float32") -> Translation:
    """ModelConfig of a Hugging Face config.json (a dict); HFError for what we cannot express."""
    model_type, arch = architecture_of(hf)
    notes: list[str] = []
    fields = _gpt2(hf, notes) if model_type == "gpt2" else _bert(hf, notes)
    try:
        model = ModelConfig(family=FAMILY_OF[model_type], tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                            scale_embeddings=False, use_bias=True, init_std=float(_get(hf, "initializer_range", 0.02)),
                            param_dtype=cast(DType, param_dtype), **fields)  # ModelConfig checks the name
    except ValueError as err:  # ConfigError: e.g. hidden size not divisible by the heads
        raise HFError(f"config.json: {err}") from None
    return Translation(model, model_type, arch, tuple(notes))


# ----------------------------------------------------------------------------- ours -> HF


def exportable(model: ModelConfig) -> str:
    """The model_type a ModelConfig exports as, or an error naming the field that stops it."""
    model_type = family_of(model).hf_model_type
    if model_type is None:
        raise HFError(f"model.family={model.family} has no Hugging Face counterpart here; "
                      + " and ".join(f"{t} ({f})" for t, f in FAMILY_OF.items()) + " export.")
    norm = "pre" if model_type == "gpt2" else "post"
    needs = {"norm_position": norm, "positional": "learned", "use_bias": True, "scale_embeddings": False}
    if model_type == "gpt2":
        needs["type_vocab_size"] = 0
    for field, value in needs.items():
        if getattr(model, field) != value:
            raise HFError(f"model.{field}={getattr(model, field)!r}: {model_type} needs {value!r}, so this run cannot "
                          f"be exported as {model_type}.")
    return model_type


def hf_config_from_model(model: ModelConfig, architecture: str, vocab_size: int, dtype: str,
                         specials: Optional[dict] = None) -> dict:
    """config.json for `architecture` (one of ARCHITECTURES[model_type]) with `vocab_size` rows.
    `specials`: {'bos_token_id', 'eos_token_id', 'pad_token_id'} from the tokenizer."""
    model_type = exportable(model)
    if architecture not in ARCHITECTURES[model_type]:
        raise HFError(f"architecture={architecture!r}: a {model_type} run exports as "
                      f"{' or '.join(a for a in ARCHITECTURES[model_type] if a != 'BertForPreTraining')}.")
    specials = specials or {}
    common = dict(architectures=[architecture], model_type=model_type, vocab_size=vocab_size, dtype=dtype,
                  torch_dtype=dtype,  # transformers < 5 reads torch_dtype, 5 reads dtype
                  initializer_range=model.init_std, tie_word_embeddings=model.tie_embeddings)
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
