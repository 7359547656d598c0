"""Batches for the three model families, as a pure function of (seed, step).

Why this shape: a resumed run must see exactly the batches an uninterrupted run would,
on any number of hosts. So nothing here is an iterator with hidden state:

1. Pack (once, cached). Every document is encoded and prefixed with `eot`; the
   documents are concatenated in the corpus's stored order and cut into rows of
   `row_len` tokens. A document longer than a row simply continues in the next row;
   only the very last row is padded (`pad_id`). The rows are saved as
   `<dataset dir>/packed/<split>.<tokenizer>.L<row_len>.v1.npy` and memory-mapped. When
   the dataset is in a bucket (data_dir=gs://...) so are the rows: the process that packs
   them (process 0 in a pod) uploads them as one object, the others read it into memory;
   no host writes another's disk (remote.py).
2. Order. A grain `MapDataset` over row ids is shuffled (a new permutation each
   epoch, all derived from `seed`) and repeated forever; stream position i holds one row.
   Global batch s is stream positions [s*B, (s+1)*B); process p computes only its rows
   p*B/P : (p+1)*B/P, by random access (`stream[position]`), never by iterating.
   With a batch ramp (configs/ramp.py) step s reads only b_s rows, stream positions
   [rows_before(s), rows_before(s) + b_s), into the active slots of the same [B] batch;
   the other slots are padding rows (loss_mask 0). Active slots fill microbatch by
   microbatch (`ramp_slots`), so the step skips whole microbatches that have none.
3. Features, vectorized per batch: the family's objective (model/objectives.py) turns
   packed rows into its batch, whose keys, sides and dtypes its record in
   model/families.py lists. Segment ids count documents within a row, and positions
   restart at each document and at the start of a row.

`seq_len` is the run's data.seq_len. Rows hold `Family.row_len(seq_len)` tokens:
seq_len + 1 for the decoder (inputs and targets shifted by one), seq_len for the
encoder, and both halves for the encoder-decoder (`Family.lengths`).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from typing import Iterable, Iterator

import grain
import numpy as np

from matrixmagic.configs.model_config import FAMILIES
from matrixmagic.configs.ramp import BatchRamp
from matrixmagic.model.families import Family, family_of

from .. import storage
from .corpus import Corpus, open_corpus
from .tokenizers import SENTENCEPIECE_FILE, Tokenizer, load_tokenizer, train_sentencepiece

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
    if storage.is_remote(str(corpus.directory)):
        return _bucket_rows(storage.join(str(corpus.directory), "packed", name),
                            lambda: _pack(corpus, split, tokenizer, row_len))
    path = corpus.directory / "packed" / name
    if path.is_file():
        return np.load(path, mmap_mode="r")
    rows = _pack(corpus, split, tokenizer, row_len)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, rows)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not cache packed rows at {path} ({e}); keeping them in memory.")
    return rows


def _pack(corpus: Corpus, split: str, tokenizer: Tokenizer, row_len: int) -> np.ndarray:
    docs = _encode_all(tokenizer, corpus.documents(split))
    return pack_documents(docs, row_len, tokenizer.eot_id, tokenizer.pad_id, storage_dtype(tokenizer))


def _bucket_rows(url: str, pack) -> np.ndarray:
    """The rows cached as one object at `url`: read into memory if it exists (np.load cannot
    memory-map an object), else packed and uploaded (it appears whole or not at all)."""
    where = f"the packed rows at {url}"
    try:
        if storage.retrying(lambda: storage.exists(url), where):
            return np.load(io.BytesIO(storage.retrying(lambda: storage.read_bytes(url), where)))
    except storage.StorageUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - gcsfs raises OSError, HttpError or ValueError
        raise storage.classify(err, url, "data.data_dir") from None
    rows = pack()
    buffer = io.BytesIO()
    np.save(buffer, rows)
    try:
        storage.retrying(lambda: storage.write_bytes(url, buffer.getvalue()), where)
    except Exception as err:  # noqa: BLE001 - a refused upload costs a repack next time, not this run
        warnings.warn(f"could not cache packed rows at {url} ({storage.short(err)}); keeping them in memory.")
    return rows


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


def ramp_slots(batch_size: int, microbatches: int) -> np.ndarray:
    """[B] ranks of the batch's slots in microbatch-major order. The step's microbatch i holds
    slots i, i + k, i + 2k, ... (train/optimizer.py `split_microbatches`), so slot r is row
    r // k of microbatch r % k and has rank (r % k) * (B / k) + r // k. A ramp step with b
    rows uses the slots of rank < b: microbatch 0 fills first, then 1, and so on."""
    slots = np.arange(batch_size)
    return (slots % microbatches) * (batch_size // microbatches) + slots // microbatches


class LMPipeline:
    """Random-access batches: `batch(step)` is this process's slice of global batch `step`.
    `seq_len` is the run's data.seq_len; the family record splits it between its sides.
    `ramp`: the run's BatchRamp (None: batch_size rows every step); `microbatches`: the
    step's, which decide where a ramp step's active rows go."""

    def __init__(self, rows: np.ndarray, family: str, seq_len: int, batch_size: int, seed: int,
                 tokenizer: Tokenizer, process_index: int, process_count: int, mask_rate: float = 0.15,
                 ramp: BatchRamp | None = None, microbatches: int = 1, fingerprint: dict | None = None):
        self.rows, self.family, self.seq_len, self.batch_size = rows, family, seq_len, batch_size
        self.seed, self.tokenizer, self.mask_rate = int(seed), tokenizer, mask_rate
        # What the rows came from (the corpus's fingerprint and the tokenizer): a resume compares it.
        self.fingerprint = {**(fingerprint or {}), "tokenizer": tokenizer.cache_key}
        self.record: Family = family_of(family)
        self.lengths = self.record.lengths(seq_len)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise PipelineError(f"seed={seed!r} is invalid: use an integer >= 0.")
        if not 0.0 < mask_rate < 1.0:
            raise PipelineError(f"mask_rate={mask_rate} is invalid: use a fraction in (0, 1), e.g. 0.15.")
        self.process_index, self.process_count, self.local_batch_size = _process_layout(
            batch_size, process_index, process_count
        )
        self.ramp = BatchRamp.build(batch_size, seq_len) if ramp is None else ramp
        if self.ramp.full_rows != batch_size:
            raise PipelineError(f"ramp.full_rows={self.ramp.full_rows} must equal batch_size={batch_size}.")
        if batch_size % _check_positive("microbatches", microbatches):
            raise PipelineError(f"microbatches={microbatches} must divide batch_size={batch_size}.")
        self.slot_ranks = ramp_slots(batch_size, microbatches)
        epochs = max(1, STREAM_ROWS // len(rows))  # finite: grain's infinite lengths overflow
        self.stream = grain.MapDataset.range(len(rows)).shuffle(seed=_grain_seed(self.seed)).repeat(epochs)

    def positions(self, step: int) -> np.ndarray:
        """Stream positions of this process's slots of global batch `step`; -1 marks a padding
        slot. The active slots take [rows_before(step), + rows(step)) in slot order, so a full
        batch is positions step * B + slot."""
        active = self.slot_ranks < self.ramp.rows(step)
        order = np.cumsum(active) - 1
        positions = np.where(active, self.ramp.rows_before(step) + order, -1)
        first = self.process_index * self.local_batch_size
        return positions[first : first + self.local_batch_size]

    def features(self, rows: np.ndarray, stream_positions: np.ndarray, salt: int) -> dict[str, np.ndarray]:
        """The family's objective turns packed rows into its batch (model/objectives.py)."""
        return self.record.make_batch(rows, self.tokenizer, self.seq_len, stream_positions=stream_positions,
                                      seed=self.seed, salt=salt, mask_rate=self.mask_rate)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise PipelineError(f"step={step!r} is invalid: use an integer >= 0.")
        positions = self.positions(int(step))
        live = positions >= 0
        rows = np.full((len(positions), self.rows.shape[1]), self.tokenizer.pad_id, self.rows.dtype)
        rows[live] = self.rows[[self.stream[int(p)] for p in positions[live]]]
        # A padding row gets every loss_mask 0 from its objective and draws no masking randomness
        # (it has no eligible token), so its stream position is a placeholder.
        return self.features(rows, np.where(live, positions, 0), TRAIN_SALT)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.rows) // self.batch_size)

    @property
    def tokens_per_batch(self) -> int:
        """Tokens this process receives per step (both sides for the encoder-decoder)."""
        return self.local_batch_size * sum(self.lengths.values())

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
                "seq_len": p.seq_len, "family": p.family,
                "ramp.start_tokens": p.ramp.start_rows * p.seq_len if p.ramp.on else 0,
                "ramp.tokens": p.ramp.ramp_tokens}

    def set_state(self, state: dict) -> None:
        for key, mine in self.get_state().items():
            if key != "step" and key in state and state[key] != mine:
                raise PipelineError(
                    f"checkpointed {key}={state[key]!r} differs from this pipeline's {key}={mine!r}: "
                    f"restart with {key}={state[key]!r} to resume the same data order."
                )
        self.step = int(state["step"])


# ----------------------------------------------------------------------------- entry points


def _check_shape(family: str, seq_len, batch_size) -> tuple[int, int]:
    if family not in FAMILIES:
        raise PipelineError(f"family={family!r} is invalid: use one of {FAMILIES}.")
    seq_len = _check_positive("seq_len", seq_len)
    if min(family_of(family).lengths(seq_len).values()) < 1:
        raise PipelineError(f"seq_len={seq_len} is too short for {family}: each side needs at least one token.")
    return seq_len, _check_positive("batch_size", batch_size)


def _resolve(source, tokenizer, data_dir, corpus_kwargs) -> tuple[Corpus, Tokenizer]:
    corpus = source if isinstance(source, Corpus) else open_corpus(source, data_dir, **corpus_kwargs)
    return corpus, load_tokenizer(tokenizer, data_dir=corpus.directory)


def open_tokenizer(tokenizer="bytes", source="stdlib", data_dir=None, **corpus_kwargs) -> Tokenizer:
    """The tokenizer for `source`: 'sentencepiece' lives beside that source's dataset, so
    resolve it here rather than with `load_tokenizer(name, data_dir=<TFDS root>)`. Bytes
    and a .model path need no dataset, so none is opened (or built) for them."""
    if tokenizer != "sentencepiece":
        return load_tokenizer(tokenizer)
    return _resolve(source, tokenizer, data_dir, corpus_kwargs)[1]


DEFAULT_VOCAB_SIZE = 8000


def prepare_tokenizer(corpus: Corpus, name: str = "sentencepiece", vocab_size: int | None = None,
                      model_type: str = "bpe", force: bool = False) -> Tokenizer:
    """What `magic data --tokenizer NAME` does: train a SentencePiece model on the train
    split (once; kept beside the dataset) or return the byte tokenizer.

    `vocab_size` None: DEFAULT_VOCAB_SIZE for a new model, the existing model's otherwise. A
    model that exists with another vocabulary is kept unless `force`: runs that name
    'sentencepiece' for this source read it, so it is never replaced silently."""
    if name != "sentencepiece":
        return load_tokenizer(name)
    path = corpus.directory / SENTENCEPIECE_FILE
    if path.is_file() and not force:
        existing = load_tokenizer(str(path))
        if vocab_size is not None and existing.vocab_size != vocab_size:
            raise PipelineError(
                f"--vocab-size {vocab_size}: {corpus.name} already has a SentencePiece model with "
                f"{existing.vocab_size} ids at {path}. Pass --force to retrain it (runs that use "
                f"data.tokenizer=sentencepiece on this source then read the new one; copy the old file first "
                f"to keep it, and point those runs at it with data.tokenizer=PATH.model), or drop --vocab-size "
                f"to use the existing one."
            )
        return existing
    return train_sentencepiece(corpus.documents("train"), path, vocab_size or DEFAULT_VOCAB_SIZE, model_type)


def check_enough_rows(rows: np.ndarray, source: str, pad_id: int, seq_len: int, batch_size: int,
                      process_count: int | None) -> None:
    """A train split must fill one process's rows of a batch with distinct full rows: smaller, every
    batch repeats the same few rows (a one-sequence corpus trained to loss 0.004 on copies of itself)."""
    processes = process_count if process_count is not None else _process_layout(batch_size, None, None)[1]
    need = batch_size // processes
    full = len(rows) - int(len(rows) > 0 and rows[-1, -1] == pad_id)  # only the last row is ever padded
    if full < need:
        tokens = int(np.count_nonzero(np.asarray(rows) != pad_id))
        per_process = f" per process ({processes} processes)" if processes > 1 else ""
        raise PipelineError(
            f"data.source is too small: the train split of {source} has {tokens:,} tokens, {full} full row(s) of "
            f"{rows.shape[1]} (data.seq_len={seq_len}), and one batch needs {need} distinct rows{per_process} "
            f"(batch_size={batch_size}), so every batch would repeat the same text. Add text to the source, or "
            f"lower batch_size (--batch{f' {max(full, 1) * processes}' if full else ''}) or data.seq_len."
        )


def make_pipeline(family: str = "decoder", source="stdlib", tokenizer="bytes", seq_len: int = 256,
                  batch_size: int = 16, seed: int = 0, data_dir=None, process_index: int | None = None,
                  process_count: int | None = None, *, mask_rate: float = 0.15, ramp: BatchRamp | None = None,
                  microbatches: int = 1, **corpus_kwargs) -> LMPipeline:
    """Training batches. `source`: a directory, 'stdlib', 'tfds:<name>' or a Corpus.
    `ramp`, `microbatches`: the run's batch ramp and the step's microbatches (LMPipeline).
    `corpus_kwargs` go to `open_corpus` (pattern, validation_fraction, text_field, max_documents)."""
    seq_len, batch_size = _check_shape(family, seq_len, batch_size)
    _process_layout(batch_size, process_index, process_count)  # fail before reading data
    corpus, tok = _resolve(source, tokenizer, data_dir, corpus_kwargs)
    rows = packed_rows(corpus, "train", tok, family_of(family).row_len(seq_len))
    check_enough_rows(rows, corpus.name, tok.pad_id, seq_len, batch_size, process_count)
    return LMPipeline(rows, family, seq_len, batch_size, seed, tok, process_index, process_count, mask_rate,
                      ramp, microbatches, corpus.fingerprint)


def make_eval_batches(family: str = "decoder", source="stdlib", tokenizer="bytes", seq_len: int = 256,
                      batch_size: int = 16, seed: int = 0, data_dir=None, process_index: int | None = None,
                      process_count: int | None = None, *, num_eval_batches: int = 8,
                      mask_rate: float = 0.15, **corpus_kwargs) -> list[dict[str, np.ndarray]]:
    """The validation split, unshuffled: min(num_eval_batches, ceil(rows / batch_size))
    batches of rows taken at even strides across the whole split (all rows if they fit),
    this process's slice of each. The last batch is filled with all-padding rows, whose
    loss_mask is 0."""
    seq_len, batch_size = _check_shape(family, seq_len, batch_size)
    num_eval_batches = _check_positive("num_eval_batches", num_eval_batches)
    corpus, tok = _resolve(source, tokenizer, data_dir, corpus_kwargs)
    rows = np.asarray(packed_rows(corpus, "validation", tok, family_of(family).row_len(seq_len)))
    pipe = LMPipeline(rows, family, seq_len, batch_size, seed, tok, process_index, process_count, mask_rate)
    total = min(num_eval_batches, math.ceil(len(rows) / batch_size)) * batch_size
    if len(rows) > total:  # rows spread evenly over the split, so every document is sampled, not the first few
        rows = rows[np.linspace(0, len(rows) - 1, total).astype(np.int64)]
    filler = np.full((max(0, total - len(rows)), rows.shape[1]), tok.pad_id, rows.dtype)
    rows = np.concatenate([rows[:total], filler])
    first = pipe.process_index * pipe.local_batch_size  # this process's rows of each batch
    starts = range(first, total, batch_size)
    return [pipe.features(rows[i : i + pipe.local_batch_size], np.arange(i, i + pipe.local_batch_size), EVAL_SALT)
            for i in starts]
