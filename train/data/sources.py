"""Where a corpus's text files are: a local directory or a `gs://` prefix, with one meaning.

A text source is listed once into `{relative path: (size, version)}`: the files whose
basename matches `pattern` anywhere below the root (hidden entries, `__pycache__` and
`site-packages` skipped), `version` the mtime in ns on disk and the object generation in
Cloud Storage (GCS gives a new generation at every overwrite, as a write moves an mtime).
Everything the corpus derives from files (splits, the fingerprint that names the built
dataset, the summary a resume compares) reads that listing, so a prefix in a bucket and
the same files in a directory give the same documents in the same splits.

Why gcsfs for a prefix rather than epath's walk: one paged listing returns every object
with its size and generation (epath would ask for each file's metadata again). Objects are
read in batches (`fs.cat` fetches a batch concurrently), since a corpus is thousands of
small objects and one request at a time would spend the build waiting on round trips.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from matrixmagic.configs import ConfigError

from .. import storage

SKIPPED_DIRS = ("__pycache__", "site-packages")
READ_BATCH = 64  # objects fetched concurrently while a gs:// corpus is built


class CorpusError(ConfigError):
    """A corpus argument is bad or its data is missing. The message names the fix."""


def path_hash(relpath: str) -> int:
    """64 bits of sha256: what decides a file's (or a record's) split."""
    return int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")


def default_corpus_dir() -> Path:
    """This interpreter's standard library directory (its site-packages is skipped)."""
    return Path(sysconfig.get_paths()["stdlib"])


def assign_splits(relpaths: list[str], validation_fraction: float) -> dict[str, tuple[str, ...]]:
    """Deterministic train/validation split by path hash; both splits non-empty."""
    if len(relpaths) < 2:
        raise CorpusError(
            f"the corpus has {len(relpaths)} readable file(s): a train and a validation split "
            "need at least 2. Add files to the source directory or widen `pattern`."
        )
    cutoff = int(validation_fraction * 2**64)
    hashes = {p: path_hash(p) for p in relpaths}
    validation = {p for p in relpaths if hashes[p] < cutoff}
    if not validation:
        validation = {min(relpaths, key=hashes.__getitem__)}
    if len(validation) == len(relpaths):
        validation.discard(max(relpaths, key=hashes.__getitem__))
    train = tuple(sorted(p for p in relpaths if p not in validation))
    return {"train": train, "validation": tuple(sorted(validation))}


def check_pattern(pattern: str) -> str:
    name = pattern.removeprefix("**/")
    if not name or "/" in name or os.sep in name:
        raise CorpusError(
            f"pattern={pattern!r} is invalid: give a file-name glob such as '*.py' or '*.txt' "
            "(it is matched in every subdirectory)."
        )
    return name


def _kept(relpath: str, pattern: str) -> bool:
    *dirs, name = relpath.split("/")
    return (not any(d.startswith(".") or d in SKIPPED_DIRS for d in dirs)
            and not name.startswith(".") and fnmatch.fnmatch(name, pattern))


def list_files(source_dir, pattern: str) -> list[str]:
    """Sorted relative POSIX paths of the files under `source_dir` (a directory or a gs://
    prefix) matching `pattern`."""
    if storage.is_remote(source_dir):
        return sorted(remote_files(str(source_dir), pattern))
    pattern = check_pattern(pattern)
    found = []
    for root, dirs, files in os.walk(source_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS]
        for name in files:
            if not name.startswith(".") and fnmatch.fnmatch(name, pattern):
                found.append(Path(root, name).relative_to(source_dir).as_posix())
    return sorted(found)


def remote_files(url: str, pattern: str) -> dict[str, tuple[int, str]]:
    """{relative path: (size, generation)} of the objects under the prefix `url` whose basename
    matches `pattern`. Objects named like folders (`dir/`, made by some upload tools) are not files."""
    import gcsfs

    pattern = check_pattern(pattern)
    fs = gcsfs.GCSFileSystem()
    prefix = url[len("gs://"):].rstrip("/") + "/"
    fs.invalidate_cache(prefix)  # a listing cached earlier in this process would miss new files
    try:
        listing = storage.retrying(lambda: fs.find(prefix, detail=True), f"data.source={url!r}")
    except storage.StorageUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - gcsfs raises OSError/HttpError/ValueError for the same refusals
        raise storage.classify(err, url, "data.source") from None
    found = {}
    for name, info in listing.items():
        relpath = name[len(prefix):]
        if info.get("type") == "directory" or not relpath or relpath.endswith("/"):
            continue
        if _kept(relpath, pattern):
            found[relpath] = (int(info["size"]), str(info.get("generation") or info.get("updated")))
    return found


def is_readable(path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def file_stats(source_dir, relpaths: Iterable[str]) -> dict[str, tuple[int, int]]:
    """{relpath: (size, mtime_ns)} of local files."""
    out = {}
    for p in relpaths:
        st = os.stat(Path(source_dir) / p)
        out[p] = (st.st_size, st.st_mtime_ns)
    return out


def fingerprint(root: str, pattern: str, fraction: float, stats: Mapping[str, tuple]) -> str:
    """16 hex digits over the root (a resolved directory or a URL), the pattern, the fraction and
    every file's (path, size, version): different sources never share a built dataset, and an
    edited corpus gets a new one."""
    digest = hashlib.sha256(f"{root}\0{pattern}\0{fraction}".encode())
    for p in sorted(stats):
        size, version = stats[p]
        digest.update(f"\0{p}\0{size}\0{version}".encode())
    return digest.hexdigest()[:16]


def summary(stats: Mapping[str, tuple]) -> str:
    """'30 files, 6,543 bytes, list 1f2e3d4c5b6a': the file list and sizes (not versions: a copy
    or a `touch` is the same data; not contents: that would read the corpus at every start)."""
    digest, total = hashlib.sha256(), 0
    for p in sorted(stats):
        size = stats[p][0]
        total += size
        digest.update(f"{p}\0{size}\0".encode())
    return f"{len(stats)} files, {total:,} bytes, list {digest.hexdigest()[:12]}"


def config_name(root: str, fingerprint_: str) -> str:
    """`<root's last name>_<fingerprint>`: the TFDS config a source is built into."""
    slug = re.sub(r"[^a-z0-9]+", "_", storage.basename(root).lower()).strip("_") or "root"
    return f"{slug[:40]}_{fingerprint_}"


def read_files(root: str, relpaths: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """(relpath, bytes) of each file in order; a gs:// prefix's objects fetched READ_BATCH at a time."""
    relpaths = list(relpaths)
    if not storage.is_remote(root):
        for p in relpaths:
            yield p, (Path(root) / p).read_bytes()
        return
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    for start in range(0, len(relpaths), READ_BATCH):
        batch = relpaths[start:start + READ_BATCH]
        names = [storage.join(root, p)[len("gs://"):] for p in batch]  # gcsfs keys its answer this way
        got = storage.retrying(functools.partial(fs.cat, names, on_error="raise"), f"reading data.source={root!r}")
        for p, name in zip(batch, names):
            yield p, got[name]
