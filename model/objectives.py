"""Training objectives: what a packed row of tokens becomes, and the loss on it.

  causal_lm  (GPT, decoder-only):  predict token t+1 from tokens <= t
  masked_lm  (BERT, encoder-only): predict the original ids at 15% selected positions
  prefix_lm  (encoder-decoder):    the encoder reads a prefix, the decoder writes
                                   its continuation (T5's prefix LM, Raffel et al. 2020 §3.3.2)

Each objective has two halves, kept side by side because they must agree: the
*features* (numpy, in the input pipeline: a batch of packed rows -> the arrays the
model and the loss read) and the *loss* (jax, in the train step). All three losses
are token-level cross entropy weighted by `loss_mask`, so padding, cross-document
targets and unselected MLM positions contribute nothing. Which family uses which
objective, and the batch keys each produces, is written once in `families.py`.

Rows are [B, row_len] token ids; `tokenizer` is any object with eot_id, pad_id,
bos_id, mask_id, special_ids and vocab_size (train/data/tokenizers.py has two).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

# ----------------------------------------------------------------------------- features (numpy)


def segments_and_positions(rows: np.ndarray, eot_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row document numbers (1, 2, ...; 0 = padding) and positions within them.

    A document starts at each `eot` and at the start of a row, so positions are
    always < row length (a document continued from the previous row restarts at 0)."""
    starts = rows == eot_id
    starts[:, 0] = True
    segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)
    index = np.arange(rows.shape[1], dtype=np.int32)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    positions = (index - last_start).astype(np.int32)
    padding = rows == pad_id
    segment_ids[padding] = 0
    positions[padding] = 0
    return segment_ids, positions


# Every features function takes the same arguments (the pipeline passes them all); each uses
# the ones its objective needs: rows [B, row_len], the tokenizer, and keyword-only
#   lengths (tokens per side), stream_positions [B] (each row's place in the data stream),
#   seed, salt (train / eval), mask_rate (BERT's 15%).


def causal_lm_features(rows: np.ndarray, tokenizer, *, lengths, stream_positions, seed, salt,
                       mask_rate) -> dict[str, np.ndarray]:
    """Rows of T + 1 tokens -> inputs and targets of T (the row shifted by one). A target
    counts only inside the input's document, so the `eot` that starts the next one never does."""
    rows = np.asarray(rows, dtype=np.int32)
    seg, pos = segments_and_positions(rows, tokenizer.eot_id, tokenizer.pad_id)
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    return {
        "inputs": rows[:, :-1],
        "targets": rows[:, 1:],
        "segment_ids": seg[:, :-1],
        "positions": pos[:, :-1],
        "loss_mask": same_doc.astype(np.float32),
    }


@functools.lru_cache(maxsize=8)
def _regular_ids(vocab_size: int, special_ids: tuple) -> np.ndarray:
    ids = np.arange(vocab_size, dtype=np.int32)
    return ids[~np.isin(ids, np.asarray(special_ids))]


def regular_ids(tokenizer) -> np.ndarray:
    """Ids that are real text (not special): what BERT's "random token" draws from."""
    return _regular_ids(tokenizer.vocab_size, tuple(int(i) for i in tokenizer.special_ids))


def mask_row(row: np.ndarray, rng: np.random.Generator, special_ids, mask_id: int,
             regular: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one row (Devlin et al. 2019, §3.1): (inputs, selected). Exactly
    round(rate * n) of the n eligible positions (at least one) are selected; of those 80%
    become mask_id, 10% a random regular token, 10% stay. Specials and padding never are."""
    eligible = np.flatnonzero(~np.isin(row, special_ids))
    inputs, selected = row.copy(), np.zeros(row.shape, bool)
    if eligible.size == 0:
        return inputs, selected
    count = max(1, round(rate * eligible.size))
    chosen = rng.choice(eligible, size=count, replace=False)
    draw = rng.random(count)
    to_mask, to_random = chosen[draw < 0.8], chosen[(draw >= 0.8) & (draw < 0.9)]
    inputs[to_mask] = mask_id
    inputs[to_random] = rng.choice(regular, size=to_random.size)
    selected[chosen] = True
    return inputs, selected


def masked_lm_features(rows: np.ndarray, tokenizer, *, lengths, stream_positions: np.ndarray, seed: int,
                       salt: int, mask_rate: float) -> dict[str, np.ndarray]:
    """Rows of T tokens -> masked inputs, original targets, loss_mask 1 at the selected
    positions. Each row's masking is drawn from numpy Generators seeded by (seed, salt,
    stream position), so every epoch masks a row differently (RoBERTa's dynamic masking)
    and reproducibly."""
    rows = np.asarray(rows, dtype=np.int32)
    regular = regular_ids(tokenizer)
    specials = np.asarray(tokenizer.special_ids)
    seg, pos = segments_and_positions(rows, tokenizer.eot_id, tokenizer.pad_id)
    masked = [
        mask_row(row, np.random.default_rng([seed, salt, int(p)]), specials, tokenizer.mask_id, regular, mask_rate)
        for row, p in zip(rows, stream_positions)
    ]
    return {
        "inputs": np.stack([m[0] for m in masked]),
        "targets": rows,
        "loss_mask": np.stack([m[1] for m in masked]).astype(np.float32),
        "segment_ids": seg,
        "positions": pos,
        "token_types": np.zeros_like(rows),
    }


def prefix_lm_features(rows: np.ndarray, tokenizer, *, lengths: dict, stream_positions, seed, salt,
                       mask_rate) -> dict[str, np.ndarray]:
    """Rows of encoder + decoder tokens -> the encoder reads the first lengths['encoder'],
    the decoder writes the rest. The split is fixed (T5 draws it at random) so shapes are
    static. A target counts only if it belongs to the document of the last encoder token
    (the one being continued); later documents and padding get decoder_segment_ids 0 and
    loss_mask 0. decoder_segment_ids equals the continued document's encoder segment id,
    so the cross-attention mask shows the decoder that document's prefix only."""
    rows = np.asarray(rows, dtype=np.int32)
    encoder_len = lengths["encoder"]
    seg, pos = segments_and_positions(rows, tokenizer.eot_id, tokenizer.pad_id)
    targets = rows[:, encoder_len:]
    continued = seg[:, encoder_len - 1 : encoder_len]  # document of the last encoder token
    same_doc = (seg[:, encoder_len:] == continued) & (continued != 0)
    decoder_positions = np.broadcast_to(np.arange(targets.shape[1], dtype=np.int32), targets.shape)
    bos = np.full((rows.shape[0], 1), tokenizer.bos_id, np.int32)
    return {
        "encoder_inputs": rows[:, :encoder_len],
        "encoder_segment_ids": seg[:, :encoder_len],
        "encoder_positions": pos[:, :encoder_len],
        "decoder_inputs": np.concatenate([bos, targets[:, :-1]], axis=1),
        "decoder_targets": targets,
        "decoder_segment_ids": np.where(same_doc, continued, 0).astype(np.int32),
        "decoder_positions": np.where(same_doc, decoder_positions, 0).astype(np.int32),
        "loss_mask": same_doc.astype(np.float32),
    }


# ----------------------------------------------------------------------------- loss (jax)


def weighted_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                           label_smoothing: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(sum of weighted token losses, sum of weights, weighted count of correct argmax)."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    labels = jax.nn.one_hot(targets, vocab, dtype=jnp.float32)
    if label_smoothing:
        labels = optax.smooth_labels(labels, label_smoothing)
    losses = optax.softmax_cross_entropy(logits, labels)
    weights = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return (losses * weights).sum(), weights.sum(), (correct * weights).sum()


def loss_sums(family, model, params, batch: dict, rng: Optional[jax.Array] = None, *, train: bool = False,
              label_smoothing: float = 0.0):
    """(loss sum, weight sum, correct count) of one batch: the model reads the family's
    inputs, the loss its target and `loss_mask`. `family` is a families.Family."""
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    logits = model.apply({"params": params}, **family.model_inputs(batch), deterministic=not train, rngs=rngs)
    return weighted_cross_entropy(logits, batch[family.target], batch["loss_mask"], label_smoothing)


def loss_fn(family, model, params, batch: dict, rng: Optional[jax.Array], *, train: bool,
            label_smoothing: float = 0.0):
    """(mean loss, aux) with aux['weight'] = the number of predicted tokens (see accumulate_gradients)."""
    loss_sum, weight, correct = loss_sums(family, model, params, batch, rng, train=train,
                                          label_smoothing=label_smoothing)
    mean = loss_sum / jnp.maximum(weight, 1.0)
    return mean, {"weight": weight, "accuracy": correct / jnp.maximum(weight, 1.0)}
