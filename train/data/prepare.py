"""`magic data prepare`: a corpus of any size -> token shards (shards.py), by worker processes.

The work is cut into a fixed plan of tasks before anything is tokenized: groups of whole text
files, byte ranges of JSONL files (a line belongs to the range its first byte is in), Parquet
row groups, or ranges of a TFDS dataset's documents, each group about `shard_mb` of input.
The plan depends on the source alone, never on `--workers`, and task k writes shard k of each
split, so the shards are the same bytes whatever the worker count, and a killed prepare resumes
by running only the tasks whose shards are not finished. Each worker holds one document at a
time (a text file, a JSONL line, a Parquet row; Parquet is read in batches of rows): peak
memory is a worker's tokenizer plus that, whatever the corpus size.

Splits: records.py (a file, line or row goes to validation by a hash of its path and place);
a TFDS catalog dataset keeps its own splits. Within a split, documents keep plan order.

`prepared_corpus` is the same machinery run in this process over a `Corpus` (the stdlib corpus,
a text directory built as TFDS, a catalog dataset): what a run does on first use of a source that
was never prepared, cached beside the dataset. Its stream is the corpus's documents in stored
order, which is exactly what the old in-memory packer concatenated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import signal
import threading
import time
import warnings
from concurrent import futures
from typing import Any, Iterator

import numpy as np

from .. import storage
from ..pids import pid_alive
from . import shards, sources
from .records import Source, jsonl_records, list_source, parquet_records, row_group_sizes
from .sources import CorpusError, assign_splits
from .tokenizers import load_tokenizer

PLAN = "matrixmagic-plan.json"
CORPUS_DOCS_PER_TASK = 1 << 14
ENCODE_BATCH = 128


@dataclasses.dataclass(frozen=True)
class Task:
    """Plan task k: `units` are (relpath, split) for text, (relpath, start, end) for JSONL,
    (relpath, row group) for Parquet, (split, first doc, end doc) for a corpus."""

    index: int
    units: tuple
    size: int  # input bytes (documents for a corpus): the progress bar's share


# ----------------------------------------------------------------------------- plan


def _group(units: list[tuple[tuple, int]], limit: int) -> list[Task]:
    """Consecutive units into tasks of about `limit` (a unit larger than that is a task alone)."""
    tasks: list[Task] = []
    current: list[tuple] = []
    size = 0
    for unit, n in units:
        if current and size + n > limit:
            tasks.append(Task(len(tasks), tuple(current), size))
            current, size = [], 0
        current.append(unit)
        size += n
    if current:
        tasks.append(Task(len(tasks), tuple(current), size))
    return tasks


def plan(source: Source, stats: dict[str, tuple], shard_bytes: int) -> list[Task]:
    """The fixed task list of a listed source ({relpath: (size, version)}; see sources.py)."""
    if source.kind == "text":
        splits = assign_splits(sorted(stats), source.validation_fraction)
        which = {p: split for split, paths in splits.items() for p in paths}
        return _group([((p, which[p]), stats[p][0]) for p in sorted(stats)], shard_bytes)
    if source.kind == "jsonl":
        units = [((p, start, min(start + shard_bytes, stats[p][0])), min(shard_bytes, stats[p][0] - start))
                 for p in sorted(stats) for start in range(0, stats[p][0], shard_bytes)]
        return _group(units, shard_bytes)
    if source.kind == "parquet":
        return _group([((p, g), n) for p in sorted(stats) for g, n in enumerate(row_group_sizes(source, p))],
                      shard_bytes)
    raise ValueError(source.kind)


def corpus_plan(corpus) -> list[Task]:
    units = [((split, start, min(start + CORPUS_DOCS_PER_TASK, corpus.num_documents(split))),
              min(CORPUS_DOCS_PER_TASK, corpus.num_documents(split) - start))
             for split in shards.SPLITS for start in range(0, corpus.num_documents(split), CORPUS_DOCS_PER_TASK)]
    return [Task(k, (unit,), n) for k, (unit, n) in enumerate(units)]


def task_records(source: Source, task: Task, corpus=None) -> Iterator[tuple[str, str]]:
    for unit in task.units:
        if source.kind == "text":
            relpath, split = unit
            for _, data in sources.read_files(source.root, [relpath]):
                yield split, data.decode("utf-8", errors="replace")
        elif source.kind == "jsonl":
            yield from jsonl_records(source, *unit)
        elif source.kind == "parquet":
            yield from parquet_records(source, *unit)
        else:
            split, first, end = unit
            yield from ((split, text) for text in corpus.documents(split, start=first, stop=end))


def _encoded(tokenizer, records: Iterator[tuple[str, str]]) -> Iterator[tuple[str, np.ndarray]]:
    batch_encode = getattr(tokenizer, "encode_batch", None)
    if batch_encode is None:
        yield from ((split, tokenizer.encode(text)) for split, text in records)
        return
    buffer: list[tuple[str, str]] = []
    for record in records:
        buffer.append(record)
        if len(buffer) == ENCODE_BATCH:
            yield from zip((s for s, _ in buffer), batch_encode([t for _, t in buffer]))
            buffer = []
    if buffer:
        yield from zip((s for s, _ in buffer), batch_encode([t for _, t in buffer]))


def run_task(source: Source, task: Task, out: str, tokenizer, dtype, corpus=None) -> dict:
    """Write shard `task.index` of both splits; returns {split: {tokens, documents}}."""
    writers = {split: shards.ShardWriter(out, split, task.index, tokenizer.eot_id, dtype) for split in shards.SPLITS}
    try:
        for split, ids in _encoded(tokenizer, task_records(source, task, corpus)):
            writers[split].add(ids)
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    return {split: writer.commit() for split, writer in writers.items()}


# ----------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _worker_init(source: Source, out: str, tokenizer_ref: str, dtype: str, open_corpus=None) -> None:
    """A worker's state: its tokenizer, and for a corpus source the corpus, reopened with
    `open_corpus` (corpus.py's, passed by reference: only such a worker imports TFDS)."""
    storage.use_emulator()
    # A terminal's Ctrl-C reaches every process of the group: the main process stops the prepare
    # (one line, exit 130) and the finished shards are kept; a worker finishes its shard instead
    # of printing a traceback of its own (also set at its start: _workers_ignore_ctrl_c).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # a tokenizer.json's batch encoder: one core per worker
    corpus = None if open_corpus is None else open_corpus(
        source.root, source.data_dir, text_field=source.text_field, max_documents=source.max_documents)
    _WORKER.update(source=source, out=out, tokenizer=load_tokenizer(tokenizer_ref), dtype=dtype, corpus=corpus)


def _worker_task(task: Task) -> tuple[Task, dict]:
    w = _WORKER
    return task, run_task(w["source"], task, w["out"], w["tokenizer"], w["dtype"], w["corpus"])


def tokenizer_ref(tokenizer) -> str:
    """A name `load_tokenizer` reopens in a worker process."""
    path = getattr(tokenizer, "path", None)
    return str(path) if path is not None else tokenizer.cache_key


# ----------------------------------------------------------------------------- the prepare


@dataclasses.dataclass
class Result:
    out: str
    index: dict
    ran: int  # tasks run now (0: everything was already prepared)
    seconds: float
    input_bytes: int


def _plan_record(source_fp: dict, tokenizer, dtype, tasks: list[Task]) -> dict:
    digest = hashlib.sha256(json.dumps([dataclasses.astuple(t) for t in tasks]).encode())
    digest.update(json.dumps(source_fp, sort_keys=True).encode())
    return {"format": shards.FORMAT, "tokenizer": tokenizer.cache_key, "dtype": str(dtype),
            "tasks": len(tasks), "plan": digest.hexdigest()[:16]}


def _claim(out: str, record: dict, field: str) -> None:
    """Write the plan record, or check that the one there is this plan: a folder holding (part of)
    another source's or tokenizer's shards is never mixed with, nor overwritten."""
    path = storage.join(out, PLAN)
    if storage.exists(path):
        there = json.loads(storage.read_text(path))
        if there != record:
            what = "prepared data" if storage.exists(storage.join(out, shards.INDEX)) else "an unfinished prepare"
            raise CorpusError(
                f"{field} {out!r} holds {what} of another source or settings (plan {there.get('plan')}, tokenizer "
                f"{there.get('tokenizer')!r}; this one is plan {record['plan']}, tokenizer {record['tokenizer']!r}: "
                f"the source's files, --shard-mb, --pattern or --validation-fraction differ): choose another output "
                f"folder, or delete that one to prepare it again.")
        return
    if not storage.is_remote(out):
        os.makedirs(out, exist_ok=True)
    storage.write_text(path, json.dumps(record))


def run_plan(source: Source, tasks: list[Task], out: str, tokenizer, source_fp: dict, *, workers: int = 0,
             corpus=None, open_corpus=None, progress: bool = False, field: str = "output folder", unit: str = "B") -> Result:
    """Run the tasks whose shards are not finished (in `workers` processes; 0: here), then write
    the index. Returns at once, running nothing, when the index is there. A corpus source runs
    on `corpus` here, and workers reopen it with `open_corpus`."""
    dtype = shards.token_dtype(tokenizer.padded_vocab_size())
    record = _plan_record(source_fp, tokenizer, dtype, tasks)
    _claim(out, record, field)
    index_path = storage.join(out, shards.INDEX)
    if storage.exists(index_path):
        return Result(out, json.loads(storage.read_text(index_path)), 0, 0.0, 0)
    start = time.perf_counter()
    if not storage.is_remote(out):  # temporary files a killed prepare was writing: a shard's, or
        for name in os.listdir(out):  # storage.write_text's NAME.tmp-PID of its shard records
            written = re.fullmatch(r".+\.tmp-(\d+)", name)
            if (name.startswith(".") and name.endswith(".tmp")) or (written and not pid_alive(int(written[1]))):
                os.remove(os.path.join(out, name))
    sizes = shards.listing(out)
    done = {t.index: _finished(out, t.index, dtype.itemsize, sizes) for t in tasks}
    pending = [t for t in tasks if done[t.index] is None]
    bar = _bar(sum(t.size for t in tasks), sum(t.size for t in tasks if done[t.index]), progress, unit)
    try:
        if workers and len(pending) > 1 and (corpus is None or open_corpus is not None):
            _run_in_workers(pending, min(workers, len(pending)), done, bar,
                            (source, out, tokenizer_ref(tokenizer), str(dtype), open_corpus))
        else:
            for task in pending:
                done[task.index] = run_task(source, task, out, tokenizer, dtype, corpus)
                bar.update(task.size)
    finally:
        bar.close()
    ref = tokenizer_ref(tokenizer)
    ref = ref if storage.is_url(ref) or ref == tokenizer.cache_key else os.path.abspath(ref)
    index = {**record, "tokenizer_ref": ref, "source": source_fp, "eot_id": tokenizer.eot_id,
             "pad_id": tokenizer.pad_id,
             "splits": {split: _split_entry(split, tasks, done) for split in shards.SPLITS}}
    storage.write_text(index_path, json.dumps(index, indent=1))
    if index["splits"]["validation"]["tokens"] == 0 and source.kind != "corpus":
        warnings.warn(f"{out}: no document fell in the validation split, so runs on it need eval_batches=0; "
                      f"prepare it again into a new folder with a larger --validation-fraction to evaluate.")
    return Result(out, index, len(pending), time.perf_counter() - start,
                  sum(t.size for t in pending) if unit == "B" else 0)


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Workers started in this block ignore SIGINT from their first instruction: Python keeps a
    SIGINT it inherits as ignored, which _worker_init would set too late for a Ctrl-C that comes
    while a worker still imports (a traceback from each). The main process's own Ctrl-C in this
    short block is lost; before and after it stops the prepare."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_in_workers(pending: list[Task], workers: int, done: dict, bar, init_args: tuple) -> None:
    """The tasks in spawned worker processes. A worker that dies (killed, out of memory) fails the
    prepare with a message, instead of leaving its task's result waited on forever."""
    context = multiprocessing.get_context("spawn")  # no forked JAX/gcsfs state in the workers
    with futures.ProcessPoolExecutor(workers, context, initializer=_worker_init, initargs=init_args) as pool:
        with _workers_ignore_ctrl_c():
            running = [pool.submit(_worker_task, task) for task in pending]  # submit starts the workers
        try:
            for future in futures.as_completed(running):
                task, records = future.result()
                done[task.index] = records
                bar.update(task.size)
        except futures.process.BrokenProcessPool:
            raise CorpusError(f"a worker process died (killed, or out of memory?) while preparing {init_args[1]}: "
                              f"rerun the same command to resume from the finished shards, with fewer --workers "
                              f"if memory ran out.") from None
        finally:
            for future in running:
                future.cancel()


def _finished(out: str, k: int, itemsize: int, sizes: dict) -> dict | None:
    records = {split: shards.finished(out, split, k, itemsize, sizes) for split in shards.SPLITS}
    return None if any(r is None for r in records.values()) else records


def _split_entry(split: str, tasks: list[Task], done: dict) -> dict:
    entries = [[shards.shard_name(split, t.index), done[t.index][split]["tokens"]] for t in tasks]
    return {"tokens": sum(n for _, n in entries),
            "documents": sum(done[t.index][split]["documents"] for t in tasks), "shards": entries}


def _bar(total: int, initial: int, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit=unit, unit_scale=True,
                unit_divisor=1000, dynamic_ncols=True, smoothing=0.1, desc="preparing")


def prepared_corpus(corpus, tokenizer) -> shards.Prepared:
    """The corpus tokenized into shards beside its dataset (once; later runs open them). A
    dataset in a folder this process cannot write (a shared, read-only TFDS dir) gets them in
    this user's cache instead, with a warning."""
    name = f"{tokenizer.cache_key}{'' if corpus.max_documents is None else f'.max{corpus.max_documents}'}"
    out = storage.join(str(corpus.directory), "prepared", name)
    if shards.is_prepared(out):
        return shards.open_prepared(out, "data.source")
    source = Source("corpus", corpus.name, corpus.text_field, max_documents=corpus.max_documents)
    try:
        run_plan(source, corpus_plan(corpus), out, tokenizer, dict(corpus.fingerprint), corpus=corpus,
                 field="data.data_dir", unit="docs")
    except PermissionError as err:
        digest = hashlib.sha256(str(corpus.directory).encode()).hexdigest()[:12]
        out = os.path.join(os.path.expanduser("~/.cache/matrixmagic/prepared"), digest, name)
        warnings.warn(f"cannot write token shards beside {corpus.directory} ({err.strerror}); writing them to {out}.")
        if not shards.is_prepared(out):
            run_plan(source, corpus_plan(corpus), out, tokenizer, dict(corpus.fingerprint), corpus=corpus,
                     field="data.data_dir", unit="docs")
    return shards.open_prepared(out, "data.source")


def check_workers(workers: int | None, shard_mb: float) -> int:
    workers = os.cpu_count() or 1 if workers is None else workers
    if workers < 0:
        raise CorpusError(f"--workers {workers} is invalid: use 0 (no worker processes) or more.")
    if not shard_mb > 0:
        raise CorpusError(f"--shard-mb {shard_mb} is invalid: use a positive size such as 64.")
    return workers


def prepare(source: str, out: str, tokenizer, *, workers: int | None = None, fmt: str = "auto",
            pattern: str | None = None, text_field: str = "text", validation_fraction: float = 0.015,
            shard_mb: float = 64, progress: bool = True) -> Result:
    """`magic data prepare` of files (text, JSONL, Parquet; local or gs://) into shards at `out`."""
    workers = check_workers(workers, shard_mb)
    spec, stats, fp = list_source(source, fmt, pattern, text_field, validation_fraction)
    inside = os.path.abspath(out) == spec.root or os.path.abspath(out).startswith(os.path.join(spec.root, ""))
    if not storage.is_remote(out) and inside and os.path.isdir(os.path.expanduser(source)):
        raise CorpusError(f"--out {out!r} lies inside the source {spec.root}: its shards would be read as "
                          f"source files by the next prepare. Choose a folder outside it.")
    tasks = plan(spec, stats, int(shard_mb * 1e6))
    return run_plan(spec, tasks, out, tokenizer, fp, workers=workers, progress=progress)


def prepare_corpus(corpus, out: str, tokenizer, open_corpus, *, workers: int | None = None, data_dir=None,
                   progress: bool = True) -> Result:
    """`magic data prepare tfds:NAME`: a TFDS dataset's own splits into shards at `out`."""
    workers = check_workers(workers, 1)
    spec = Source("corpus", corpus.name, corpus.text_field, data_dir=None if data_dir is None else str(data_dir))
    return run_plan(spec, corpus_plan(corpus), out, tokenizer, dict(corpus.fingerprint), workers=workers,
                    corpus=corpus, open_corpus=open_corpus, progress=progress, unit="docs")
