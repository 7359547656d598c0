"""Scoring token sequences: the log-probability a decoder-only model gives a continuation
after a context, the one computation behind the harness's `loglikelihood`,
`loglikelihood_rolling` and `magic eval --text`.

A request is (context ids, continuation ids). As in lm-evaluation-harness's own `hf`
backend, the model reads `(context + continuation)[-(max_len + 1):][:-1]` (the context
is cut on the left when the whole does not fit) and the continuation's tokens are the
targets of the last `len(continuation)` positions. The answer is the sum of their
log-probabilities (natural log, float32 softmax) and whether each was the argmax.

Batching: requests are sorted longest first and cut into batches of `batch_size`; a
batch is right-padded to a length bucket (bucket_length: powers of two to 128, then
multiples of 128, capped at max_len), and the rows to `batch_size`. The model is causal,
so padding on the right changes nothing before it. One compiled program per bucket, for
any number of requests. Logits are made only at the continuation's positions (padded to a
bucket too): the vocabulary projection is the costliest matmul per position.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from matrixmagic.configs import ConfigError
from matrixmagic.model.build import build_model
from matrixmagic.model.families import family_of

MIN_BUCKET, POW2_UP_TO, STEP = 16, 128, 128


def bucket_length(n: int, max_len: int) -> int:
    """The padded length of a batch whose longest row is n tokens: a power of two from 16 up to
    128, then a multiple of 128 (at most max_len/128 + 4 compiled shapes). On a hellaswag-like
    workload (docs/benchmarks-eval.md) powers of two padded to 1.50x the real positions, these
    to 1.27x."""
    length = MIN_BUCKET
    while length < min(n, POW2_UP_TO):
        length *= 2
    if n > POW2_UP_TO:
        length = -(-n // STEP) * STEP
    return min(length, max_len)


def window(context: Sequence[int], continuation: Sequence[int], max_len: int) -> tuple[list[int], list[int], int]:
    """(inputs, targets, n): what the model reads, what each position should predict, and how
    many trailing positions are the continuation's. The harness's truncation rule."""
    if not continuation:
        raise ValueError("a request has an empty continuation: there is nothing to score.")
    if not context:
        raise ValueError("a request has no context token: start it with the prompt's start token.")
    if len(continuation) > max_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the model's {max_len} "
                         f"positions (model.max_len).")
    whole = [*context, *continuation][-(max_len + 1):]
    return whole[:-1], whole[1:], len(continuation)


def _picked(logits: jnp.ndarray, targets: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    logits = logits.astype(jnp.float32)
    # log p = logit[target] - logsumexp(logits): no [B, T, vocab] log-softmax beside the logits
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    return picked, jnp.argmax(logits, axis=-1) == targets


def _token_logprobs(model, params, ids: jnp.ndarray, at: jnp.ndarray, targets: jnp.ndarray):
    """ids [B, T], at and targets [B, K] -> (log p(target) at those positions [B, K] float32, target
    is the argmax [B, K]). Logits are made at `at` only (DecoderOnlyLM logits_at)."""
    return _picked(model.apply({"params": params}, ids, deterministic=True, logits_at=at), targets)


def _seq2seq_logprobs(model, params, sources, source_segments, inputs, segments, targets):
    """Encoder-decoder: sources [B, S] (segment 1, padding 0) and the decoder's inputs and targets
    [B, T] -> the same pair as _token_logprobs, for the decoder's positions."""
    logits = model.apply({"params": params}, sources, inputs, encoder_segment_ids=source_segments,
                         decoder_segment_ids=segments, deterministic=True)
    return _picked(logits, targets)



def check_scorable(config, what: str) -> None:
    """`what` (magic eval, lm-eval, perplexity) needs the family's left-to-right likelihood."""
    family = family_of(config)
    if family.likelihood is None:
        raise ConfigError(f"{what} needs a left-to-right likelihood of text, and this run's family ({family.name}, "
                          "BERT-style) gives none; a pseudo-likelihood would be another measure. Decoder-only and "
                          "encoder-decoder runs are supported.")

class Scorer:
    """Scores (context, continuation) requests with a decoder-only model's weights, or an
    encoder-decoder's: the encoder reads the context (cut on the left to max_len), the decoder
    starts from `bos_id` and is scored on the continuation, as the model was trained
    (model/objectives.prefix_lm_features)."""

    def __init__(self, config, params, batch_size: int = 16, bos_id: Optional[int] = None):
        check_scorable(config, "scoring text")
        self.seq2seq = family_of(config).likelihood == "seq2seq"
        if self.seq2seq and bos_id is None:
            raise ValueError("an encoder-decoder scorer needs the decoder's start id (bos_id).")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: use 1 or more rows per batch.")
        self.config, self.batch_size, self.bos_id = config, batch_size, bos_id
        self.use_params(params)
        self.max_len = config.max_len
        self.model = build_model(config)
        self._fn = jax.jit(functools.partial(_seq2seq_logprobs if self.seq2seq else _token_logprobs, self.model))
        self.shapes: set[tuple[int, ...]] = set()  # each one compiled once

    def use_params(self, params) -> None:
        """Score with these weights (placed once, not with every batch; same shapes, so evals
        during training reuse the compiled programs)."""
        self.params = jax.device_put(params)

    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
              progress: Optional[Callable[[int], None]] = None) -> list[tuple[float, bool]]:
        """[(sum of the continuation's log-probs, every token greedy)] in request order."""
        return [(float(lp.sum()), bool(g.all())) for lp, g in self.token_scores(requests, progress)]

    def token_scores(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                     progress: Optional[Callable[[int], None]] = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per request, each continuation token's log-prob (float64 of the float32 value) and
        whether it was the argmax, in request order."""
        if self.seq2seq:
            return self._seq2seq_scores(requests, progress)
        windows = [window(c, x, self.max_len) for c, x in requests]
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        out: list = [None] * len(windows)
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            length = bucket_length(len(windows[chosen[0]][0]), self.max_len)
            scored = bucket_length(max(windows[i][2] for i in chosen), length)  # continuation positions, padded
            ids = np.zeros((self.batch_size, length), np.int32)
            at = np.zeros((self.batch_size, scored), np.int32)
            targets = np.zeros((self.batch_size, scored), np.int32)
            for row, i in enumerate(chosen):
                inputs, wanted, n = windows[i]
                ids[row, :len(inputs)] = inputs
                at[row, :n], targets[row, :n] = np.arange(len(inputs) - n, len(inputs)), wanted[-n:]
            self.shapes.add((self.batch_size, length, scored))
            logprobs, greedy = jax.device_get(self._fn(self.params, ids, at, targets))
            for row, i in enumerate(chosen):
                n = windows[i][2]
                out[i] = (logprobs[row, :n].astype(np.float64), greedy[row, :n])
            if progress:
                progress(len(chosen))
        return out


    def _seq2seq_scores(self, requests, progress):
        pairs = []
        for context, continuation in requests:
            window(context, continuation, self.max_len)  # the same checks
            pairs.append((list(context)[-self.max_len:], list(continuation)))
        order = sorted(range(len(pairs)), key=lambda i: -max(len(pairs[i][0]), len(pairs[i][1])))
        out: list = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            s_len = bucket_length(max(len(pairs[i][0]) for i in chosen), self.max_len)
            t_len = bucket_length(max(len(pairs[i][1]) for i in chosen), self.max_len)
            arrays = [np.zeros((self.batch_size, n), np.int32) for n in (s_len, s_len, t_len, t_len, t_len)]
            sources, source_segments, inputs, segments, targets = arrays
            for row, i in enumerate(chosen):
                source, cont = pairs[i]
                sources[row, :len(source)], source_segments[row, :len(source)] = source, 1
                inputs[row, :len(cont)] = [self.bos_id, *cont[:-1]]
                segments[row, :len(cont)], targets[row, :len(cont)] = 1, cont
            self.shapes.add((self.batch_size, s_len, t_len))
            logprobs, greedy = jax.device_get(self._fn(self.params, *arrays))
            for row, i in enumerate(chosen):
                n = len(pairs[i][1])
                out[i] = (logprobs[row, :n].astype(np.float64), greedy[row, :n])
            if progress:
                progress(len(chosen))
        return out

def window_spans(n_tokens: int, n_start: int, max_len: int, stride: Optional[int] = None):
    """The windows of rolling_windows as index triples (read_from, score_from, end) into
    start + tokens, one at a time: a text of any length costs no memory here."""
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride={stride} is invalid: use 1..{max_len} (model.max_len; smaller = more context "
                         f"per token, more compute).")
    if not n_start:
        raise ValueError("scoring a text needs a start token before its first token (the model predicts every "
                         "token from what came before): use --bos.")
    if n_start > max_len:
        raise ValueError(f"the start ids ({n_start}) fill the model's {max_len} positions: nothing is left to score.")
    position, total = n_start, n_start + n_tokens
    while position < total:
        size = max_len + 1 - n_start if position == n_start else stride  # the first window has only the start
        end = min(position + size, total)
        yield max(0, end - max_len - 1), position, end
        position = end


def rolling_windows(tokens: Sequence[int], start: Sequence[int], max_len: int,
                    stride: Optional[int] = None) -> list[tuple[list[int], list[int]]]:
    """A text longer than the context, as (context, continuation) requests that score every
    token exactly once. Window k ends `stride` tokens after window k-1 and reads the max_len
    tokens before its end, so each scored token sees at least max_len - stride of context
    (stride = max_len: disjoint windows, the harness's `loglikelihood_rolling`). `start`
    (the prompt's start ids, at least one) comes before the first token."""
    whole = [*start, *tokens]
    return [(whole[a:b], whole[b:c]) for a, b, c in window_spans(len(tokens), len(start), max_len, stride)]
