"""What a source's documents are: text files, JSONL lines or Parquet rows, and their splits.

A text file is one document, in the validation split when the hash of its path says so
(sources.py `assign_splits`, the rule the TFDS text builder uses). A JSONL line or a Parquet row
is one document, in validation by the hash of (file, byte offset of the line / row group and
row), so a record's split never depends on how the work is cut. `list_source` lists a source
once ({relpath: (size, version)}, sources.py) and names what is wrong with it before any work.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Iterator

from .. import storage
from . import sources
from .sources import CorpusError, default_corpus_dir, path_hash

KINDS = ("text", "jsonl", "parquet", "corpus")


@dataclasses.dataclass(frozen=True)
class Source:
    """What to read: `kind` (KINDS), a root folder or gs:// prefix (or the corpus's source string),
    and how records become documents."""

    kind: str
    root: str
    text_field: str | None = "text"
    validation_fraction: float = 0.015
    data_dir: str | None = None  # corpus kind: where its TFDS dataset is
    max_documents: int | None = None  # corpus kind


def row_group_sizes(source: Source, relpath: str) -> list[int]:
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


def is_validation(key: str, fraction: float) -> bool:
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
                split = "validation" if is_validation(f"{relpath}@{pos}", source.validation_fraction) else "train"
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
            split = "validation" if is_validation(f"{relpath}#{group}:{row}", source.validation_fraction) else "train"
            yield split, _text("" if value is None else value, where, source.text_field)


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
    if not 0.0 < validation_fraction < 0.5:
        raise CorpusError(f"--validation-fraction {validation_fraction} is invalid: use a value in (0, 0.5), "
                          f"e.g. 0.015.")
    if source == "stdlib":
        source, pattern = str(default_corpus_dir()), pattern or "*.py"
    remote = storage.is_url(source)
    root = storage.normalize(source, "source") if remote else os.path.abspath(os.path.expanduser(source))
    if remote:
        storage.use_emulator()
        storage.check_bucket(root, "source")
    single = (storage.exists(root) and not storage.is_dir(root)) if remote else os.path.isfile(root)
    if single:
        root, name = storage.parent(root) if remote else os.path.dirname(root), storage.basename(root)
        pattern = name
    elif not remote and not os.path.isdir(root):
        raise CorpusError(f"source {source!r} does not exist: pass a directory or file of text, JSONL or "
                          f"Parquet, a gs://BUCKET/PREFIX, 'stdlib' or tfds:NAME.")
    default = {"jsonl": "*.jsonl", "parquet": "*.parquet"}.get(fmt, "*")
    pattern = pattern or default
    stats = (sources.remote_files(root, pattern) if remote
             else sources.file_stats(root, [p for p in sources.list_files(root, pattern)
                                            if sources.is_readable(os.path.join(root, p))]))
    if not stats:
        raise CorpusError(f"source {source!r} has no readable files matching {pattern!r}: add files there or "
                          f"pass --pattern matching them (e.g. '*.txt').")
    if sum(size for size, _ in stats.values()) == 0:
        raise CorpusError(f"source {source!r}: its {len(stats)} file(s) are all empty: there is no text to "
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
    elif row_group_sizes(source, first):
        with _open(source.root, first) as f:
            names = _parquet().ParquetFile(f).schema_arrow.names
        if source.text_field not in names:
            raise CorpusError(f"{storage.join(source.root, first)}: no column {source.text_field!r} (columns: "
                              f"{names}): pass --text-field NAME.")


