"""A checkpoint's tensors, checked against the config, then placed into our sharded params.

`plan_import` reads nothing but the safetensors headers: every tensor is named
(canonical spelling, names.py), its shape checked against what config.json implies, and
missing, mis-shaped or unknown tensors are one error naming them, before a byte of
weights is read. Heads a checkpoint may lack are initialized and said so: BertForMaskedLM
has no pooler, BertModel no masked-LM head.

`place_params` builds each parameter with `jax.make_array_from_callback` from the
abstract sharded params: the callback gets the index of one device's shard and reads
just the tensors (the layers) that shard needs, cast to param_dtype. Host memory so
holds one tensor (or one shard of a stacked parameter) at a time, never a second copy
of the model, and on a mesh each device receives only its own shard.

`export_tensors` is the reverse: one HF tensor at a time from our (device) params.
"""

from __future__ import annotations

import dataclasses
import gc
import zlib
from typing import Callable, Optional

import jax
import numpy as np

from matrixmagic.configs import ModelConfig
from matrixmagic.train.integrity import flat_by_name

from . import names
from .errors import HFError
from .tensorfile import Planned, TensorInfo, read

SHOWN = 8  # names listed in one error


@dataclasses.dataclass(frozen=True)
class ImportPlan:
    tensors: tuple[names.HFTensor, ...]  # the table for this config
    sources: dict  # canonical name (layer index filled in) -> TensorInfo
    initialized: tuple[str, ...]  # groups not in the checkpoint, initialized here
    notes: tuple[str, ...]


def _listing(items: list[str]) -> str:
    more = f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return "; ".join(items[:SHOWN]) + more


def _expected(tensors, num_layers: int) -> dict[str, tuple[names.HFTensor, Optional[int]]]:
    return {t.at(i): (t, i) for t in tensors for i in (range(num_layers) if t.layered else [None])}


def plan_import(model_type: str, architecture: str, model: ModelConfig, vocab: int,
                infos: dict[str, TensorInfo]) -> ImportPlan:
    """Which file holds each tensor of ours; HFError for any tensor missing, mis-shaped or unknown."""
    tensors = tuple(names.hf_tensors(model_type, model, vocab))
    expected = _expected(tensors, model.num_layers)
    sources: dict[str, TensorInfo] = {}
    unknown: list[str] = []
    misshaped: list[str] = []
    notes: list[str] = []
    seen: dict[str, str] = {}  # canonical name -> the checkpoint's name for it
    tied = {"lm_head.weight", "cls.predictions.decoder.weight"} if model.tie_embeddings else set()
    for name, info in infos.items():
        canon = names.canonical(model_type, name)
        if canon in seen and canon in expected:
            if canon == "cls.predictions.bias":  # both spellings of the MLM bias: transformers ties them
                continue
            raise HFError(f"the checkpoint holds {seen[canon]!r} and {name!r}, the same tensor twice; keep one.")
        seen[canon] = name
        if canon in expected:
            shape = expected[canon][0].shape
            if tuple(info.shape) != shape:
                misshaped.append(f"{name}: {list(info.shape)} in {info.path}, config.json implies {list(shape)}")
            sources[canon] = info
        elif canon in tied:
            continue  # the tied head is the embedding table; transformers ignores the copy too
        elif names.is_ignored(canon):
            if canon in names.NSP and "NSP" not in "".join(notes):
                notes.append("next-sentence-prediction head (cls.seq_relationship) ignored: no NSP objective here")
        else:
            unknown.append(name)
    if misshaped:
        raise HFError(f"{len(misshaped)} tensor(s) do not have the shape config.json implies: {_listing(misshaped)}. "
                      f"The weights and config.json come from different models.")
    if unknown:
        raise HFError(f"{len(unknown)} tensor(s) belong to no part of a {model_type} {architecture} this importer "
                      f"knows: {_listing(sorted(unknown))}. Is config.json the one of these weights?")
    missing: dict[str, list[str]] = {}  # group -> its canonical names absent from the checkpoint
    for canon, (tensor, _) in expected.items():
        if canon not in sources:
            missing.setdefault(tensor.group, []).append(canon)
    initialized = []
    for group, absent in missing.items():
        whole = len(absent) == sum(1 for t, _ in expected.values() if t.group == group)
        if group in ("pooler", "mlm") and whole:
            initialized.append(group)
            what = {"pooler": "pooler (BertForMaskedLM has none): initialized; it does not change masked-LM logits",
                    "mlm": "masked-LM head: initialized, so filled masks mean nothing until it is fine-tuned"}[group]
            notes.append(f"not in the checkpoint: {what}")
        else:
            raise HFError(f"{len(absent)} tensor(s) missing from the checkpoint: {_listing(sorted(absent))}. The "
                          f"file is incomplete or its config.json is not this model's.")
    return ImportPlan(tensors, sources, tuple(initialized), tuple(notes))


def _sources_by_path(plan: ImportPlan, scanned: bool, num_layers: int) -> dict[str, list]:
    """our parameter path -> [(layer index on its leading axis or None, HF tensor, piece, canonical name)]."""
    out: dict[str, list] = {}
    for tensor in plan.tensors:
        for layer in (range(num_layers) if tensor.layered else [None]):
            for piece in tensor.pieces:
                path, index = names.our_path(piece, layer, scanned)
                out.setdefault(path, []).append((index, tensor, piece, tensor.at(layer)))
    return out


def _initial_value(path: str, shape, std: float, seed: int) -> np.ndarray:
    """What the model's own initializers give a parameter: LayerNorm scales 1, biases 0,
    weights N(0, init_std) (model/params.py, model/add_norm.py)."""
    if path.endswith("/scale"):
        return np.ones(shape, np.float32)
    if path.endswith("/bias"):
        return np.zeros(shape, np.float32)
    return np.random.default_rng([seed, zlib.crc32(path.encode())]).normal(0.0, std, shape).astype(np.float32)


def place_params(plan: ImportPlan, model: ModelConfig, abstract_params, seed: int = 0):
    """Params with `abstract_params`' shapes, dtypes and shardings, filled from the checkpoint
    one shard at a time (see the module docstring)."""
    by_path = _sources_by_path(plan, model.scan_layers, model.num_layers)
    initialized = {p.ours for t in plan.tensors if t.group in plan.initialized for p in t.pieces}

    def leaf(path, abstract):
        dtype = abstract.dtype
        entries = by_path.get(path)
        if entries is None:
            raise AssertionError(f"no tensor maps to our parameter {path}")  # the table and the model disagree

        def one(index_entry):
            _, tensor, piece, canon = index_entry
            if piece.ours in initialized:
                return _initial_value(path, piece.shape, model.init_std, seed)
            return names.to_ours(tensor, piece, read(plan.sources[canon]))

        if entries[0][0] is None:  # one tensor (or one layer of an unscanned stack)
            def fill(index):
                return np.asarray(one(entries[0])[index], dtype)
        else:  # [layers, ...]: this shard's layers only
            by_layer = sorted(entries, key=lambda e: e[0])

            def fill(index):
                layers = range(abstract.shape[0])[index[0]]
                return np.stack([np.asarray(one(by_layer[i])[index[1:]], dtype) for i in layers])
        return jax.make_array_from_callback(abstract.shape, abstract.sharding, fill)

    leaves = []
    for path, a in flat_by_name(abstract_params).items():  # tree order
        leaves.append(jax.block_until_ready(leaf(path, a)))
        gc.collect()  # the host buffers of the tensor just placed sit in reference cycles until collected
    return jax.tree.unflatten(jax.tree.structure(abstract_params), leaves)


# ----------------------------------------------------------------------------- export


def export_tensors(model_type: str, architecture: str, model: ModelConfig, vocab: int, params, dtype
                   ) -> tuple[list[Planned], Callable[[Planned], np.ndarray]]:
    """(the tensors `architecture` saves, in transformers' order, and a function producing each
    one from `params`, one at a time: a layer's slice of a stacked parameter is fetched alone)."""
    groups = names.ARCHITECTURE_GROUPS[architecture]
    tensors = [t for t in names.hf_tensors(model_type, model, vocab) if t.group in groups]
    flat = flat_by_name(params)
    planned, recipe = [], {}
    for tensor in tensors:
        for layer in (range(model.num_layers) if tensor.layered else [None]):
            name = names.saved_name(model_type, architecture, tensor, layer)
            planned.append(Planned(name, tensor.shape, np.dtype(dtype)))
            recipe[name] = (tensor, layer)

    def fetch(piece, layer) -> np.ndarray:
        path, index = names.our_path(piece, layer, model.scan_layers)
        value = flat[path]
        return np.asarray(jax.device_get(value if index is None else value[index]), np.float32)

    def produce(t: Planned) -> np.ndarray:
        tensor, layer = recipe[t.name]
        return names.to_hf(tensor, [fetch(p, layer) for p in tensor.pieces], t.dtype)

    return sorted(planned, key=lambda t: t.name), produce
