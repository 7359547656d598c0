"""`magic data prepare`: a corpus of any size -> token shards (shards.py), by worker processes.

The work is cut into a fixed plan of tasks before anything is tokenized: groups of whole text
files, byte ranges of JSONL files (a line belongs to the range its first byte is in), Parquet
row groups, or ranges of a TFDS dataset's documents, each group about `shard_mb` of input.
The plan depends on the source alone, never on `--workers`, and task k writes shard k of each
split, so the shards are the same bytes whatever the worker count, and a killed prepare resumes
by running only the tasks whose shards are not finished. Each worker holds one document at a
time: peak memory is a worker's tokenizer plus one document, whatever the corpus size.

Splits: a text file goes to validation by the hash of its path (corpus.py `assign_splits`, as
the TFDS text builder does); a JSONL line or Parquet row by the hash of (file, its offset/row).
A TFDS catalog dataset keeps its own splits. Within a split, documents keep plan order.

`prepared_corpus` is the same machinery run in this process over a `Corpus` (the stdlib corpus,
a text directory built as TFDS, a catalog dataset): what a run does on first use of a source that
was never prepared, cached beside the dataset. Its stream is the corpus's documents in stored
order, which is exactly what the old in-memory packer concatenated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import time
from typing import Any, Iterator

import numpy as np

from .. import storage
from . import shards, sources
from .sources import CorpusError, path_hash
from .tokenizers import load_tokenizer

PLAN = "matrixmagic-plan.json"
KINDS = ("text", "jsonl", "parquet", "corpus")
CORPUS_DOCS_PER_TASK = 1 << 14
ENCODE_BATCH = 128


@dataclasses.dataclass(frozen=True)
class Source:
    """What to read: `kind` (KINDS), a root folder or gs:// prefix (or the corpus's source string),
    and how records become documents."""

    kind: str
    root: str
    text_field: str = "text"
    validation_fraction: float = 0.015
    data_dir: str | None = None  # corpus kind: where its TFDS dataset is
    max_documents: int | None = None  # corpus kind


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
    tasks, current, size = [], [], 0
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
        from .corpus import assign_splits

        splits = assign_splits(sorted(stats), source.validation_fraction)
        which = {p: split for split, paths in splits.items() for p in paths}
        return _group([((p, which[p]), stats[p][0]) for p in sorted(stats)], shard_bytes)
    if source.kind == "jsonl":
        units = [((p, start, min(start + shard_bytes, stats[p][0])), min(shard_bytes, stats[p][0] - start))
                 for p in sorted(stats) for start in range(0, stats[p][0], shard_bytes)]
        return _group(units, shard_bytes)
    if source.kind == "parquet":
        return _group([((p, g), n) for p in sorted(stats) for g, n in enumerate(_row_group_sizes(source, p))],
                      shard_bytes)
    raise ValueError(source.kind)


def corpus_plan(corpus) -> list[Task]:
    units = [((split, start, min(start + CORPUS_DOCS_PER_TASK, corpus.num_documents(split))),
              min(CORPUS_DOCS_PER_TASK, corpus.num_documents(split) - start))
             for split in shards.SPLITS for start in range(0, corpus.num_documents(split), CORPUS_DOCS_PER_TASK)]
    return [Task(k, (unit,), n) for k, (unit, n) in enumerate(units)]


def _row_group_sizes(source: Source, relpath: str) -> list[int]:
    with _open(source.root, relpath) as f:
        meta = _parquet().ParquetFile(f).metadata
        return [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError("reading Parquet needs pyarrow: pip install 'matrixmagic[parquet]'.") from None
    return pq


def _open(root: str, relpath: str):
    full = storage.join(root, relpath)
    return storage.path(full).open("rb") if storage.is_remote(full) else open(full, "rb")


# ----------------------------------------------------------------------------- documents


def _is_validation(key: str, fraction: float) -> bool:
    return path_hash(key) < int(fraction * 2**64)


def _text(value, where: str, field: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {field!r} holds {type(value).__name__}, not text: pass --text-field "
                          f"naming a string field.")
    return value


def jsonl_records(source: Source, relpath: str, start: int, end: int) -> Iterator[tuple[str, str]]:
    """(split, text) of each line whose first byte lies in [start, end)."""
    with _open(source.root, relpath) as f:
        f = io.BufferedReader(f) if not hasattr(f, "peek") else f
        if start:
            f.seek(start - 1)
            f.readline()  # the line holding byte start-1 belongs to the range before
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                break
            where = f"{storage.join(source.root, relpath)} at byte {pos}"
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise CorpusError(f"{where}: not a JSON line ({err}): fix or remove that line.") from None
                if not isinstance(record, dict) or source.text_field not in record:
                    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise CorpusError(f"{where}: no field {source.text_field!r} (the line has {fields}): pass "
                                      f"--text-field NAME.")
                text = _text(record[source.text_field], where, source.text_field)
                split = "validation" if _is_validation(f"{relpath}@{pos}", source.validation_fraction) else "train"
                yield split, text
            pos = f.tell()


def parquet_records(source: Source, relpath: str, group: int) -> Iterator[tuple[str, str]]:
    with _open(source.root, relpath) as f:
        file = _parquet().ParquetFile(f)
        if source.text_field not in file.schema_arrow.names:
            raise CorpusError(f"{storage.join(source.root, relpath)}: no column {source.text_field!r} (columns: "
                              f"{file.schema_arrow.names}): pass --text-field NAME.")
        column = file.read_row_group(group, columns=[source.text_field]).column(0)
        for row, value in enumerate(column.to_pylist()):
            where = f"{storage.join(source.root, relpath)} row group {group} row {row}"
            split = "validation" if _is_validation(f"{relpath}#{group}:{row}", source.validation_fraction) else "train"
            yield split, _text("" if value is None else value, where, source.text_field)


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


def _worker_init(source: Source, out: str, tokenizer_ref: str, dtype: str) -> None:
    storage.use_emulator()
    corpus = None
    if source.kind == "corpus":
        from .corpus import open_corpus

        corpus = open_corpus(source.root, source.data_dir, text_field=source.text_field or None,
                             max_documents=source.max_documents)
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
    return {"format": shards.FORMAT, "tokenizer": tokenizer.cache_key, "tokenizer_ref": tokenizer_ref(tokenizer),
            "dtype": str(dtype),
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
                f"{field}={out!r} holds {what} of another source, tokenizer or version (plan {there.get('plan')}, "
                f"tokenizer {there.get('tokenizer')!r}; this one is plan {record['plan']}, tokenizer "
                f"{record['tokenizer']!r}; the source's files may have changed since): choose another output folder, "
                f"or delete that one to prepare it again.")
        return
    if not storage.is_remote(out):
        os.makedirs(out, exist_ok=True)
    storage.write_text(path, json.dumps(record))


def run_plan(source: Source, tasks: list[Task], out: str, tokenizer, source_fp: dict, *, workers: int = 0,
             corpus=None, progress: bool = False, field: str = "--out", unit: str = "B") -> Result:
    """Run the tasks whose shards are not finished (in `workers` processes; 0: here), then write
    the index. Returns at once, running nothing, when the index is there."""
    dtype = shards.token_dtype(tokenizer.padded_vocab_size())
    record = _plan_record(source_fp, tokenizer, dtype, tasks)
    _claim(out, record, field)
    index_path = storage.join(out, shards.INDEX)
    if storage.exists(index_path):
        return Result(out, json.loads(storage.read_text(index_path)), 0, 0.0, 0)
    start = time.perf_counter()
    if not storage.is_remote(out):  # temporary files of shards a killed prepare was writing
        for name in os.listdir(out):
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(out, name))
    done = {t.index: _finished(out, t.index, dtype.itemsize) for t in tasks}
    pending = [t for t in tasks if done[t.index] is None]
    bar = _bar(sum(t.size for t in tasks), sum(t.size for t in tasks if done[t.index]), progress, unit)
    try:
        if workers and len(pending) > 1:
            ctx = multiprocessing.get_context("spawn")  # no forked JAX/gcsfs state in the workers
            with ctx.Pool(min(workers, len(pending)), _worker_init,
                          (source, out, tokenizer_ref(tokenizer), str(dtype))) as pool:
                for task, records in pool.imap_unordered(_worker_task, pending):
                    done[task.index] = records
                    bar.update(task.size)
        else:
            for task in pending:
                done[task.index] = run_task(source, task, out, tokenizer, dtype, corpus)
                bar.update(task.size)
    finally:
        bar.close()
    index = {**record, "source": source_fp, "eot_id": tokenizer.eot_id, "pad_id": tokenizer.pad_id,
             "splits": {split: _split_entry(split, tasks, done) for split in shards.SPLITS}}
    storage.write_text(index_path, json.dumps(index, indent=1))
    return Result(out, index, len(pending), time.perf_counter() - start,
                  sum(t.size for t in pending) if unit == "B" else 0)


def _finished(out: str, k: int, itemsize: int) -> dict | None:
    records = {split: shards.finished(out, split, k, itemsize) for split in shards.SPLITS}
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
    """The corpus tokenized into shards beside its dataset (once; later runs open them)."""
    limit = "" if corpus.max_documents is None else f".max{corpus.max_documents}"
    out = storage.join(str(corpus.directory), "prepared", f"{tokenizer.cache_key}{limit}")
    if not shards.is_prepared(out):
        source = Source("corpus", corpus.name, corpus.text_field, max_documents=corpus.max_documents)
        try:
            run_plan(source, corpus_plan(corpus), out, tokenizer, dict(corpus.fingerprint), corpus=corpus,
                     field="data.data_dir", unit="docs")
        except OSError as err:
            raise CorpusError(f"could not write the token shards of {corpus.name} at {out} ({err}): make "
                              f"data.data_dir writable or point it elsewhere.") from None
    return shards.open_prepared(out, "data.source")


# ----------------------------------------------------------------------------- the command's source


def detect_kind(root: str, relpaths: list[str], requested: str) -> str:
    if requested != "auto":
        return requested
    for kind, suffix in (("jsonl", ".jsonl"), ("parquet", ".parquet")):
        if relpaths and all(p.endswith(suffix) for p in relpaths):
            return kind
    return "text"


def list_source(source: str, fmt: str = "auto", pattern: str | None = None, text_field: str = "text",
                validation_fraction: float = 0.015) -> tuple[Source, dict, dict]:
    """(Source, {relpath: (size, version)}, fingerprint) of a directory, gs:// prefix or single file
    of text, JSONL or Parquet. Errors name --source (empty, unreadable) or --text-field."""
    from .corpus import default_corpus_dir

    if not 0.0 < validation_fraction < 0.5:
        raise CorpusError(f"--validation-fraction {validation_fraction} is invalid: use a value in (0, 0.5), "
                          f"e.g. 0.015.")
    if source == "stdlib":
        source, pattern = str(default_corpus_dir()), pattern or "*.py"
    remote = storage.is_url(source)
    root = storage.normalize(source, "--source") if remote else os.path.abspath(os.path.expanduser(source))
    if remote:
        storage.use_emulator()
        storage.check_bucket(root, "--source")
    single = (storage.exists(root) and not storage.is_dir(root)) if remote else os.path.isfile(root)
    if single:
        root, name = storage.parent(root) if remote else os.path.dirname(root), storage.basename(root)
        pattern = name
    elif not remote and not os.path.isdir(root):
        raise CorpusError(f"--source {source!r} does not exist: pass a directory or file of text, JSONL or "
                          f"Parquet, a gs://BUCKET/PREFIX, 'stdlib' or tfds:NAME.")
    default = {"jsonl": "*.jsonl", "parquet": "*.parquet"}.get(fmt, "*")
    pattern = pattern or default
    stats = (sources.remote_files(root, pattern) if remote
             else sources.file_stats(root, [p for p in sources.list_files(root, pattern)
                                            if sources.is_readable(os.path.join(root, p))]))
    if not stats:
        raise CorpusError(f"--source {source!r} has no readable files matching {pattern!r}: add files there or "
                          f"pass --pattern matching them (e.g. '*.txt').")
    if sum(size for size, _ in stats.values()) == 0:
        raise CorpusError(f"--source {source!r}: its {len(stats)} file(s) are all empty: there is no text to "
                          f"prepare.")
    kind = detect_kind(root, sorted(stats), fmt)
    spec = Source(kind, root, text_field, validation_fraction)
    if kind in ("jsonl", "parquet"):
        _check_first_record(spec, stats)
    fp = sources.fingerprint(root, pattern, validation_fraction, stats)
    return spec, stats, {"source": f"{kind}:{root}", "files": sources.summary(stats), "fingerprint": fp,
                         "text_field": text_field if kind != "text" else None}


def _check_first_record(source: Source, stats: dict) -> None:
    """The text field of the first record, before any worker starts (a wrong --text-field fails now)."""
    first = min(p for p in stats if stats[p][0] > 0) if any(s for s, _ in stats.values()) else None
    if first is None:
        return
    if source.kind == "jsonl":
        next(jsonl_records(source, first, 0, 1), None)
    elif _row_group_sizes(source, first):
        with _open(source.root, first) as f:
            names = _parquet().ParquetFile(f).schema_arrow.names
        if source.text_field not in names:
            raise CorpusError(f"{storage.join(source.root, first)}: no column {source.text_field!r} (columns: "
                              f"{names}): pass --text-field NAME.")


def prepare(source: str, out: str, tokenizer, *, workers: int | None = None, fmt: str = "auto",
            pattern: str | None = None, text_field: str = "text", validation_fraction: float = 0.015,
            shard_mb: float = 64, data_dir: str | None = None, progress: bool = True) -> Result:
    """`magic data prepare`: any source into shards at `out` (see the module docstring)."""
    workers = os.cpu_count() or 1 if workers is None else workers
    if workers < 0:
        raise CorpusError(f"--workers {workers} is invalid: use 0 (no worker processes) or more.")
    if not shard_mb > 0:
        raise CorpusError(f"--shard-mb {shard_mb} is invalid: use a positive size such as 64.")
    if source.startswith("tfds:"):
        from .corpus import open_corpus

        corpus = open_corpus(source, data_dir, text_field=None if text_field == "text" else text_field)
        spec = Source("corpus", source, corpus.text_field, data_dir=data_dir)
        return run_plan(spec, corpus_plan(corpus), out, tokenizer, dict(corpus.fingerprint), workers=workers,
                        corpus=corpus, progress=progress, unit="docs")
    spec, stats, fp = list_source(source, fmt, pattern, text_field, validation_fraction)
    inside = os.path.abspath(out).startswith(os.path.join(spec.root, ""))
    if not storage.is_remote(out) and inside and os.path.isdir(os.path.expanduser(source)):
        raise CorpusError(f"--out {out!r} lies inside the source {spec.root}: its shards would be read as "
                          f"source files by the next prepare. Choose a folder outside it.")
    tasks = plan(spec, stats, int(shard_mb * 1e6))
    return run_plan(spec, tasks, out, tokenizer, fp, workers=workers, progress=progress)
