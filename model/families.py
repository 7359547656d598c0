"""The three model families, one record each: everything that differs between them.

A `Family` owns its model class, its objective (the features the input pipeline
builds from packed rows, and the loss), the batch it trains on (every key with
its side, dtype and so its shape), the key the loss predicts, and how one packed
row is split between encoder and decoder. It also owns what the rest of the code
would otherwise branch on its name for: its closed-form parameter count (in its
model module), how many attention and FFN sublayers a token passes through per
layer (FLOPs and memory plans), whether its self-attention is causal, how it
generates, how the evaluation harness scores it, and its Hugging Face model type.
The pipeline, the train and eval steps, the AOT lowering, accounting, planning,
generation, evaluation and `magic explain` all read these records, so a fourth
family is one more record here plus its model module.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import numpy as np

from matrixmagic.configs import ModelConfig
from matrixmagic.configs.model_config import FAMILIES, FAMILY_SIDES, side_lengths
from matrixmagic.configs.model_config import Family as FamilyName

from . import decoder_only, encoder_decoder, encoder_only, objectives


@dataclasses.dataclass(frozen=True)
class BatchKey:
    """One array of a training batch: [batch, length of its side], of `dtype`."""

    name: str
    side: str  # 'encoder' or 'decoder': which length its second axis has
    dtype: str = "int32"


def _keys(side: str, *names: str, **dtypes: str) -> tuple[BatchKey, ...]:
    return tuple(BatchKey(n, side, dtypes.get(n, "int32")) for n in names)


@dataclasses.dataclass(frozen=True)
class Family:
    name: FamilyName  # ModelConfig.family's value
    model: type  # the flax.linen Module; built as model(config)
    objective: str  # its name in objectives.py (printed in the run header)
    features: Callable[..., dict]  # objectives.<objective>_features: packed rows -> the batch
    batch: tuple[BatchKey, ...]  # what features returns
    model_input_keys: tuple[str, ...]  # batch keys passed to model(**...) by the same names
    token_inputs: tuple[str, ...]  # of those, the token ids (example_inputs fills them with zeros)
    target: str  # the batch key the loss predicts (weighted by 'loss_mask')
    closed_form_params: Callable[[ModelConfig], dict]  # {'model', 'mlm_head'} from the config alone
    causal: bool  # its (decoder's) self-attention sees only earlier positions
    attention_sublayers: int  # attention sublayers per layer index a token passes (enc-dec: 3)
    ffn_sublayers: int  # FFNs per layer index a token passes (enc-dec: 2)
    generation: str  # its task in generate.GENERATION: 'continue', 'translate' or 'fill_masks'
    likelihood: Optional[str]  # how the eval harness scores text: 'causal', 'seq2seq', None (cannot)
    hf_model_type: Optional[str]  # its Hugging Face counterpart's model_type (None: none)
    explain_prelude: Callable  # magic explain's stages before the walked layer (its model module)
    explain_head: Callable  # ... and between the last layer and the final linear
    shifted: bool = False  # a row holds one extra token (inputs and targets shifted by one)
    head_reported_apart: bool = False  # its paper counts the model without the pre-training head (BERT)

    @property
    def sides(self) -> tuple[str, ...]:
        """The stacks, in row order: ('decoder',), ('encoder',) or ('encoder', 'decoder')."""
        return FAMILY_SIDES[self.name]

    @property
    def cross_attention(self) -> bool:
        """Whether its decoder layers attend to an encoder's output (both stacks present)."""
        return len(self.sides) == 2

    def lengths(self, seq_len: int) -> dict[str, int]:
        """Tokens per side for a run's data.seq_len (configs.model_config.side_lengths)."""
        return side_lengths(self.name, seq_len)

    def row_len(self, seq_len: int) -> int:
        """Tokens in one packed row: the sides end to end, +1 for a shifted objective."""
        return sum(self.lengths(seq_len).values()) + int(self.shifted)

    def batch_shapes(self, batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, int], np.dtype]]:
        """{key: ((batch_size, length of its side), dtype)}: the contract of `features`."""
        lengths = self.lengths(seq_len)
        return {k.name: ((batch_size, lengths[k.side]), np.dtype(k.dtype)) for k in self.batch}

    def make_batch(self, rows: np.ndarray, tokenizer, seq_len: int, *, stream_positions=None, seed: int = 0,
                   salt: int = 0, mask_rate: float = 0.15) -> dict[str, np.ndarray]:
        """The batch of packed rows [B, row_len(seq_len)] under this family's objective."""
        positions = np.arange(len(rows)) if stream_positions is None else stream_positions
        return self.features(rows, tokenizer, lengths=self.lengths(seq_len), stream_positions=positions, seed=seed,
                             salt=salt, mask_rate=mask_rate)

    def model_inputs(self, batch: Mapping) -> dict:
        """The model's keyword arguments, taken from a batch (keys it lacks are left out)."""
        return {k: batch[k] for k in self.model_input_keys if k in batch}


_TEXT = ("inputs", "positions", "segment_ids")

FAMILY_RECORDS: dict[str, Family] = {
    "decoder": Family(
        name="decoder", model=decoder_only.DecoderOnlyLM, objective="causal_lm",
        features=objectives.causal_lm_features,
        batch=_keys("decoder", "inputs", "targets", "positions", "segment_ids", "loss_mask", loss_mask="float32"),
        model_input_keys=_TEXT, token_inputs=("inputs",), target="targets", shifted=True,
        closed_form_params=decoder_only.closed_form_params,
        explain_prelude=decoder_only.explain_prelude, explain_head=decoder_only.explain_head, causal=True, attention_sublayers=1, ffn_sublayers=1,
        generation="continue", likelihood="causal", hf_model_type="gpt2"),
    "encoder": Family(
        name="encoder", model=encoder_only.EncoderOnlyLM, objective="masked_lm",
        features=objectives.masked_lm_features,
        batch=_keys("encoder", "inputs", "targets", "positions", "segment_ids", "loss_mask", "token_types",
                    loss_mask="float32"),
        model_input_keys=(*_TEXT, "token_types"), token_inputs=("inputs",), target="targets",
        closed_form_params=encoder_only.closed_form_params,
        explain_prelude=encoder_only.explain_prelude, explain_head=encoder_only.explain_head, causal=False, attention_sublayers=1, ffn_sublayers=1,
        generation="fill_masks", likelihood=None, hf_model_type="bert", head_reported_apart=True),
    "encoder_decoder": Family(
        name="encoder_decoder", model=encoder_decoder.EncoderDecoderLM, objective="prefix_lm",
        features=objectives.prefix_lm_features,
        closed_form_params=encoder_decoder.closed_form_params,
        explain_prelude=encoder_decoder.explain_prelude, explain_head=encoder_decoder.explain_head, causal=True, attention_sublayers=3, ffn_sublayers=2,
        generation="translate", likelihood="seq2seq", hf_model_type=None,
        batch=(_keys("encoder", "encoder_inputs", "encoder_segment_ids", "encoder_positions")
               + _keys("decoder", "decoder_inputs", "decoder_targets", "decoder_segment_ids", "decoder_positions",
                       "loss_mask", loss_mask="float32")),
        model_input_keys=("encoder_inputs", "decoder_inputs", "encoder_positions", "decoder_positions",
                          "encoder_segment_ids", "decoder_segment_ids"),
        token_inputs=("encoder_inputs", "decoder_inputs"), target="decoder_targets"),
}
assert tuple(FAMILY_RECORDS) == FAMILIES, "configs.model_config.FAMILIES and the records must agree"


def family_of(family: "str | ModelConfig") -> Family:
    """The record of a family name or of a ModelConfig's family."""
    name = family.family if isinstance(family, ModelConfig) else family
    return FAMILY_RECORDS[name]
