"""Tensor names and shapes: a Hugging Face checkpoint's tensors <-> our parameter tree.

One table per family (`hf_tensors`) lists every tensor of the Hugging Face model with its
shape, the group of heads it belongs to, and the parameters of ours it holds (`Piece`s).
Both directions read the same table, so import and export cannot disagree:

* import: `to_ours(piece, tensor)`: the HF tensor (one layer's) -> our array for that layer;
* export: `to_hf(tensor, arrays)`: our arrays (one layer's) -> the HF tensor.

The conventions that differ (all checked against transformers in tests/fixtures/hf):
* GPT-2's Conv1D stores weights [in, out]; BERT's and Llama's nn.Linear store [out, in]
  (transposed here).
* Llama's q_proj and k_proj need no permutation: our RoPE pairs dimension i with i + d_k/2,
  transformers' rotate_half convention. Its k_proj/v_proj have num_key_value_heads heads.
* GPT-2 fuses Q, K and V in one `c_attn` [d, 3d]: three column blocks, each head-major.
* Our projections keep heads as an axis: query [d, H, d_k], output [H, d_k, d].
* Our embedding table (and BERT's output bias) is padded to a multiple of 128 rows; the
  checkpoint has `vocab_size` rows; padding rows are zeros and their logits are masked.
* Layers are stacked on a leading axis when the stack is scanned ('decoder/layers/...'),
  separate ('decoder/layer_3/...') when it is not.

`canonical` reads the variants found in the wild: with or without the `transformer.` /
`bert.` prefix, TF-era `gamma`/`beta` LayerNorm names, the MLM bias as
`cls.predictions.bias` or `cls.predictions.decoder.bias`; `IGNORED` lists buffers and
heads we have no use for (GPT-2's causal-mask `attn.bias`, BERT's `position_ids`, the NSP
head).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import numpy as np

from matrixmagic.configs import ModelConfig

# Groups: 'base' is in every architecture; the others depend on the head (ARCHITECTURE_GROUPS).
ARCHITECTURE_GROUPS = {
    "GPT2LMHeadModel": ("base", "lm_head"),
    "GPT2Model": ("base",),
    "BertForMaskedLM": ("base", "mlm"),
    "BertForPreTraining": ("base", "pooler", "mlm", "nsp"),
    "BertModel": ("base", "pooler"),
    "LlamaForCausalLM": ("base", "lm_head"),
    "LlamaModel": ("base",),
    "MistralForCausalLM": ("base", "lm_head"),
    "MistralModel": ("base",),
}
# the base model's prefix inside a model with a head
PREFIX = {"gpt2": "transformer.", "bert": "bert.", "llama": "model.", "mistral": "model."}
PREFIXED = {"GPT2LMHeadModel", "BertForMaskedLM", "BertForPreTraining", "LlamaForCausalLM", "MistralForCausalLM"}
IGNORED = (
    re.compile(r"^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),  # Llama's RoPE buffer (transformers < 4.38)
    re.compile(r"^h\.\d+\.(attn|crossattention)\.(bias|masked_bias)$"),  # GPT-2's causal-mask buffers
    re.compile(r"^embeddings\.(position_ids|token_type_ids)$"),  # BERT's index buffers
    re.compile(r"^cls\.seq_relationship\.(weight|bias)$"),  # BERT's next-sentence head: we have none
)
NSP = ("cls.seq_relationship.weight", "cls.seq_relationship.bias")


@dataclasses.dataclass(frozen=True)
class Piece:
    """One parameter of ours inside an HF tensor (a column block of it when it has several)."""

    ours: str  # path in our tree; '{layer}' stands for 'layers' (scanned) or 'layer_<i>'
    shape: tuple[int, ...]  # our shape for one layer
    transpose: bool = False  # HF stores [out, in] (nn.Linear); ours is [in, out]
    vocab_axis: Optional[int] = None  # our axis padded to the table's rows (HF has vocab_size)


@dataclasses.dataclass(frozen=True)
class HFTensor:
    name: str  # canonical name (no base prefix); '{i}' = the layer index
    shape: tuple[int, ...]
    group: str
    pieces: tuple[Piece, ...]  # () = nothing of ours (exported as zeros: BERT's token types when we have none)

    @property
    def layered(self) -> bool:
        return "{i}" in self.name

    def at(self, layer: Optional[int]) -> str:
        return self.name.format(i=layer) if self.layered else self.name


def _linear(ours: str, n_in: tuple, n_out: tuple, transpose: bool) -> tuple[Piece, Piece]:
    return (Piece(f"{ours}/kernel", n_in + n_out, transpose), Piece(f"{ours}/bias", n_out))


def _norm(ours: str, d: int) -> tuple[Piece, Piece]:
    return Piece(f"{ours}/scale", (d,)), Piece(f"{ours}/bias", (d,))


def _gpt2(m: ModelConfig, vocab: int) -> list[HFTensor]:
    d, heads, dk, ff = m.d_model, m.num_heads, m.head_dim, m.d_ff
    layer = "decoder/{layer}"
    qkv = [_linear(f"{layer}/self_attention/{n}", (d,), (heads, dk), False) for n in ("query", "key", "value")]
    proj = _linear(f"{layer}/self_attention/output", (heads, dk), (d,), False)
    fc, out = _linear(f"{layer}/feed_forward/hidden", (d,), (ff,), False), \
        _linear(f"{layer}/feed_forward/output", (ff,), (d,), False)
    ln1, ln2, lnf = _norm(f"{layer}/self_attention_norm", d), _norm(f"{layer}/feed_forward_norm", d), \
        _norm("final_norm", d)
    tensors = [
        HFTensor("wte.weight", (vocab, d), "base", (Piece("token_embedding/embedding", (m.vocab_size, d),
                                                          vocab_axis=0),)),
        HFTensor("wpe.weight", (m.max_len, d), "base", (Piece("position_embedding/embedding", (m.max_len, d)),)),
        HFTensor("h.{i}.ln_1.weight", (d,), "base", ln1[:1]), HFTensor("h.{i}.ln_1.bias", (d,), "base", ln1[1:]),
        HFTensor("h.{i}.attn.c_attn.weight", (d, 3 * d), "base", tuple(p[0] for p in qkv)),
        HFTensor("h.{i}.attn.c_attn.bias", (3 * d,), "base", tuple(p[1] for p in qkv)),
        HFTensor("h.{i}.attn.c_proj.weight", (d, d), "base", proj[:1]),
        HFTensor("h.{i}.attn.c_proj.bias", (d,), "base", proj[1:]),
        HFTensor("h.{i}.ln_2.weight", (d,), "base", ln2[:1]), HFTensor("h.{i}.ln_2.bias", (d,), "base", ln2[1:]),
        HFTensor("h.{i}.mlp.c_fc.weight", (d, ff), "base", fc[:1]),
        HFTensor("h.{i}.mlp.c_fc.bias", (ff,), "base", fc[1:]),
        HFTensor("h.{i}.mlp.c_proj.weight", (ff, d), "base", out[:1]),
        HFTensor("h.{i}.mlp.c_proj.bias", (d,), "base", out[1:]),
        HFTensor("ln_f.weight", (d,), "base", lnf[:1]), HFTensor("ln_f.bias", (d,), "base", lnf[1:]),
    ]
    if not m.tie_embeddings:
        tensors.append(HFTensor("lm_head.weight", (vocab, d), "lm_head", (
            Piece("output_head/unembedding/kernel", (d, m.vocab_size), transpose=True, vocab_axis=1),)))
    return tensors


def _bert(m: ModelConfig, vocab: int) -> list[HFTensor]:
    d, heads, dk, ff = m.d_model, m.num_heads, m.head_dim, m.d_ff
    layer, hf = "encoder/{layer}", "encoder.layer.{i}"

    def linear(hf_name, ours, n_in, n_out, group="base"):
        kernel, bias = _linear(ours, n_in, n_out, True)
        return [HFTensor(f"{hf_name}.weight", (math.prod(n_out), math.prod(n_in)), group, (kernel,)),
                HFTensor(f"{hf_name}.bias", (math.prod(n_out),), group, (bias,))]

    def norm(hf_name, ours, group="base"):
        scale, bias = _norm(ours, d)
        return [HFTensor(f"{hf_name}.weight", (d,), group, (scale,)), HFTensor(f"{hf_name}.bias", (d,), group, (bias,))]

    types = max(1, m.type_vocab_size)
    tensors = [
        HFTensor("embeddings.word_embeddings.weight", (vocab, d), "base",
                 (Piece("token_embedding/embedding", (m.vocab_size, d), vocab_axis=0),)),
        HFTensor("embeddings.position_embeddings.weight", (m.max_len, d), "base",
                 (Piece("position_embedding/embedding", (m.max_len, d)),)),
        HFTensor("embeddings.token_type_embeddings.weight", (types, d), "base",
                 (Piece("token_type_embedding/embedding", (types, d)),) if m.type_vocab_size else ()),
        *norm("embeddings.LayerNorm", "embedding_norm"),
    ]
    for name in ("query", "key", "value"):
        tensors += linear(f"{hf}.attention.self.{name}", f"{layer}/self_attention/{name}", (d,), (heads, dk))
    tensors += linear(f"{hf}.attention.output.dense", f"{layer}/self_attention/output", (heads, dk), (d,))
    tensors += norm(f"{hf}.attention.output.LayerNorm", f"{layer}/self_attention_norm")
    tensors += linear(f"{hf}.intermediate.dense", f"{layer}/feed_forward/hidden", (d,), (ff,))
    tensors += linear(f"{hf}.output.dense", f"{layer}/feed_forward/output", (ff,), (d,))
    tensors += norm(f"{hf}.output.LayerNorm", f"{layer}/feed_forward_norm")
    tensors += linear("pooler.dense", "pooler", (d,), (d,), "pooler")
    tensors += linear("cls.predictions.transform.dense", "mlm_head/transform", (d,), (d,), "mlm")
    tensors += norm("cls.predictions.transform.LayerNorm", "mlm_head/transform_norm", "mlm")
    tensors.append(HFTensor("cls.predictions.bias", (vocab,), "mlm",
                            (Piece("mlm_head/output_head/bias", (m.vocab_size,), vocab_axis=0),)))
    if not m.tie_embeddings:
        tensors.append(HFTensor("cls.predictions.decoder.weight", (vocab, d), "mlm", (
            Piece("mlm_head/output_head/unembedding/kernel", (d, m.vocab_size), transpose=True, vocab_axis=1),)))
    return tensors


def _llama(m: ModelConfig, vocab: int) -> list[HFTensor]:
    """Llama and Mistral (the same names): nn.Linear [out, in]; biases only with use_bias."""
    d, heads, kv, dk, ff = m.d_model, m.num_heads, m.kv_heads, m.head_dim, m.d_ff
    layer, hf = "decoder/{layer}", "layers.{i}"

    def linear(hf_name, ours, n_in, n_out):
        kernel, bias = _linear(ours, n_in, n_out, True)
        return [HFTensor(f"{hf_name}.weight", (math.prod(n_out), math.prod(n_in)), "base", (kernel,)),
                *([HFTensor(f"{hf_name}.bias", (math.prod(n_out),), "base", (bias,))] if m.use_bias else [])]

    def norm(hf_name, ours):
        return HFTensor(f"{hf_name}.weight", (d,), "base", (Piece(f"{ours}/scale", (d,)),))

    tensors = [HFTensor("embed_tokens.weight", (vocab, d), "base",
                        (Piece("token_embedding/embedding", (m.vocab_size, d), vocab_axis=0),)),
               norm(f"{hf}.input_layernorm", f"{layer}/self_attention_norm")]
    for name, ours, n_heads in (("q_proj", "query", heads), ("k_proj", "key", kv), ("v_proj", "value", kv)):
        tensors += linear(f"{hf}.self_attn.{name}", f"{layer}/self_attention/{ours}", (d,), (n_heads, dk))
    tensors += linear(f"{hf}.self_attn.o_proj", f"{layer}/self_attention/output", (heads, dk), (d,))
    tensors.append(norm(f"{hf}.post_attention_layernorm", f"{layer}/feed_forward_norm"))
    for name, ours in (("gate_proj", "gate"), ("up_proj", "hidden")):
        tensors += linear(f"{hf}.mlp.{name}", f"{layer}/feed_forward/{ours}", (d,), (ff,))
    tensors += linear(f"{hf}.mlp.down_proj", f"{layer}/feed_forward/output", (ff,), (d,))
    tensors.append(norm("norm", "final_norm"))
    if not m.tie_embeddings:
        tensors.append(HFTensor("lm_head.weight", (vocab, d), "lm_head", (
            Piece("output_head/unembedding/kernel", (d, m.vocab_size), transpose=True, vocab_axis=1),)))
    return tensors


TABLES = {"gpt2": _gpt2, "bert": _bert, "llama": _llama, "mistral": _llama}


def hf_tensors(model_type: str, model: ModelConfig, vocab: int) -> list[HFTensor]:
    """Every tensor of the HF model of this shape (all groups), `vocab` rows in its tables."""
    return TABLES[model_type](model, vocab)


def saved_name(model_type: str, architecture: str, tensor: HFTensor, layer: Optional[int]) -> str:
    """The name `save_pretrained` gives the tensor in `architecture`: base tensors prefixed
    inside a model with a head."""
    name = tensor.at(layer)
    return PREFIX[model_type] + name if tensor.group == "base" and architecture in PREFIXED else name


def canonical(model_type: str, name: str) -> str:
    """A checkpoint's tensor name in the table's spelling: base prefix dropped, TF-era
    LayerNorm gamma/beta as weight/bias, the MLM bias under its one name."""
    name = name.removeprefix(PREFIX[model_type])
    if re.search(r"(LayerNorm|ln_\w+)\.(gamma|beta)$", name):
        name = name[: name.rfind(".")] + (".weight" if name.endswith("gamma") else ".bias")
    return "cls.predictions.bias" if name == "cls.predictions.decoder.bias" else name


def is_ignored(name: str) -> bool:
    return any(p.match(name) for p in IGNORED)


def our_path(piece: Piece, layer: Optional[int], scanned: bool) -> tuple[str, Optional[int]]:
    """(path in our tree, index on its leading layer axis or None)."""
    if "{layer}" not in piece.ours:
        return piece.ours, None
    if scanned:
        return piece.ours.format(layer="layers"), layer
    return piece.ours.format(layer=f"layer_{layer}"), None


def _blocks(tensor: HFTensor) -> list[tuple[int, int]]:
    """Column range of each piece in the tensor's last axis (several only for GPT-2's c_attn)."""
    rows = math.prod(tensor.shape[:-1])
    widths = [math.prod(p.shape) // rows if p.vocab_axis is None else tensor.shape[-1] for p in tensor.pieces]
    starts = np.cumsum([0] + widths)
    return list(zip(starts[:-1].tolist(), starts[1:].tolist()))


def _pad_vocab(x: np.ndarray, axis: int, rows: int) -> np.ndarray:
    if x.shape[axis] == rows:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rows - x.shape[axis])
    return np.pad(x, pad)


def to_ours(tensor: HFTensor, piece: Piece, value: np.ndarray) -> np.ndarray:
    """One layer's HF tensor -> our array of `piece` (same dtype)."""
    begin, end = _blocks(tensor)[tensor.pieces.index(piece)]
    x = value[..., begin:end] if len(tensor.pieces) > 1 else value
    if piece.transpose:
        x = x.T
    if piece.vocab_axis is not None:
        return _pad_vocab(x, piece.vocab_axis, piece.shape[piece.vocab_axis])
    return x.reshape(piece.shape)


def to_hf(tensor: HFTensor, arrays: list[np.ndarray], dtype) -> np.ndarray:
    """Our arrays (one per piece, one layer's) -> the HF tensor in `dtype`."""
    if not tensor.pieces:
        return np.zeros(tensor.shape, dtype)
    blocks = []
    for piece, x in zip(tensor.pieces, arrays):
        if piece.vocab_axis is not None:
            x = np.take(x, np.arange(tensor.shape[0]), axis=piece.vocab_axis)  # the checkpoint's rows only
        if piece.transpose:  # ours [in, out] (in may be several axes) -> HF [out, in]
            blocks.append(x.reshape(tensor.shape[1], -1).T)
        else:
            blocks.append(x.reshape(tensor.shape[:-1] + (-1,)))
    return np.concatenate(blocks, axis=-1).astype(dtype) if len(blocks) > 1 else blocks[0].astype(dtype)
