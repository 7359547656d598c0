"""Text corpora as TFDS datasets, read without TensorFlow (array_record + random access).

`open_corpus(source, data_dir)` gives one `Corpus` object, whatever the source:

* a directory of text files, or a `gs://` prefix of them (sources.py: the same files give
  the same dataset): a `TextFiles` TFDS builder writes it once as an `array_record`
  dataset into `data_dir` (default `~/.cache/matrixmagic/tfds`, or $MATRIXMAGIC_DATA_DIR;
  either may be a `gs://` URL: remote.py). Later calls find it prepared and read it directly.
* `stdlib`: the same, over this Python's standard library `.py` files
  (`default_corpus_dir()`, located at run time; nothing is copied into the repo).
* `tfds:<catalog name>` (`tfds:lm1b`, `tfds:wmt14_translate/de-en`, `tfds:c4/en`): a
  catalog dataset that is already prepared (as array_record) in `data_dir`. There is no
  network here, so a missing one fails at once with where to put it and how to make it.

Decisions worth knowing:

* Splits are a pure function of each file's relative path: sha256(path) picks ~1.5%
  (`validation_fraction`) for `validation`, with at least one validation and one train
  document. Adding a file never moves another file between splits.
* The builder config name is `<dir name>_<hash>`; the hash covers the absolute source
  path (or URL), the pattern, the fraction and every file's (path, size, mtime or object
  generation). Different
  sources never collide, and an edited corpus is rebuilt into a new config instead of
  silently reusing a stale one. A prepared dataset is never modified: TFDS writes into
  an `incomplete.*` folder and renames it only on success.
* Files are matched by basename (`pattern`, fnmatch) anywhere below the source dir;
  hidden entries, `__pycache__` and `site-packages` are skipped.
* Unreadable files (permissions, dangling links) are skipped with a `CorpusWarning`
  listing them; if nothing readable is left that is an error.
* Non-UTF-8 bytes are decoded with errors="replace" (U+FFFD); a `CorpusWarning` counts
  the affected files when the dataset is built (only then: the result is cached).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import tensorflow_datasets as tfds

from .. import storage
from . import remote, sources
from .sources import (  # noqa: F401 - this module's API
    SKIPPED_DIRS,
    CorpusError,
    assign_splits,
    default_corpus_dir,
    is_readable,
    list_files,
    path_hash,
)

DATA_DIR_ENV = "MATRIXMAGIC_DATA_DIR"
VALIDATION_NAMES = ("validation", "test")  # catalog datasets: the first present is used


# How a source with no files is fixed: through the CLI every file is read (pattern '*'); only a
# caller of this module's API (or stdlib's '*.py') has a pattern to change.
_FILES_FIX = ", one document per file, of any name or extension (.txt, .md, .py, ...), or give another folder."
_PATTERN_FIX = " or pass a pattern that matches them (e.g. pattern='*.txt')."


class CorpusWarning(UserWarning):
    """Something in the corpus was skipped or repaired; training can go on."""


def default_data_dir() -> Path | str:
    """$MATRIXMAGIC_DATA_DIR (a directory or a gs:// URL), else ~/.cache/matrixmagic/tfds."""
    value = os.environ.get(DATA_DIR_ENV)
    if value and storage.is_url(value):
        return storage.normalize(value, DATA_DIR_ENV)
    return Path(value or "~/.cache/matrixmagic/tfds").expanduser()


# ----------------------------------------------------------------------------- files


# ----------------------------------------------------------------------------- builder


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    source_dir: str = ""
    splits: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict, repr=False)


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """One example per file: its text and its path relative to the source directory."""

    VERSION = tfds.core.Version("1.0.0")
    # Locating the source file would make TFDS import `importlib_resources` (not
    # installed); it only wants it to find download checksums, and we download nothing.
    code_path = None
    RELEASE_NOTES = {"1.0.0": "Text files of a local directory, split by path hash."}  # noqa: RUF012 - TFDS API

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Text files under {self.builder_config.source_dir}",
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            split: self._generate_examples(paths)
            for split, paths in self.builder_config.splits.items()
        }

    def _generate_examples(self, paths):
        root = self.builder_config.source_dir
        repaired = []
        for relpath, raw in sources.read_files(root, paths):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                repaired.append(relpath)
            yield relpath, {"text": text, "path": relpath}
        if repaired:
            warnings.warn(
                f"{len(repaired)} file(s) under {root} are not valid UTF-8; their bad bytes "
                f"were replaced by U+FFFD: {_sample(repaired)}",
                CorpusWarning,
                stacklevel=2,
            )


def _sample(items: list[str], n: int = 5) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ----------------------------------------------------------------------------- corpus


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Random-access documents of a prepared dataset, split into train and validation.

    `directory` is the prepared dataset's folder (an epath.Path when it is in a bucket):
    token caches and tokenizer models are written beside the data there.
    """

    name: str
    directory: Any  # Path, or epath.Path for gs://
    sources: Mapping[str, Any]  # "train" / "validation" -> TFDS array_record data source
    text_field: str = "text"
    max_documents: int | None = None
    # What a resume compares (train/samerun.py): {'source': ..., 'files': ...}, see `files_summary`.
    fingerprint: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def num_documents(self, split: str) -> int:
        n = len(self._source(split))
        return n if self.max_documents is None else min(n, self.max_documents)

    def documents(self, split: str, chunk: int = 256, start: int = 0, stop: int | None = None) -> Iterator[str]:
        """The split's texts [start, stop) in stored order (fixed when the dataset was prepared)."""
        source, n = self._source(split), self.num_documents(split)
        n = n if stop is None else min(n, stop)
        for first in range(start, n, chunk):
            for record in source.__getitems__(list(range(first, min(first + chunk, n)))):
                yield _as_text(record[self.text_field])

    def _source(self, split: str):
        if split not in self.sources:
            raise CorpusError(f"split={split!r} is invalid: use one of {sorted(self.sources)}.")
        return self.sources[split]


def _as_text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def prepare_text_dir(
    source_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    pattern: str = "*",
    validation_fraction: float = 0.015,
    name: str | None = None,
) -> Corpus:
    """Build (once) and open the array_record dataset of a directory (or gs:// prefix) of text files."""
    root = checked_data_dir(data_dir)
    source = _source_root(source_dir)
    if not 0.0 < validation_fraction < 0.5:
        raise CorpusError(
            f"validation_fraction={validation_fraction} is invalid: use a value in (0, 0.5), e.g. 0.015."
        )
    stats = _scan(source, pattern)
    relpaths = sorted(stats)
    splits = assign_splits(relpaths, validation_fraction)
    resolved = str(source) if storage.is_remote(source) else str(Path(source).resolve())
    fingerprint = sources.fingerprint(resolved, pattern, validation_fraction, stats)
    config = TextFilesConfig(
        name=sources.config_name(resolved, fingerprint),
        description=f"{resolved} ({pattern})",
        source_dir=resolved,
        splits=splits,
    )
    what = f"building the {name or storage.basename(resolved)} dataset from {len(relpaths):,} files"
    with quiet_tfds():
        builder = TextFiles(config=config, data_dir=str(root))
        if not builder.is_prepared():
            _build_text_files(builder, config, root, source, what)
            if storage.is_remote(root):  # built elsewhere: a new builder reads the uploaded dataset_info.json
                builder = TextFiles(config=config, data_dir=str(root))
        data = builder.as_data_source()
    corpus_name = name or (resolved if storage.is_remote(resolved) else f"dir:{resolved}")
    return Corpus(name=corpus_name, directory=_directory(builder), sources=data,
                  fingerprint={"source": corpus_name, "files": sources.summary(stats)})


def _source_root(source_dir) -> Path | str:
    """A local source directory (checked to be one), or a gs:// prefix whose bucket is checked."""
    if storage.is_url(source_dir):
        url = storage.normalize(str(source_dir), "data.source")
        storage.use_emulator()
        storage.check_bucket(url, "data.source")
        return url
    source = Path(source_dir).expanduser()
    if not source.is_dir():
        raise CorpusError(
            f"source={str(source_dir)!r} is not a directory: pass a directory of text files, a gs://BUCKET/PREFIX "
            "of them, 'stdlib', or 'tfds:<catalog name>'."
        )
    return source


def _scan(source, pattern: str) -> dict[str, tuple]:
    """{relpath: (size, version)} of the source's readable files matching `pattern` (sources.py)."""
    if storage.is_remote(source):
        stats = sources.remote_files(source, pattern)
        if not stats:
            raise CorpusError(
                f"data.source={source!r} has no files matching pattern={pattern!r} (no object below "
                f"{source}/ has such a name): upload text files there (`gcloud storage cp -r DIR {source}`)"
                f"{_FILES_FIX if pattern == '*' else _PATTERN_FIX}"
            )
        return stats
    relpaths = list_files(source, pattern)
    if not relpaths:  # '*' is what `magic data --source` and data.source read: no flag of theirs sets a pattern
        what = "holds no files to read" if pattern == "*" else f"has no files matching pattern={pattern!r}"
        raise CorpusError(
            f"source={str(source)!r} {what} (hidden ones, __pycache__ and site-packages are skipped): put the "
            f"corpus there as text files{_FILES_FIX if pattern == '*' else _PATTERN_FIX} JSONL or Parquet "
            f"records: `magic data prepare {source}` reads those."
        )
    unreadable = [p for p in relpaths if not is_readable(source / p)]
    if unreadable:
        warnings.warn(
            f"skipping {len(unreadable)} unreadable file(s) under {source} (fix their "
            f"permissions to include them): {_sample(unreadable)}",
            CorpusWarning,
            stacklevel=3,  # the caller of prepare_text_dir
        )
        relpaths = [p for p in relpaths if p not in set(unreadable)]
    if not relpaths:
        raise CorpusError(f"source={str(source)!r}: none of its files is readable; fix their permissions.")
    return sources.file_stats(source, relpaths)


def _build_text_files(builder, config, root, source, what: str) -> None:
    """Write the dataset into `root`: TFDS writes an incomplete.* folder there and renames it only
    on success; into a bucket, remote.py builds it locally and uploads it, its marker files last."""
    try:
        writable_data_dir(root)
    except OSError as err:
        raise _unwritable(root, err) from None
    try:
        if storage.is_remote(root):
            remote.build_and_upload(lambda stage: TextFiles(config=config, data_dir=stage), root,
                                    lambda local, target: build(local, what, target))
        else:
            build(builder, what)
    except OSError as err:  # a source file vanished, a full disk: the files and the dir are named
        print(flush=True)  # end our "building ..." line before the error
        raise CorpusError(f"building the dataset of source={str(source)!r} into data.data_dir={str(root)!r} "
                          f"failed: {err}. Nothing was kept; fix it and rerun.") from None


def _directory(builder):
    """The prepared dataset's folder: a Path on disk, an epath.Path in a bucket."""
    where = str(builder.data_dir)
    return storage.path(where) if storage.is_remote(where) else Path(where)


@contextlib.contextmanager
def quiet_tfds():
    """TFDS's own chatter off: its absl warnings ("Using custom data configuration: ...", once per
    builder object, "Variant folder ... has no dataset_info.json") and its progress bars. Our
    line (`build`) says what happens instead; errors still come through."""
    absl = logging.getLogger("absl")
    level, bars = absl.level, getattr(tfds.core.utils.tqdm_utils, "_active", True)
    absl.setLevel(logging.ERROR)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        absl.setLevel(level)
        tfds.display_progress_bar(bars)


def build(builder, what: str, target: str | None = None) -> None:
    """Prepare the dataset under one line of ours ("building ... done in 20 s"), in place of TFDS's
    "Downloading and preparing dataset" (nothing is downloaded) printed to stdout. `target`: where
    the line says it goes, when that is not where the builder writes (a bucket, remote.py)."""
    print(f"{what} into {target or builder.data_dir} ...", end="", flush=True)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(record=True) as caught:
        builder.download_and_prepare(file_format="array_record")
    print(f" done in {time.perf_counter() - start:.0f} s", flush=True)
    for w in caught:  # after our line, not inside it (non-UTF-8 files, found while writing)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _unwritable(root: Path, err: OSError) -> CorpusError:
    return CorpusError(
        f"data.data_dir={str(root)!r} cannot be written ({err.strerror or err}): the dataset is built there once. "
        f"Give a writable directory with --set data.data_dir=PATH (magic data: --data-dir PATH), or set "
        f"{DATA_DIR_ENV}."
    )


def checked_data_dir(data_dir: str | os.PathLike | None) -> Path | str:
    """The TFDS data dir (default_data_dir() for None); a path that is a file fails here, naming the field.
    A gs:// URL comes back as a string, its bucket and credentials checked (remote.py)."""
    given = data_dir or default_data_dir()
    if storage.is_url(given):
        return remote.checked_root(str(given), "data.data_dir" if data_dir else DATA_DIR_ENV)
    root = Path(given).expanduser()
    for parent in (root, *root.parents):
        if parent.exists():
            if not parent.is_dir():
                raise CorpusError(
                    f"data.data_dir={str(root)!r} is not a directory ({parent} is a file): give a directory with "
                    f"--set data.data_dir=PATH (magic data: --data-dir PATH)."
                )
            break
    return root


def writable_data_dir(root: Path | str) -> None:
    """Create `root` and probe a write, so a read-only data dir fails before TFDS starts building."""
    if storage.is_remote(root):
        remote.probe_write(str(root), "data.data_dir")
        return
    local = Path(root)  # not remote: checked_data_dir gave a Path
    local.mkdir(parents=True, exist_ok=True)
    if not os.access(local, os.W_OK):
        raise PermissionError(13, "Permission denied")
    probe = local / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def _missing_catalog(name: str, data_dir: Path | str, why: str) -> CorpusError:
    return CorpusError(
        f"source='tfds:{name}' is not available: {why}. Put the prepared dataset under "
        f"data_dir={str(data_dir)!r} (as {data_dir}/{name.split('/')[0]}/...). This machine has "
        f"no network: prepare it where there is one with `tfds build {name} "
        f"--file_format=array_record --data_dir=<dir>` and copy <dir>/{name.split('/')[0]} here, "
        "or pass data_dir= pointing at an existing TFDS data dir."
    )


def choose_text_field(features, supervised_keys, requested: str | None) -> str:
    """`text` (lm1b, c4); else the supervised target (the 2nd language of a wmt pair)."""
    text_fields = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
    if requested is not None:
        if requested not in text_fields:
            raise CorpusError(f"text_field={requested!r} is invalid: use one of {text_fields}.")
        return requested
    if "text" in text_fields:
        return "text"
    if supervised_keys and len(supervised_keys) == 2 and supervised_keys[1] in text_fields:
        return supervised_keys[1]
    raise CorpusError(
        f"cannot tell which field holds the text (text fields: {text_fields}): pass text_field=."
    )


def open_catalog(
    name: str,
    data_dir: str | os.PathLike | None = None,
    text_field: str | None = None,
    max_documents: int | None = None,
) -> Corpus:
    """A TFDS catalog dataset already prepared as array_record in `data_dir`."""
    root = checked_data_dir(data_dir)
    try:
        with quiet_tfds():
            builder = tfds.builder(name, data_dir=str(root))
    except tfds.core.registered.DatasetNotFoundError:
        why = "no prepared copy was found (and no builder code for it can run here)"
        raise _missing_catalog(name, root, why) from None
    if not builder.is_prepared():
        raise _missing_catalog(name, root, f"nothing is prepared at {builder.data_dir}")
    file_format = builder.info.file_format
    if file_format is not None and file_format.value != "array_record":
        raise CorpusError(
            f"source='tfds:{name}' is stored as {file_format.value}; random access needs "
            f"array_record: rebuild it with `tfds build {name} --file_format=array_record`."
        )
    splits = builder.info.splits
    validation = next((s for s in VALIDATION_NAMES if s in splits), None)
    if "train" not in splits or validation is None:
        raise CorpusError(
            f"source='tfds:{name}' has splits {sorted(splits)}: it needs 'train' and one of "
            f"{VALIDATION_NAMES}."
        )
    field = choose_text_field(builder.info.features, builder.info.supervised_keys, text_field)
    with quiet_tfds():
        sources = builder.as_data_source()
    counts = f"{splits['train'].num_examples:,} train / {splits[validation].num_examples:,} {validation} examples"
    return Corpus(
        name=f"tfds:{name}",
        directory=_directory(builder),
        sources={"train": sources["train"], "validation": sources[validation]},
        text_field=field,
        max_documents=max_documents,
        fingerprint={"source": f"tfds:{name}", "files": f"TFDS {builder.info.full_name}, {counts}"},
    )


def open_corpus(
    source: str | os.PathLike = "stdlib",
    data_dir: str | os.PathLike | None = None,
    *,
    pattern: str | None = None,
    validation_fraction: float = 0.015,
    text_field: str | None = None,
    max_documents: int | None = None,
) -> Corpus:
    """'stdlib', 'tfds:<name>' or a directory path (the two words win over same-named dirs)."""
    text = str(source)
    if text.startswith("tfds:"):
        return open_catalog(text[5:], data_dir, text_field, max_documents)
    if text == "stdlib":
        corpus = prepare_text_dir(
            default_corpus_dir(), data_dir, pattern or "*.py", validation_fraction, name="stdlib"
        )
    else:
        corpus = prepare_text_dir(text, data_dir, pattern or "*", validation_fraction)
    return dataclasses.replace(corpus, max_documents=max_documents)
