"""Batches for the three model families, as a pure function of (seed, step).

Why this shape: a resumed run must see exactly the batches an uninterrupted run would,
on any number of hosts. So nothing here is an iterator with hidden state:

1. Pack (once, cached). Every document is encoded and prefixed with `eot`; the
   documents are concatenated in the corpus's stored order and cut into rows of
   `row_len` tokens. A document longer than a row simply continues in the next row;
   only the very last row is padded (`pad_id`). The rows are saved as
   `<dataset dir>/packed/<split>.<tokenizer>.L<row_len>.v1.npy` and memory-mapped.
2. Order. A grain `MapDataset` over row ids is shuffled (a new permutation each
   epoch, all derived from `seed`) and repeated forever; stream position i holds one row.
   Global batch s is stream positions [s*B, (s+1)*B); process p computes only its rows
   p*B/P : (p+1)*B/P, by random access (`dataset[step]`), never by iterating.
3. Features, vectorized per batch. Segment ids count documents within a row (1, 2, ...;
   0 only for padding) and positions restart at 0 at each document start *and* at the
   start of a row, so positions are always < row length (a document continued from the
   previous row starts at position 0 again).

Batch contract (numpy, int32 unless noted, shape [B_local, T]):

* decoder:  inputs, targets (= the row shifted by one), segment_ids, positions,
  loss_mask (float32: the target is in the same document as the input and is not
  padding; so the `eot` that starts the next document is never a target).
* encoder (BERT MLM, rows of T): inputs (masked), targets (original ids), loss_mask
  (float32, 1 at the selected positions only), segment_ids, positions, token_types
  (zeros). 15% of non-special positions are selected (exactly round(0.15 n), at least
  one); of those 80% -> mask_id, 10% -> a random regular token, 10% unchanged. The
  randomness comes from numpy Generators seeded by (seed, stream position), so each
  epoch masks a row differently (RoBERTa's dynamic masking) and reproducibly.
* encoder_decoder (prefix LM, T5 Section 3.3.2): a packed window of encoder_len +
  decoder_len tokens; the encoder reads the first encoder_len, the decoder produces the
  next decoder_len. The split point is fixed (T5 draws it at random) so shapes are
  static. Honest by construction: a target counts only if it belongs to the same
  document as the last encoder token (the one being continued); later documents and
  padding get decoder_segment_ids 0 and loss_mask 0. decoder_segment_ids equals the
  continued document's encoder segment id, so a cross-attention mask
  `dec_seg[:, :, None] == enc_seg[:, None, :]` (both > 0) shows the decoder that
  document's prefix only. Keys: encoder_inputs, encoder_segment_ids,
  encoder_positions, decoder_inputs (bos, then decoder_targets[:-1]), decoder_targets,
  decoder_segment_ids, decoder_positions (0.. within the continuation), loss_mask.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from typing import Iterable, Iterator

import grain
import numpy as np

from train.corpus import Corpus, open_corpus
from train.tokenizers import (
    SENTENCEPIECE_FILE,
    Tokenizer,
    load_tokenizer,
    regular_ids,
    train_sentencepiece,
)

FAMILIES = ("decoder", "encoder", "encoder_decoder")
PACK_FORMAT = "v1"
EVAL_SALT, TRAIN_SALT = 1, 0
STREAM_ROWS = 2**48  # rows in the repeated stream; far beyond any run


class PipelineError(ValueError):
    """A pipeline argument is bad. The message names the argument and the fix."""


# ----------------------------------------------------------------------------- packing


def pack_documents(docs: Iterable[np.ndarray], row_len: int, eot_id: int, pad_id: int, dtype=np.int32) -> np.ndarray:
    """[eot, *doc] for every doc, concatenated and cut into rows; the last row padded."""
    pieces = []
    for ids in docs:
        ids = np.asarray(ids)
        if np.any(ids == eot_id):
            raise PipelineError("a document encodes to eot_id: the tokenizer must never emit specials.")
        pieces += [np.array([eot_id], dtype), ids.astype(dtype)]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    num_rows = max(1, math.ceil(len(stream) / row_len))
    padded = np.full(num_rows * row_len, pad_id, dtype)
    padded[: len(stream)] = stream
    return padded.reshape(num_rows, row_len)


def segments_and_positions(rows: np.ndarray, eot_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row document numbers (1, 2, ...; 0 = padding) and positions within them."""
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


def _encode_all(tokenizer: Tokenizer, texts: Iterable[str], chunk: int = 256) -> Iterator[np.ndarray]:
    batch_encode = getattr(tokenizer, "encode_batch", None)
    if batch_encode is None:
        yield from (tokenizer.encode(t) for t in texts)
        return
    buffer = []
    for text in texts:
        buffer.append(text)
        if len(buffer) == chunk:
            yield from batch_encode(buffer)
            buffer = []
    if buffer:
        yield from batch_encode(buffer)


def storage_dtype(tokenizer: Tokenizer):
    return np.uint16 if tokenizer.padded_vocab_size() <= 2**16 else np.int32


def packed_rows(corpus: Corpus, split: str, tokenizer: Tokenizer, row_len: int) -> np.ndarray:
    """The split packed into rows of `row_len`, cached as .npy beside the dataset."""
    limit = "" if corpus.max_documents is None else f".max{corpus.max_documents}"
    name = f"{split}.{tokenizer.cache_key}.L{row_len}.{PACK_FORMAT}{limit}.npy"
    path = corpus.directory / "packed" / name
    if path.is_file():
        return np.load(path, mmap_mode="r")
    docs = _encode_all(tokenizer, corpus.documents(split))
    rows = pack_documents(docs, row_len, tokenizer.eot_id, tokenizer.pad_id, storage_dtype(tokenizer))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, rows)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not cache packed rows at {path} ({e}); keeping them in memory.")
    return rows


# ----------------------------------------------------------------------------- features


def decoder_features(rows: np.ndarray, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
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


def mask_row(row: np.ndarray, rng: np.random.Generator, special_ids, mask_id: int,
             regular: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one row: (inputs, selected). Specials and padding are never selected;
    random replacements are drawn from `regular` (the non-special ids)."""
    eligible = np.flatnonzero(~np.isin(row, special_ids))
    inputs, selected = row.copy(), np.zeros(row.shape, bool)
    if eligible.size == 0:
        return inputs, selected
    count = max(1, int(round(rate * eligible.size)))
    chosen = rng.choice(eligible, size=count, replace=False)
    draw = rng.random(count)
    to_mask, to_random = chosen[draw < 0.8], chosen[(draw >= 0.8) & (draw < 0.9)]
    inputs[to_mask] = mask_id
    inputs[to_random] = rng.choice(regular, size=to_random.size)
    selected[chosen] = True
    return inputs, selected


def encoder_features(rows: np.ndarray, stream_positions: np.ndarray, tokenizer: Tokenizer, seed: int,
                     salt: int, rate: float, regular: np.ndarray | None = None) -> dict[str, np.ndarray]:
    rows = np.asarray(rows, dtype=np.int32)
    regular = regular_ids(tokenizer) if regular is None else regular
    specials = np.asarray(tokenizer.special_ids)
    seg, pos = segments_and_positions(rows, tokenizer.eot_id, tokenizer.pad_id)
    masked = [
        mask_row(row, np.random.default_rng([seed, salt, int(p)]), specials, tokenizer.mask_id, regular, rate)
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


def encoder_decoder_features(rows: np.ndarray, encoder_len: int, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    rows = np.asarray(rows, dtype=np.int32)
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


# ----------------------------------------------------------------------------- pipeline


def _grain_seed(seed: int) -> int:
    """Any int seed -> grain's 32-bit shuffle seed. Hashed, because grain reshuffles
    epoch e with seed+e, which would make seed s+1 replay seed s one epoch late."""
    return int.from_bytes(hashlib.sha256(f"shuffle:{seed}".encode()).digest()[:4], "big")


def _check_positive(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise PipelineError(f"{name}={value!r} is invalid: use a positive integer.")
    return int(value)


def _process_layout(batch_size: int, process_index, process_count) -> tuple[int, int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_count = _check_positive("process_count", process_count)
    if not 0 <= process_index < process_count:
        raise PipelineError(f"process_index={process_index} is invalid: use 0..{process_count - 1}.")
    if batch_size % process_count:
        raise PipelineError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}: "
            f"use a multiple of {process_count} (each process takes an equal slice)."
        )
    return int(process_index), process_count, batch_size // process_count


class LMPipeline:
    """Random-access batches: `batch(step)` is this process's slice of global batch `step`."""

    def __init__(self, rows: np.ndarray, family: str, seq_len: int, batch_size: int, seed: int,
                 tokenizer: Tokenizer, process_index: int, process_count: int,
                 decoder_len: int | None = None, mask_rate: float = 0.15):
        self.rows, self.family, self.seq_len, self.batch_size = rows, family, seq_len, batch_size
        self.seed, self.tokenizer, self.mask_rate = int(seed), tokenizer, mask_rate
        self.decoder_len = decoder_len
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise PipelineError(f"seed={seed!r} is invalid: use an integer >= 0.")
        if not 0.0 < mask_rate < 1.0:
            raise PipelineError(f"mask_rate={mask_rate} is invalid: use a fraction in (0, 1), e.g. 0.15.")
        self._regular = regular_ids(tokenizer)
        self.process_index, self.process_count, self.local_batch_size = _process_layout(
            batch_size, process_index, process_count
        )
        epochs = max(1, STREAM_ROWS // len(rows))  # finite: grain's infinite lengths overflow
        stream = grain.MapDataset.range(len(rows)).shuffle(seed=_grain_seed(self.seed)).repeat(epochs)
        local = stream.map_with_index(lambda position, row: (position, row)).batch(self.local_batch_size)
        mine = local[self.process_index :: self.process_count]
        self.dataset = mine.map(lambda b: self.features(self.rows[b[1]], b[0], TRAIN_SALT))

    def features(self, rows: np.ndarray, stream_positions: np.ndarray, salt: int) -> dict[str, np.ndarray]:
        if self.family == "decoder":
            return decoder_features(rows, self.tokenizer)
        if self.family == "encoder":
            return encoder_features(rows, stream_positions, self.tokenizer, self.seed, salt,
                                    self.mask_rate, self._regular)
        return encoder_decoder_features(rows, self.seq_len, self.tokenizer)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise PipelineError(f"step={step!r} is invalid: use an integer >= 0.")
        return self.dataset[int(step)]

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.rows) // self.batch_size)

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens this process receives per step (the encoder side for seq2seq)."""
        return self.local_batch_size * self.seq_len

    def iterator(self, step: int = 0) -> "BatchIterator":
        return BatchIterator(self, step)

    def __iter__(self) -> "BatchIterator":
        return self.iterator(0)


class BatchIterator:
    """Yields batch(step), batch(step + 1), ...; its state is a small JSON-able dict."""

    def __init__(self, pipeline: LMPipeline, step: int = 0):
        self.pipeline, self.step = pipeline, int(step)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.pipeline.batch(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        p = self.pipeline
        return {"step": self.step, "seed": p.seed, "batch_size": p.batch_size,
                "seq_len": p.seq_len, "family": p.family}

    def set_state(self, state: dict) -> None:
        for key, mine in self.get_state().items():
            if key != "step" and key in state and state[key] != mine:
                raise PipelineError(
                    f"checkpointed {key}={state[key]!r} differs from this pipeline's {key}={mine!r}: "
                    f"restart with {key}={state[key]!r} to resume the same data order."
                )
        self.step = int(state["step"])


# ----------------------------------------------------------------------------- entry points


def _check_shape(family: str, seq_len, batch_size, decoder_len) -> tuple[int, int]:
    if family not in FAMILIES:
        raise PipelineError(f"family={family!r} is invalid: use one of {FAMILIES}.")
    if decoder_len is not None:
        _check_positive("decoder_len", decoder_len)
    return _check_positive("seq_len", seq_len), _check_positive("batch_size", batch_size)


def row_length(family: str, seq_len: int, decoder_len: int | None) -> int:
    """decoder: seq_len + 1 (inputs and shifted targets); encoder: seq_len; seq2seq: both stacks."""
    if family == "decoder":
        return seq_len + 1
    if family == "encoder":
        return seq_len
    return seq_len + (decoder_len or seq_len)


def _resolve(source, tokenizer, data_dir, corpus_kwargs) -> tuple[Corpus, Tokenizer]:
    corpus = source if isinstance(source, Corpus) else open_corpus(source, data_dir, **corpus_kwargs)
    return corpus, load_tokenizer(tokenizer, data_dir=corpus.directory)


def open_tokenizer(tokenizer="bytes", source="stdlib", data_dir=None, **corpus_kwargs) -> Tokenizer:
    """The tokenizer for `source`: 'sentencepiece' lives beside that source's dataset, so
    resolve it here rather than with `load_tokenizer(name, data_dir=<TFDS root>)`."""
    return _resolve(source, tokenizer, data_dir, corpus_kwargs)[1]


def prepare_tokenizer(corpus: Corpus, name: str = "sentencepiece", vocab_size: int = 8000,
                      model_type: str = "bpe") -> Tokenizer:
    """What `magic data --tokenizer NAME` does: train a SentencePiece model on the train
    split (once; kept beside the dataset) or return the byte tokenizer."""
    if name != "sentencepiece":
        return load_tokenizer(name)
    path = corpus.directory / SENTENCEPIECE_FILE
    if path.is_file():
        return load_tokenizer(str(path))
    return train_sentencepiece(corpus.documents("train"), path, vocab_size, model_type)


def make_pipeline(family: str = "decoder", source="stdlib", tokenizer="bytes", seq_len: int = 256,
                  batch_size: int = 16, seed: int = 0, data_dir=None, process_index: int | None = None,
                  process_count: int | None = None, *, decoder_len: int | None = None,
                  mask_rate: float = 0.15, **corpus_kwargs) -> LMPipeline:
    """Training batches. `source`: a directory, 'stdlib', 'tfds:<name>' or a Corpus.
    `corpus_kwargs` go to `open_corpus` (pattern, validation_fraction, text_field, max_documents)."""
    seq_len, batch_size = _check_shape(family, seq_len, batch_size, decoder_len)
    _process_layout(batch_size, process_index, process_count)  # fail before reading data
    corpus, tok = _resolve(source, tokenizer, data_dir, corpus_kwargs)
    rows = packed_rows(corpus, "train", tok, row_length(family, seq_len, decoder_len))
    return LMPipeline(rows, family, seq_len, batch_size, seed, tok, process_index, process_count,
                      decoder_len, mask_rate)


def make_eval_batches(family: str = "decoder", source="stdlib", tokenizer="bytes", seq_len: int = 256,
                      batch_size: int = 16, seed: int = 0, data_dir=None, process_index: int | None = None,
                      process_count: int | None = None, *, num_eval_batches: int = 8,
                      decoder_len: int | None = None, mask_rate: float = 0.15,
                      **corpus_kwargs) -> list[dict[str, np.ndarray]]:
    """The validation split, unshuffled: min(num_eval_batches, ceil(rows / batch_size))
    batches of rows taken at even strides across the whole split (all rows if they fit),
    this process's slice of each. The last batch is filled with all-padding rows, whose
    loss_mask is 0."""
    seq_len, batch_size = _check_shape(family, seq_len, batch_size, decoder_len)
    num_eval_batches = _check_positive("num_eval_batches", num_eval_batches)
    corpus, tok = _resolve(source, tokenizer, data_dir, corpus_kwargs)
    rows = np.asarray(packed_rows(corpus, "validation", tok, row_length(family, seq_len, decoder_len)))
    pipe = LMPipeline(rows, family, seq_len, batch_size, seed, tok, process_index, process_count,
                      decoder_len, mask_rate)
    total = min(num_eval_batches, math.ceil(len(rows) / batch_size)) * batch_size
    if len(rows) > total:  # rows spread evenly over the split, so every document is sampled, not the first few
        rows = rows[np.linspace(0, len(rows) - 1, total).astype(np.int64)]
    filler = np.full((max(0, total - len(rows)), rows.shape[1]), tok.pad_id, rows.dtype)
    rows = np.concatenate([rows[:total], filler])
    first = pipe.process_index * pipe.local_batch_size  # this process's rows of each batch
    starts = range(first, total, batch_size)
    return [pipe.features(rows[i : i + pipe.local_batch_size], np.arange(i, i + pipe.local_batch_size), EVAL_SALT)
            for i in starts]
