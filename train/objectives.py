"""Training objectives: which batch keys feed the model, and the loss.

  causal_lm  (decoder-only):    predict token t+1 from tokens <= t
  masked_lm  (encoder-only):    predict the original ids at BERT's 15% selected positions
  seq2seq    (encoder-decoder): predict the decoder targets from the encoder input
All three are token-level cross entropy weighted by `loss_mask`, so padding,
cross-document targets and unselected MLM positions contribute nothing.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

FAMILY_INPUTS = {
    "decoder": {"inputs": "inputs", "positions": "positions", "segment_ids": "segment_ids"},
    "encoder": {"inputs": "inputs", "positions": "positions", "segment_ids": "segment_ids",
                "token_types": "token_types"},
    "encoder_decoder": {"encoder_inputs": "encoder_inputs", "decoder_inputs": "decoder_inputs",
                        "encoder_positions": "encoder_positions", "decoder_positions": "decoder_positions",
                        "encoder_segment_ids": "encoder_segment_ids",
                        "decoder_segment_ids": "decoder_segment_ids"},
}
TARGET_KEY = {"decoder": "targets", "encoder": "targets", "encoder_decoder": "decoder_targets"}


def model_inputs(family: str, batch: dict) -> dict:
    """The model's keyword arguments, taken from a pipeline batch."""
    return {arg: batch[key] for arg, key in FAMILY_INPUTS[family].items() if key in batch}


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


def loss_fn(model, family: str, params, batch: dict, rng: Optional[jax.Array], *, train: bool,
            label_smoothing: float = 0.0):
    """(mean loss, aux) with aux['weight'] = the number of predicted tokens (see accumulate_gradients)."""
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    logits = model.apply({"params": params}, **model_inputs(family, batch), deterministic=not train, rngs=rngs)
    loss_sum, weight, correct = weighted_cross_entropy(logits, batch[TARGET_KEY[family]], batch["loss_mask"],
                                                       label_smoothing)
    mean = loss_sum / jnp.maximum(weight, 1.0)
    return mean, {"weight": weight, "accuracy": correct / jnp.maximum(weight, 1.0)}
