"""Batches for the three model families, as a pure function of (seed, step).

Why this shape: a resumed run must see exactly the batches an uninterrupted run would,
on any number of hosts. So nothing here is an iterator with hidden state:

1. Pack (once, cached). Every document is encoded and prefixed with `eot`; the
   documents are concatenated in the corpus's stored order into one token stream per
   split, written as shards (shards.py) by `magic data prepare` (prepare.py) or, for a
   source never prepared, on first use beside its dataset (`prepared_corpus`). Rows are
   cut from the stream at read time: row r is tokens [r * L, (r + 1) * L), a document
   longer than a row simply continues in the next row, and only the very last row is
   padded (`pad_id`). Rows are read by id (memory-mapped shards, or byte ranges in a
   bucket), so start-up and memory do not grow with the corpus.
2. Order. A grain `MapDataset` over row ids is shuffled (a new permutation each
   epoch, all derived from `seed`) and repeated forever; stream position i holds one row.
   Global batch s is stream positions [s*B, (s+1)*B); process p computes only its rows
   p*B/P : (p+1)*B/P, by random access (`stream[position]`), never by iterating.
   With a batch ramp (configs/ramp.py) step s reads only b_s rows, stream positions
   [rows_before(s), rows_before(s) + b_s), into the active slots of the same [B] batch;
   the other slots are padding rows (loss_mask 0). Active slots fill microbatch by
   microbatch (`ramp_slots`), so the step skips whole microbatches that have none.
   A mixture (data.mixture, mixture.py) draws each position's source from (seed, position);
   each source has its own shuffled stream, read at that position.
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
import math

import grain
import numpy as np

from matrixmagic.configs.model_config import FAMILIES, ConfigError
from matrixmagic.configs.ramp import BatchRamp
from matrixmagic.model.families import Family, family_of

from .corpus import Corpus
from .datasets import is_prepared_source, open_sources, prepared_root, resolve  # noqa: F401 - prepared_root: API
from .mixture import Mixture
from .prepare import prepared_corpus
from .sources import CorpusError
from .tokenizers import SENTENCEPIECE_FILE, Tokenizer, load_tokenizer, train_sentencepiece

EVAL_SALT, TRAIN_SALT = 1, 0
STREAM_ROWS = 2**48  # rows in the repeated stream; far beyond any run


class PipelineError(ConfigError):
    """A pipeline argument is bad. The message names the argument and the fix."""


# ----------------------------------------------------------------------------- packing


def packed_rows(corpus: Corpus, split: str, tokenizer: Tokenizer, row_len: int):
    """The split's rows of `row_len` (shards.PackedRows), prepared beside the dataset on first use."""
    return prepared_corpus(corpus, tokenizer).rows(split, row_len)


# ----------------------------------------------------------------------------- pipeline


def _grain_seed(seed: int, source: str | None = None) -> int:
    """Any int seed -> grain's 32-bit shuffle seed. Hashed, because grain reshuffles
    epoch e with seed+e, which would make seed s+1 replay seed s one epoch late. A
    mixture's sources each get their own (`source`: its name)."""
    salt = f"shuffle:{seed}" if source is None else f"shuffle:{seed}:{source}"
    return int.from_bytes(hashlib.sha256(salt.encode()).digest()[:4], "big")


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
    step's, which decide where a ramp step's active rows go. `rows`: an array of rows (or
    shards.PackedRows), or {name: rows} with `weights` {name: weight} for a mixture.
    `process_index`, `process_count`: None is jax's own (this process, all processes)."""

    def __init__(self, rows, family: str, seq_len: int, batch_size: int, seed: int,
                 tokenizer: Tokenizer, process_index: int | None, process_count: int | None, mask_rate: float = 0.15,
                 ramp: BatchRamp | None = None, microbatches: int = 1, fingerprint: dict | None = None,
                 weights: dict[str, float] | None = None):
        self.sources = dict(rows) if isinstance(rows, dict) else {"": rows}
        rows = next(iter(self.sources.values()))
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
        self.mixture = None if weights is None else Mixture(list(self.sources), [weights[n] for n in self.sources],
                                                               self.seed)
        self.streams = [self._stream(len(r), None if self.mixture is None else name)
                        for name, r in self.sources.items()]
        self.stream = self.streams[0]

    def _stream(self, num_rows: int, name: str | None):
        epochs = max(1, STREAM_ROWS // num_rows)  # finite: grain's infinite lengths overflow
        return grain.MapDataset.range(num_rows).shuffle(seed=_grain_seed(self.seed, name)).repeat(epochs)

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
        source, index = self.source_positions(int(step), positions)
        for j, (stream, source_rows) in enumerate(zip(self.streams, self.sources.values())):
            take = live & (source == j)
            if take.any():
                rows[take] = source_rows[[stream[int(i)] for i in index[take]]]
        # A padding row gets every loss_mask 0 from its objective and draws no masking randomness
        # (it has no eligible token), so its stream position is a placeholder.
        return self.features(rows, np.where(live, positions, 0), TRAIN_SALT)

    def source_positions(self, step: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, position in that source's own stream) of each stream position of `step` (-1:
        padding slots, any answer). Without a mixture, source 0 at the same position. With one,
        a source's k-th row overall is its stream's position k: the rows drawn before this step
        (counted from position 0, mixture.py) plus its rank among the step's own positions, so
        each source is read in its own order, without repeats within its epochs."""
        if self.mixture is None:
            return np.zeros(len(positions), np.int64), np.maximum(positions, 0)
        start, count = self.ramp.rows_before(step), self.ramp.rows(step)
        before = self.mixture.rows_before(start)
        drawn = self.mixture.source_of(np.arange(start, start + count, dtype=np.uint64))
        rank = np.zeros(count, np.int64)
        for j in range(len(self.sources)):
            mine = drawn == j
            rank[mine] = before[j] + np.arange(int(mine.sum()))
        at = np.clip(positions - start, 0, max(count - 1, 0))
        return drawn[at], rank[at]

    def rows_by_source(self, step: int) -> dict[str, int]:
        """Global rows each source supplied to steps [0, step): a mixture's per-source count."""
        before = self.ramp.rows_before(int(step))
        if self.mixture is None:
            return {name: before for name in self.sources}
        return dict(zip(self.sources, map(int, self.mixture.rows_before(before))))

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
                "ramp.tokens": p.ramp.ramp_tokens,
                **({"mixture": p.mixture.describe()} if p.mixture is not None else {})}

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


def open_tokenizer(tokenizer="bytes", source="stdlib", data_dir=None, **corpus_kwargs) -> Tokenizer:
    """The tokenizer for `source`: 'sentencepiece' lives beside that source's dataset, so
    resolve it here rather than with `load_tokenizer(name, data_dir=<TFDS root>)`. Bytes
    and a .model path need no dataset, so none is opened (or built) for them."""
    if tokenizer != "sentencepiece" or (isinstance(source, str) and (source.startswith("prepared:")
                                                                     or is_prepared_source(source))):
        return load_tokenizer(tokenizer)
    return resolve(source, tokenizer, data_dir, corpus_kwargs)[1]


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


def check_enough_rows(rows, source: str, seq_len: int, batch_size: int, process_count: int | None) -> None:
    """A train split must fill one process's rows of a batch with distinct full rows: smaller, every
    batch repeats the same few rows (a one-sequence corpus trained to loss 0.004 on copies of itself)."""
    processes = process_count if process_count is not None else _process_layout(batch_size, None, None)[1]
    need = batch_size // processes
    full = rows.full_rows
    if full < need:
        per_process = f" per process ({processes} processes)" if processes > 1 else ""
        raise PipelineError(
            f"data.source is too small: the train split of {source} has {rows.tokens:,} tokens, {full} full row(s) of "
            f"{rows.shape[1]} (data.seq_len={seq_len}), and one batch needs {need} distinct rows{per_process} "
            f"(batch_size={batch_size}), so every batch would repeat the same text. Add text to the source, or "
            f"lower batch_size (--batch{f' {max(full, 1) * processes}' if full else ''}) or data.seq_len."
        )


def make_pipeline(family: str = "decoder", source="stdlib", tokenizer="bytes", seq_len: int = 256,
                  batch_size: int = 16, seed: int = 0, data_dir=None, process_index: int | None = None,
                  process_count: int | None = None, *, mask_rate: float = 0.15, ramp: BatchRamp | None = None,
                  microbatches: int = 1, mixture: str | None = None, **corpus_kwargs) -> LMPipeline:
    """Training batches. `source`: a directory, 'stdlib', 'tfds:<name>', a prepared folder,
    'prepared:<name>' or a Corpus; `mixture`: 'name:weight,...' over prepared names instead.
    `ramp`, `microbatches`: the run's batch ramp and the step's microbatches (LMPipeline).
    `corpus_kwargs` go to `open_corpus` (pattern, validation_fraction, text_field, max_documents)."""
    seq_len, batch_size = _check_shape(family, seq_len, batch_size)
    _process_layout(batch_size, process_index, process_count)  # fail before reading data
    opened = open_sources(source, tokenizer, data_dir, mixture, **corpus_kwargs)
    row_len = family_of(family).row_len(seq_len)
    rows = {name: prep.rows("train", row_len) for name, prep in opened.sources.items()}
    for name, split in rows.items():
        label = f"{opened.label}" if not name else f"mixture source {name!r}"
        if opened.weights is None:
            check_enough_rows(split, label, seq_len, batch_size, process_count)
        elif split.tokens == 0:
            raise CorpusError(f"data.mixture: {label} has no train tokens: prepare it from a non-empty source.")
    return LMPipeline(rows if opened.weights else rows[""], family, seq_len, batch_size, seed, opened.tokenizer,
                      process_index, process_count, mask_rate, ramp, microbatches, opened.fingerprint,
                      opened.weights)


def make_eval_sets(family: str = "decoder", source="stdlib", tokenizer="bytes", seq_len: int = 256,
                   batch_size: int = 16, seed: int = 0, data_dir=None, process_index: int | None = None,
                   process_count: int | None = None, *, num_eval_batches: int = 8, mask_rate: float = 0.15,
                   mixture: str | None = None, **corpus_kwargs) -> dict[str, list[dict[str, np.ndarray]]]:
    """{source name: its validation batches} ({'': batches} without a mixture): each source's
    validation split, unshuffled: min(num_eval_batches, ceil(rows / batch_size)) batches of rows
    taken at even strides across the whole split (all rows if they fit), this process's slice of
    each. The last batch is filled with all-padding rows, whose loss_mask is 0."""
    seq_len, batch_size = _check_shape(family, seq_len, batch_size)
    num_eval_batches = _check_positive("num_eval_batches", num_eval_batches)
    opened = open_sources(source, tokenizer, data_dir, mixture, **corpus_kwargs)
    row_len = family_of(family).row_len(seq_len)
    tok = opened.tokenizer
    pipe = LMPipeline(np.zeros((1, row_len), np.int32), family, seq_len, batch_size, seed, tok, process_index,
                      process_count, mask_rate)
    sets = {}
    for name, prep in opened.sources.items():
        rows = prep.rows("validation", row_len)
        if rows.tokens == 0:
            what = f"mixture source {name!r}" if name else f"data.source={opened.label!r}"
            raise CorpusError(f"{what} has no validation documents: prepare it again with a larger "
                              f"--validation-fraction, or set eval_batches=0.")
        total = min(num_eval_batches, math.ceil(len(rows) / batch_size)) * batch_size
        # rows spread evenly over the split, so every document is sampled, not the first few
        ids = np.linspace(0, len(rows) - 1, total).astype(np.int64) if len(rows) > total else np.arange(len(rows))
        taken = rows[ids]
        filler = np.full((max(0, total - len(taken)), row_len), tok.pad_id, taken.dtype)
        taken = np.concatenate([taken, filler])
        first = pipe.process_index * pipe.local_batch_size  # this process's rows of each batch
        sets[name] = [pipe.features(taken[i : i + pipe.local_batch_size],
                                    np.arange(i, i + pipe.local_batch_size), EVAL_SALT)
                      for i in range(first, total, batch_size)]
    return sets


def make_eval_batches(*args, **kwargs) -> list[dict[str, np.ndarray]]:
    """One source's validation batches (make_eval_sets without a mixture)."""
    return make_eval_sets(*args, **kwargs)[""]
