"""Generation for the three families, one jit-compiled loop each.

Decoder-only (`generate`): prefill the prompts in one pass that fills the KV cache
(model/attention.py, decode=True), then one token per step of a `lax.while_loop`,
each step attending over the cache instead of recomputing the whole prefix.
Sampling: greedy (temperature 0), temperature, top-k, top-p; a row stops at the
caller's end-of-text id, the loop stops when every row has.

Prompts of different lengths: right-padded to the longest, prefilled together at
positions 0..P-1, then each row's cache index is reset to its own length, so the
first new token of row b is written at slot (= position) len_b and overwrites the
padding. Per-row cache indices (not left padding) keep a token's cache slot equal to
its position, so learned position tables see the same positions as in training.

Encoder-decoder (`translate`): `encode` once, then `decode(..., decode=True)` one
target token per step. Cross attention recomputes K, V from the encoder output at
each step (cheap at these sizes; not cached). Greedy, or `beam_search`: scores are
sums of log-probabilities; with `length_penalty` alpha > 0 hypotheses are ranked by
score / ((5 + length) / 6) ** alpha (Wu et al. 2016, GNMT) at every step; alpha = 0
(default) is no length normalization.

Encoder-only (`fill_masks`): one forward pass, argmax of the MLM logits at the mask ids.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from .build import build_model
from .families import family_of
from .stack import unstack_layers

# A family's `generation` task -> the function here that does it (model/families.py).
GENERATION = {"continue": "generate", "translate": "translate", "fill_masks": "fill_masks"}
_KV_CACHED = ("continue", "translate")  # the tasks whose loops decode with a KV cache


def _require(config, task: str, what: str) -> None:
    """A clear error when `what` is called on a family whose task is another one."""
    family = family_of(config)
    if family.generation != task:
        raise ValueError(f"{what} is for models whose task is {task!r}, not family={family.name!r} "
                         f"(task {family.generation!r}): use {GENERATION[family.generation]}().")


def holds_unrolled_copy(config) -> bool:
    """Whether generating holds a second, unrolled copy of the weights (`_unrolled`): the
    KV-cached loops of a scanned stack. Memory plans add it."""
    return config.scan_layers and family_of(config).generation in _KV_CACHED

NEG_INF = -1e9  # finite, so sums and length normalization stay NaN-free


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the next token. temperature 0 = greedy; top_k 0 and top_p 1 = off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:  # NaN compared False: sampled garbage
            raise ValueError(f"temperature={self.temperature} is invalid: use 0 (greedy) or a positive number.")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} is invalid: use 0 (off) or a positive count such as 40.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} is invalid: use a probability in (0, 1], 1 = off.")


@dataclasses.dataclass(frozen=True)
class Generated:
    """tokens [B, N]: the new tokens (after a row's eot, eot again); num_tokens [B]: how
    many each row produced, its eot included."""

    tokens: np.ndarray
    num_tokens: np.ndarray
    eot_id: int

    def rows(self) -> list[list[int]]:
        """Each row's new tokens, without the end-of-text."""
        return [[int(t) for t in row[:n] if t != self.eot_id] for row, n in zip(self.tokens, self.num_tokens)]


# ----------------------------------------------------------------------------- sampling

def filter_logits(logits: jnp.ndarray, top_k: int = 0, top_p: float = 1.0) -> jnp.ndarray:
    """[..., V] -> same, with tokens outside the top-k / top-p nucleus set to -inf."""
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
        keep = before < top_p  # always keeps the most likely token
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_token(logits: jnp.ndarray, rng: jax.Array, sampling: Sampling) -> jnp.ndarray:
    """logits [B, V] -> token ids [B] int32."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits.astype(jnp.float32) / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- KV cache

def init_cache(model: nn.Module, batch: int, cache_len: int, encoded_len: Optional[int] = None):
    """Zeroed 'cache' collection for `batch` rows of `cache_len` slots, without touching params.

    The cache takes the sequence length that init runs with (model/attention.py), so we
    trace init at [batch, cache_len] under eval_shape and allocate zeros of those shapes.
    encoded_len: source length, for the encoder-decoder's `decode` method.
    """
    ids = jnp.zeros((batch, cache_len), jnp.int32)
    positions = jnp.zeros_like(ids)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
    if encoded_len is None:
        init = functools.partial(model.init, rngs, ids, positions, decode=True)
    else:
        encoded = jnp.zeros((batch, encoded_len, model.config.d_model), model.config.dtype)
        init = functools.partial(model.init, rngs, encoded, ids, positions, decode=True, method="decode")
    shapes = jax.eval_shape(init)["cache"]
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _map_cache_leaves(cache, name: str, fn):
    def visit(path, leaf):
        return fn(leaf) if getattr(path[-1], "key", None) == name else leaf
    return jax.tree_util.tree_map_with_path(visit, cache)


def set_cache_index(cache, index: jnp.ndarray):
    """Every layer's cache_index := index [B] (scanned caches hold [layers, B])."""
    return _map_cache_leaves(cache, "cache_index", lambda leaf: jnp.broadcast_to(index, leaf.shape).astype(leaf.dtype))


def reorder_cache(cache, rows: jnp.ndarray, scanned: bool):
    """Gather cache rows (beam search keeps the parents' caches); batch is axis 1 when scanned."""
    return jax.tree_util.tree_map(lambda leaf: jnp.take(leaf, rows, axis=1 if scanned else 0), cache)


def _unrolled(model: nn.Module, params):
    """The model and weights the decoding loops run: the same layers, unrolled (scan_layers=False).

    Why: a scanned stack holds each weight as one [layers, ...] array, and in the scan's
    body XLA's CPU backend copies layer l's slice out of it before each matmul, and the
    scan writes the KV cache it carries into a fresh stacked buffer, on every decoded
    token: the weights cross memory three times instead of once. Unrolled, each layer
    reads its own arrays (docs/benchmarks.md, generation, has the measured before and
    after). Same weights and maths; a second copy of the weights is held while generating.
    """
    cfg = model.config
    if not cfg.scan_layers:
        return model, params
    unrolled = build_model(cfg.replace(scan_layers=False, remat_policy="none"))  # remat only matters for gradients
    return unrolled, _unstack(params, cfg.num_layers)


# Its own program, not part of a loop's: slicing the weights inside the loop's program made
# XLA's compile of that program several times longer, and this one depends only on the
# parameter shapes, so `magic`'s persistent compile cache serves it for every prompt.
_unstack = jax.jit(unstack_layers, static_argnums=1)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to [B, P] int32, P = max(longest, width); also return their lengths [B]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists; "
                         "start an empty prompt with the end-of-text id, as training documents do.")
    lengths = np.array([len(p) for p in prompts], np.int32)
    ids = np.full((len(prompts), max(int(lengths.max()), width)), pad_id, np.int32)
    for row, p in zip(ids, prompts):
        row[: len(p)] = np.asarray(p, np.int32)
    return ids, lengths


def _check_fits(config, needed: int, what: str):
    if needed > config.max_len:
        raise ValueError(f"{what} = {needed} tokens exceeds the model's max_len={config.max_len}: "
                         "shorten the prompt or lower max_new_tokens.")


def _num_tokens(tokens: np.ndarray, eot_id: int) -> np.ndarray:
    is_eot = tokens == eot_id
    return np.where(is_eot.any(1), is_eot.argmax(1) + 1, tokens.shape[1]).astype(np.int32)


# ----------------------------------------------------------------------------- decoder-only

@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "cache_len"))
def _decoder_loop(model, params, ids, lengths, rng, eot_id, *, max_new_tokens, sampling, cache_len):
    batch, prompt_len = ids.shape
    variables = {"params": params}

    def step(cache, tokens, positions):
        logits, state = model.apply({**variables, "cache": cache}, tokens, positions, decode=True, mutable=["cache"])
        return logits, state["cache"]

    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), ids.shape)
    logits, cache = step(init_cache(model, batch, cache_len), ids, positions)
    cache = set_cache_index(cache, lengths)  # each row continues right after its own prompt
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    rng, sub = jax.random.split(rng)
    token = sample_token(last, sub, sampling)
    out = jnp.full((batch, max_new_tokens), eot_id, jnp.int32).at[:, 0].set(token)

    def cond(state):
        i, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, out, token, done, cache, rng = state
        logits, cache = step(cache, token[:, None], (lengths + i - 1)[:, None])
        rng, sub = jax.random.split(rng)
        token = jnp.where(done, eot_id, sample_token(logits[:, 0], sub, sampling))
        return i + 1, out.at[:, i].set(token), token, done | (token == eot_id), cache, rng

    state = (jnp.int32(1), out, token, token == eot_id, cache, rng)
    return jax.lax.while_loop(cond, body, state)[1]


def generate(model: nn.Module, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eot_id: int,
             sampling: Sampling = Sampling(), rng: Optional[jax.Array] = None, width: int = 0) -> Generated:
    """Continue each prompt (a list of token ids) with up to `max_new_tokens` new tokens.
    `width`: pad the prompts to at least this many positions, so callers with prompts of many
    lengths (the eval harness) reuse one compiled loop per width instead of one per length."""
    _require(model.config, "continue", "generate()")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: use a positive count.")
    ids, lengths = pad_prompts(prompts, width=width)
    cache_len = ids.shape[1] + max_new_tokens - 1  # the last new token is never fed back
    _check_fits(model.config, cache_len, "longest prompt + max_new_tokens - 1")
    rng = jax.random.key(0) if rng is None else rng
    model, params = _unrolled(model, params)
    tokens = np.asarray(_decoder_loop(model, params, jnp.asarray(ids), jnp.asarray(lengths), rng, jnp.int32(eot_id),
                                      max_new_tokens=max_new_tokens, sampling=sampling, cache_len=cache_len))
    return Generated(tokens, _num_tokens(tokens, eot_id), eot_id)


# ----------------------------------------------------------------------------- encoder-decoder

def _encode_sources(model, params, sources):
    ids, lengths = pad_prompts(sources)
    segments = jnp.asarray((np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int32))
    encoded = model.apply({"params": params}, jnp.asarray(ids), encoder_segment_ids=segments, method="encode")
    return encoded, segments


def _decode_step(model, params, encoded, segments, cache, tokens, position):
    """One target token per row at `position` -> (log-probs [rows, V], new cache)."""
    positions = jnp.full((tokens.shape[0], 1), position, jnp.int32)
    logits, state = model.apply({"params": params, "cache": cache}, encoded, tokens[:, None], positions,
                                encoder_segment_ids=segments, decode=True, mutable=["cache"], method="decode")
    return jax.nn.log_softmax(logits[:, 0], axis=-1), state["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "beam_size", "length_penalty"))
def _beam_loop(model, params, encoded, segments, bos_id, eot_id, *, max_new_tokens, beam_size, length_penalty):
    batch, k = encoded.shape[0], beam_size
    encoded, segments = jnp.repeat(encoded, k, axis=0), jnp.repeat(segments, k, axis=0)  # row b*k + j
    cache = init_cache(model, batch * k, max_new_tokens, encoded.shape[1])
    vocab_eot = jnp.arange(model.config.vocab_size) == eot_id

    def rank(score, length):
        return score / ((5.0 + length) / 6.0) ** length_penalty if length_penalty else score

    def body(state):
        i, tokens, scores, lengths, done, last, cache = state
        logp, cache = _decode_step(model, params, encoded, segments, cache, last, i)
        logp = logp.reshape(batch, k, -1)
        logp = jnp.where(done[..., None], jnp.where(vocab_eot, 0.0, NEG_INF), logp)  # finished: only eot, free
        cand_scores = scores[..., None] + logp  # [B, k, V]
        cand_lengths = jnp.where(done, lengths, lengths + 1)[..., None].astype(jnp.float32)
        flat_rank = rank(cand_scores, cand_lengths).reshape(batch, -1)
        _, best = jax.lax.top_k(flat_rank, k)  # [B, k] indices into k * V
        parent, token = best // logp.shape[-1], (best % logp.shape[-1]).astype(jnp.int32)
        scores = jnp.take_along_axis(cand_scores.reshape(batch, -1), best, axis=1)
        lengths = jnp.take_along_axis(jnp.where(done, lengths, lengths + 1), parent, axis=1)
        done = jnp.take_along_axis(done, parent, axis=1) | (token == eot_id)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1).at[:, :, i].set(token)
        rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
        cache = reorder_cache(cache, rows, model.config.scan_layers)
        return i + 1, tokens, scores, lengths, done, token.reshape(-1), cache

    def cond(state):
        return (state[0] < max_new_tokens) & ~jnp.all(state[4])

    scores = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (batch, 1))  # start from one hypothesis
    state = (jnp.int32(0), jnp.full((batch, k, max_new_tokens), eot_id, jnp.int32), scores,
             jnp.zeros((batch, k), jnp.int32), jnp.zeros((batch, k), bool), jnp.full((batch * k,), bos_id, jnp.int32),
             cache)
    _, tokens, scores, lengths, _, _, _ = jax.lax.while_loop(cond, body, state)
    return tokens, scores, rank(scores, lengths.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _greedy_seq2seq_loop(model, params, encoded, segments, bos_id, eot_id, *, max_new_tokens):
    batch = encoded.shape[0]

    def body(state):
        i, out, last, done, cache = state
        logp, cache = _decode_step(model, params, encoded, segments, cache, last, i)
        token = jnp.where(done, eot_id, jnp.argmax(logp, axis=-1).astype(jnp.int32))
        return i + 1, out.at[:, i].set(token), token, done | (token == eot_id), cache

    state = (jnp.int32(0), jnp.full((batch, max_new_tokens), eot_id, jnp.int32), jnp.full((batch,), bos_id, jnp.int32),
             jnp.zeros((batch,), bool), init_cache(model, batch, max_new_tokens, encoded.shape[1]))
    return jax.lax.while_loop(lambda s: (s[0] < max_new_tokens) & ~jnp.all(s[3]), body, state)[1]


def _check_seq2seq(model, max_new_tokens):
    _require(model.config, "translate", "translate() / beam_search()")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: use a positive count.")
    _check_fits(model.config, max_new_tokens, "max_new_tokens")


def translate(model: nn.Module, params, sources: Sequence[Sequence[int]], *, bos_id: int, eot_id: int,
              max_new_tokens: int, beam_size: int = 1, length_penalty: float = 0.0) -> Generated:
    """Greedy (beam_size 1) or beam-search target tokens for each source token list."""
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} is invalid: use 1 (greedy) or more (beam search).")
    if beam_size > 1:
        return beam_search(model, params, sources, bos_id=bos_id, eot_id=eot_id, max_new_tokens=max_new_tokens,
                           beam_size=beam_size, length_penalty=length_penalty)[0]
    _check_seq2seq(model, max_new_tokens)
    encoded, segments = _encode_sources(model, params, sources)
    model, params = _unrolled(model, params)
    tokens = np.asarray(_greedy_seq2seq_loop(model, params, encoded, segments, jnp.int32(bos_id), jnp.int32(eot_id),
                                             max_new_tokens=max_new_tokens))
    return Generated(tokens, _num_tokens(tokens, eot_id), eot_id)


def beam_search(model: nn.Module, params, sources: Sequence[Sequence[int]], *, bos_id: int, eot_id: int,
                max_new_tokens: int, beam_size: int = 4, length_penalty: float = 0.0):
    """-> (best hypothesis per source as Generated, all beams [B, k, N], their ranking scores [B, k])."""
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} is invalid: use a positive count (1 = greedy).")
    if not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty={length_penalty} is invalid: use a finite GNMT alpha, e.g. 0.6 (0 = none).")
    if length_penalty < 0:
        raise ValueError(f"length_penalty={length_penalty} is invalid: use 0 (none) or a positive alpha such as 0.6.")
    _check_seq2seq(model, max_new_tokens)
    encoded, segments = _encode_sources(model, params, sources)
    model, params = _unrolled(model, params)
    tokens, _, ranked = _beam_loop(model, params, encoded, segments, jnp.int32(bos_id), jnp.int32(eot_id),
                                   max_new_tokens=max_new_tokens, beam_size=beam_size,
                                   length_penalty=float(length_penalty))
    tokens, ranked = np.asarray(tokens), np.asarray(ranked)
    best = tokens[np.arange(len(tokens)), ranked.argmax(1)]
    return Generated(best, _num_tokens(best, eot_id), eot_id), tokens, ranked


# ----------------------------------------------------------------------------- encoder-only

def fill_masks(model: nn.Module, params, ids: np.ndarray, mask_id: int,
               banned_ids: Sequence[int] = ()) -> np.ndarray:
    """ids [B, T] with `mask_id` holes -> the same ids, each hole the MLM argmax there."""
    _require(model.config, "fill_masks", "fill_masks()")
    if ids.shape[1] > model.config.max_len:  # past the position table every row would read garbage
        raise ValueError(f"ids are {ids.shape[1]} tokens; the model reads at most model.max_len="
                         f"{model.config.max_len}: shorten the text.")
    return np.asarray(_fill(model, params, jnp.asarray(ids, jnp.int32), jnp.int32(mask_id), tuple(banned_ids)))


@functools.partial(jax.jit, static_argnames=("model", "banned_ids"))
def _fill(model, params, ids, mask_id, banned_ids):
    logits = model.apply({"params": params}, ids)
    if banned_ids:
        logits = logits.at[..., jnp.asarray(banned_ids)].set(NEG_INF)
    return jnp.where(ids == mask_id, jnp.argmax(logits, -1), ids)


# ----------------------------------------------------------------------------- text and runs

MASK_MARKER = "[MASK]"  # in an encoder-only prompt, each marker becomes one mask id


def generate_text(config, params, tokenizer, prompt: str, *, prefix: Sequence[int], max_new_tokens: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
    """prompt + its continuation by a decoder-only model. `prefix` goes before the prompt's ids
    (the caller's convention: our tokenizers' end-of-text, which starts every training document;
    nothing for an imported GPT-2, as in `transformers`); generation stops at end-of-text."""
    if not prefix and not len(tokenizer.encode(prompt)):
        raise ValueError("the prompt is empty and no start token goes before it: give a prompt, or --bos.")
    ids = [int(i) for i in prefix] + [int(i) for i in tokenizer.encode(prompt)]
    room = config.max_len - len(ids) + 1  # the last new token is never fed back
    if max_new_tokens > room:
        raise ValueError(f"max_new_tokens={max_new_tokens} is beyond the context: the prompt takes {len(ids)} of the "
                         f"model's {config.max_len} positions (model.max_len), so at most {max(room, 0)} new tokens "
                         f"fit: lower max_new_tokens or shorten the prompt.")
    out = generate(build_model(config), params, [ids], max_new_tokens=max_new_tokens,
                   eot_id=tokenizer.eot_id, sampling=Sampling(temperature, top_k, top_p), rng=jax.random.key(seed))
    return prompt + tokenizer.decode(out.rows()[0])
