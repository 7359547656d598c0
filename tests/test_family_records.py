"""The family and option records (model/families.py, model/positional.py) say what the rest
of the code used to branch on a family's name for; each claim is checked here against the
model itself: its parameter tree, a forward pass, the generation functions."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from matrixmagic.configs import get_preset
from matrixmagic.model.accounting import param_shapes
from matrixmagic.model.build import build_model, init_params
from matrixmagic.model.families import FAMILY_RECORDS, family_of
from matrixmagic.model.generate import GENERATION, fill_masks, generate, holds_unrolled_copy, translate
from matrixmagic.model.positional import POSITIONAL_KINDS, position_table_params
from matrixmagic.train.hf.config import FAMILY_OF

TINY = {"decoder": "gpt-tiny", "encoder": "bert-tiny", "encoder_decoder": "transformer-tiny"}


def tiny(family: str, **changes):
    return get_preset(TINY[family]).model.replace(**changes)


def _modules(cfg, leaf: str) -> set:
    """Distinct module paths whose parameter `leaf` (e.g. query/kernel) is in the tree."""
    return {path[:-2] for path in param_shapes(cfg) if path[-2:] == tuple(leaf.split("/"))}


@pytest.mark.parametrize("family", FAMILY_RECORDS)
def test_sublayer_counts_match_the_parameter_tree(family):
    # Unrolled, so each layer's modules are distinct paths: attention and FFN sublayers per layer.
    cfg = tiny(family, scan_layers=False)
    record = family_of(cfg)
    assert len(_modules(cfg, "query/kernel")) == record.attention_sublayers * cfg.num_layers
    assert len(_modules(cfg, "hidden/kernel")) == record.ffn_sublayers * cfg.num_layers
    crossing = any("cross_attention" in path for path in param_shapes(cfg))
    assert record.cross_attention == crossing
    assert {path[0] for path in param_shapes(cfg)} >= set(record.sides)  # each side is a stack of its own


@pytest.mark.parametrize("family", FAMILY_RECORDS)
def test_causal_means_later_tokens_do_not_reach_earlier_positions(family):
    cfg = tiny(family, max_len=16)
    record = family_of(cfg)
    model = build_model(cfg)
    params = init_params(cfg, jax.random.key(0))
    ids = np.arange(1, 9, dtype=np.int32)[None]
    changed = ids.copy()
    changed[0, -1] = 42

    def logits(x):
        # the decoder side is the one whose mask the record describes (enc-dec: the encoder is bidirectional)
        inputs = {"encoder_inputs": ids, "decoder_inputs": x} if record.cross_attention else {"inputs": x}
        return np.asarray(model.apply({"params": params}, **inputs))

    first_moved = not np.allclose(logits(ids)[0, 0], logits(changed)[0, 0], atol=1e-6)
    assert first_moved == (not record.causal)


def test_each_family_generates_only_through_its_own_task():
    assert {record.generation for record in FAMILY_RECORDS.values()} == set(GENERATION)
    calls = {"continue": lambda m: generate(m, None, [[1, 2]], max_new_tokens=1, eot_id=0),
             "translate": lambda m: translate(m, None, [[1, 2]], bos_id=1, eot_id=0, max_new_tokens=1),
             "fill_masks": lambda m: fill_masks(m, None, np.ones((1, 4), np.int32), mask_id=3)}
    for name, record in FAMILY_RECORDS.items():
        model = build_model(tiny(name))
        for task, call in calls.items():
            if task != record.generation:
                with pytest.raises(ValueError, match=f"use {GENERATION[record.generation]}"):
                    call(model)


@pytest.mark.parametrize("family", FAMILY_RECORDS)
def test_unrolled_copy_only_for_kv_cached_loops_of_a_scanned_stack(family):
    record = FAMILY_RECORDS[family]
    assert holds_unrolled_copy(tiny(family, scan_layers=True)) == (record.generation != "fill_masks")
    assert not holds_unrolled_copy(tiny(family, scan_layers=False))


def test_hugging_face_types_come_from_the_records():
    # the records' own types (the decoder's default, gpt2), and the Llama-shaped decoders train/hf adds
    assert FAMILY_OF == {"gpt2": "decoder", "bert": "encoder", "llama": "decoder", "mistral": "decoder",
                         "qwen2": "decoder"}
    assert family_of("encoder_decoder").hf_model_type is None


@pytest.mark.parametrize("kind", POSITIONAL_KINDS)
def test_positional_kind_counts_its_own_weights(kind):
    cfg = tiny("decoder", positional=kind)
    table = [shape for path, shape in param_shapes(cfg).items() if path[0] == "position_embedding"]
    assert position_table_params(cfg) == sum(int(np.prod(shape)) for shape in table)
    fixed = POSITIONAL_KINDS[kind].fixed_table
    assert (fixed is None) == bool(table)  # a kind is either trained or known without weights
