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
COMPRESSED = (".gz", ".zst", ".bz2", ".xz", ".zip")
PARQUET_BATCH = 1024  # rows decoded at a time: a row group can be hundreds of MB


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
    """A record's text; a missing value (JSON null, Parquet null) is an empty document."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {field!r} holds {type(value).__name__}, not text: pass --text-field "
                          f"naming a string field.")
    return value


def jsonl_records(source: Source, relpath: str, start: int, end: int) -> Iterator[tuple[str, str]]:
    """(split, text) of each line whose first byte lies in [start, end)."""
    field = source.text_field
    assert field is not None  # jsonl and parquet sources name their field; only plain text has none
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
                text = _text(record[field], where, field)
                split = "validation" if is_validation(f"{relpath}@{pos}", source.validation_fraction) else "train"
                yield split, text
            pos = f.tell()


def parquet_records(source: Source, relpath: str, group: int) -> Iterator[tuple[str, str]]:
    field = source.text_field
    assert field is not None  # jsonl and parquet sources name their field; only plain text has none
    with _open(source.root, relpath) as f:
        file = _parquet().ParquetFile(f)
        if source.text_field not in file.schema_arrow.names:
            raise CorpusError(f"{storage.join(source.root, relpath)}: no column {source.text_field!r} (columns: "
                              f"{file.schema_arrow.names}): pass --text-field NAME.")
        row = 0
        for batch in file.iter_batches(PARQUET_BATCH, row_groups=[group], columns=[source.text_field]):
            for value in batch.column(0).to_pylist():
                where = f"{storage.join(source.root, relpath)} row group {group} row {row}"
                held = is_validation(f"{relpath}#{group}:{row}", source.validation_fraction)
                yield "validation" if held else "train", _text(value, where, field)
                row += 1


# ----------------------------------------------------------------------------- the command's source


def detect_kind(source: str, relpaths: list[str], requested: str) -> str:
    """--format, or (auto) JSONL / Parquet when every file ends so, else text. A mix, or compressed
    files, is an error: read as text, a .jsonl or .gz file would become one document of its bytes."""
    compressed = [p for p in relpaths if p.endswith(COMPRESSED)]
    if compressed:
        raise CorpusError(f"source {source!r} holds {len(compressed)} compressed file(s) ({compressed[0]}, ...): "
                          f"decompress them first, or leave them out with --pattern.")
    if requested != "auto":
        return requested
    for kind, suffix in (("jsonl", ".jsonl"), ("parquet", ".parquet")):
        matching = sum(p.endswith(suffix) for p in relpaths)
        if matching == len(relpaths):
            return kind
        if matching:
            raise CorpusError(f"source {source!r} mixes {matching} {suffix} file(s) with {len(relpaths) - matching} "
                              f"other(s) (e.g. {next(p for p in relpaths if not p.endswith(suffix))}): pass "
                              f"--pattern '*{suffix}' to read those only, or --format to say how to read every file.")
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
    if not single and not remote and not os.path.isdir(root):
        raise CorpusError(f"source {source!r} does not exist: pass a directory or file of text, JSONL or "
                          f"Parquet, a gs://BUCKET/PREFIX, 'stdlib' or tfds:NAME.")
    pattern = pattern or {"jsonl": "*.jsonl", "parquet": "*.parquet"}.get(fmt, "*")
    if single:  # that file alone (not same-named files below its folder)
        root, name = storage.parent(root) if remote else os.path.dirname(root), storage.basename(root)
        pattern = name
        stats = ({key: v for key, v in sources.remote_files(root, name).items() if key == name} if remote
                 else sources.file_stats(root, [name]))
    elif remote:
        stats = sources.remote_files(root, pattern)
    else:
        stats = sources.file_stats(root, [p for p in sources.list_files(root, pattern)
                                          if sources.is_readable(os.path.join(root, p))])
    if not stats:
        raise CorpusError(f"source {source!r} has no readable files matching {pattern!r}: add files there or "
                          f"pass --pattern matching them (e.g. '*.txt').")
    if sum(size for size, _ in stats.values()) == 0:
        raise CorpusError(f"source {source!r}: its {len(stats)} file(s) are all empty: there is no text to "
                          f"prepare.")
    kind = detect_kind(source, sorted(stats), fmt)
    spec = Source(kind, root, text_field, validation_fraction)
    if kind in ("jsonl", "parquet"):
        _check_first_record(spec, stats)
    fp = sources.fingerprint(root, pattern, validation_fraction, stats)
    return spec, stats, {"source": f"{kind}:{root}", "files": sources.summary(stats), "fingerprint": fp,
                         "text_field": text_field if kind != "text" else None}


def _check_first_record(source: Source, stats: dict) -> None:
    """The text field of the first record, before any worker starts (a wrong --text-field fails now)."""
    first = min(p for p in stats if stats[p][0] > 0)  # list_source refused an all-empty source
    if source.kind == "jsonl":
        next(jsonl_records(source, first, 0, 1), None)
    elif row_group_sizes(source, first):
        with _open(source.root, first) as f:
            names = _parquet().ParquetFile(f).schema_arrow.names
        if source.text_field not in names:
            raise CorpusError(f"{storage.join(source.root, first)}: no column {source.text_field!r} (columns: "
                              f"{names}): pass --text-field NAME.")


