"""Prepared token data: each split is one token stream, stored as shards plus an index.

What `magic data prepare` writes into its output folder (local or `gs://`):

* `train-00000.bin`, `train-00001.bin`, ... and `validation-00000.bin`, ...: raw little-endian
  token ids (uint16 when the padded vocabulary fits, else int32), each document written as
  `[eot, *ids]`. Shard k of a split holds the documents of plan task k (prepare.py), so the
  split's stream is the shards concatenated in order: exactly the stream the in-memory packer
  of earlier versions built, so rows come out identical.
* `train-00000.json`, ...: written after its shard, {tokens, documents}: the shard is finished.
* `matrixmagic-shards.json` (the index), written last: format, tokenizer, dtype, specials, the
  source's fingerprint and every shard's token count.

Why a stream and not rows: rows are cut at read time (`PackedRows`), row r being tokens
[r * L, (r + 1) * L) of the stream, the last row padded. One prepared folder serves every
data.seq_len and every family, so no run can read rows of the wrong length, and a document
longer than a row continues in the next row as it did before. Opening a split reads the
index and the shard sizes only (no pass over the data, no load): start-up does not grow with
the corpus. Local shards are memory-mapped; shards in a bucket are read by byte range.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import tempfile

import numpy as np

from .. import storage
from .sources import CorpusError

FORMAT = "matrixmagic-shards/1"
INDEX = "matrixmagic-shards.json"
SPLITS = ("train", "validation")
OPEN_SHARDS = 64  # memory maps kept open per split (TokenStream._shard)


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.bin"


def done_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.json"


def token_dtype(padded_vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if padded_vocab_size <= 2**16 else np.int32)


def is_prepared(path) -> bool:
    """A folder holding a finished prepare (its index)."""
    try:
        return storage.exists(storage.join(str(path), INDEX))
    except Exception:  # noqa: BLE001 - a source that is not a folder (or not reachable) is not prepared data
        return False


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Shard k of `split`, written one document at a time (`add`), so memory holds one document.
    `commit` makes it appear whole, renamed from a temporary file (or uploaded as one object),
    then writes its .json; a writer that is never committed leaves nothing behind."""

    def __init__(self, out: str, split: str, k: int, eot_id: int, dtype):
        self.out, self.split, self.k = out, split, k
        self.dtype, self.eot = np.dtype(dtype), np.array([eot_id], np.dtype(dtype))
        self.tokens = self.documents = 0
        folder = tempfile.gettempdir() if storage.is_remote(out) else out
        fd, self.tmp = tempfile.mkstemp(prefix=f".{shard_name(split, k)}.", suffix=".tmp", dir=folder)
        self.file = os.fdopen(fd, "wb")

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and np.any(ids == self.eot[0]):
            raise CorpusError("a document encodes to eot_id: the tokenizer must never emit specials.")
        self.eot.tofile(self.file)
        ids.astype(self.dtype, copy=False).tofile(self.file)
        self.tokens += 1 + ids.size
        self.documents += 1

    def commit(self) -> dict:
        self.file.close()
        os.chmod(self.tmp, 0o644)  # mkstemp makes 0600; a shared data dir needs the shards readable
        target = storage.join(self.out, shard_name(self.split, self.k))
        if storage.is_remote(self.out):
            import gcsfs  # streams the file; the object appears when the upload finishes

            storage.retrying(lambda: gcsfs.GCSFileSystem().put_file(self.tmp, target), f"uploading {target}")
            os.remove(self.tmp)
        else:
            os.replace(self.tmp, target)
        record = {"tokens": self.tokens, "documents": self.documents}
        storage.write_text(storage.join(self.out, done_name(self.split, self.k)), json.dumps(record))
        return record

    def discard(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def finished(out: str, split: str, k: int, itemsize: int, sizes: dict[str, int]) -> dict | None:
    """The .json record of a shard whose .bin is whole, else None (it must be written again).
    `sizes`: the folder's listing (`sizes`), so a resume in a bucket asks once, not per shard."""
    if done_name(split, k) not in sizes:
        return None
    try:
        record = json.loads(storage.read_text(storage.join(out, done_name(split, k))))
        whole = sizes.get(shard_name(split, k)) == record["tokens"] * itemsize
    except (ValueError, KeyError, TypeError):  # a record cut short by a crash: write the shard again
        return None
    return record if whole else None


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass
class TokenStream:
    """One split's stream: `read(start, n)` gives tokens [start, start + n), shards stitched."""

    root: str
    files: list[str]
    counts: np.ndarray  # tokens per shard
    dtype: np.dtype

    def __post_init__(self):
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self.total = int(self.offsets[-1])
        self._maps: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def _shard(self, i: int) -> np.ndarray:
        """Shard i memory-mapped; the OPEN_SHARDS most recently read stay open (each map holds a
        file descriptor, and shuffled rows touch every shard of a corpus of thousands)."""
        if i in self._maps:
            self._maps.move_to_end(i)
        else:
            path = storage.join(self.root, self.files[i])
            self._maps[i] = np.memmap(path, self.dtype, mode="r", shape=(int(self.counts[i]),))
            if len(self._maps) > OPEN_SHARDS:
                self._maps.popitem(last=False)
        return self._maps[i]

    def pieces(self, start: int, n: int) -> list[tuple[int, int, int]]:
        """(shard, first token in it, count) covering [start, min(start + n, total))."""
        out, end = [], min(start + n, self.total)
        while start < end:
            i = int(np.searchsorted(self.offsets, start, side="right")) - 1
            take = min(end, int(self.offsets[i + 1])) - start
            if take > 0:
                out.append((i, start - int(self.offsets[i]), take))
            start += max(take, 0)
        return out

    def read_rows(self, starts: np.ndarray, length: int, pad_id: int) -> np.ndarray:
        """[len(starts), length]: tokens from each start, padded past the end of the stream."""
        rows = np.full((len(starts), length), pad_id, self.dtype)
        if storage.is_remote(self.root):
            self._read_remote(rows, starts, length)
            return rows
        for r, start in enumerate(starts):
            at = 0
            for i, first, take in self.pieces(int(start), length):
                rows[r, at : at + take] = self._shard(i)[first : first + take]
                at += take
        return rows

    def _read_remote(self, rows: np.ndarray, starts: np.ndarray, length: int) -> None:
        """Every piece of every row in one concurrent batch of byte-range requests (gcsfs)."""
        import gcsfs

        plan = [(r, at, piece) for r, start in enumerate(starts)
                for at, piece in _placed(self.pieces(int(start), length))]
        if not plan:
            return
        size = self.dtype.itemsize
        paths = [storage.join(self.root, self.files[i]) for _, _, (i, _, _) in plan]
        begins = [first * size for _, _, (_, first, _) in plan]
        ends = [(first + take) * size for _, _, (_, first, take) in plan]
        fs = gcsfs.GCSFileSystem()
        blobs = storage.retrying(lambda: fs.cat_ranges(paths, begins, ends, on_error="raise"),
                                 f"reading shards in {self.root}")
        for (r, at, (_, _, take)), blob in zip(plan, blobs):
            rows[r, at : at + take] = np.frombuffer(blob, self.dtype)


def _placed(pieces):
    at = 0
    for piece in pieces:
        yield at, piece
        at += piece[2]


class PackedRows:
    """Rows of `row_len` tokens over a stream: row r is tokens [r * L, (r + 1) * L), the last
    row padded with `pad_id` (at least one row). Index it with an
    int array: `rows[ids]` is [len(ids), row_len]."""

    def __init__(self, stream: TokenStream, row_len: int, pad_id: int):
        self.stream, self.row_len, self.pad_id = stream, int(row_len), int(pad_id)
        self.num_rows = max(1, math.ceil(stream.total / self.row_len))
        self.shape = (self.num_rows, self.row_len)
        self.dtype = stream.dtype

    def __len__(self) -> int:
        return self.num_rows

    @property
    def tokens(self) -> int:
        return self.stream.total

    @property
    def full_rows(self) -> int:
        """Rows with no padding."""
        return self.stream.total // self.row_len

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if ids.ndim != 1:
            raise TypeError("PackedRows takes a 1-D array of row ids")
        ids = np.where(ids < 0, ids + self.num_rows, ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_rows):
            raise IndexError(f"row ids must lie in [0, {self.num_rows})")
        return self.stream.read_rows(ids * self.row_len, self.row_len, self.pad_id)

    def __array__(self, dtype=None, copy=None):
        rows = self[np.arange(self.num_rows)]
        return rows if dtype is None else rows.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A finished prepare: its index, opened; `rows(split, row_len)` reads it."""

    root: str
    index: dict

    @property
    def tokenizer_key(self) -> str:
        return self.index["tokenizer"]

    @property
    def fingerprint(self) -> dict:
        return self.index["source"]

    def stream(self, split: str) -> TokenStream:
        entry = self.index["splits"][split]
        files = [name for name, _ in entry["shards"]]
        counts = np.array([tokens for _, tokens in entry["shards"]], np.int64)
        return TokenStream(self.root, files, counts, np.dtype(self.index["dtype"]))

    def rows(self, split: str, row_len: int) -> PackedRows:
        return PackedRows(self.stream(split), row_len, self.index["pad_id"])


def open_prepared(root: str, field: str = "data.source") -> Prepared:
    """The index at `root`, checked: format, and every shard present at its indexed size (one stat
    or one listing, never a read), so a truncated or missing shard fails here, naming the file."""
    root = str(root)
    index_path = storage.join(root, INDEX)
    try:
        index = json.loads(storage.read_text(index_path))
    except FileNotFoundError:
        raise CorpusError(f"{field}={root!r} holds no prepared data ({INDEX} is missing): prepare it with "
                          f"`magic data prepare SOURCE --out {root}`, or rerun an interrupted prepare.") from None
    except (ValueError, KeyError) as err:
        raise CorpusError(f"{field}={root!r}: {index_path} is not a readable index ({err}): prepare the "
                          f"source again into a new folder.") from None
    if index.get("format") != FORMAT:
        raise CorpusError(f"{field}={root!r} was prepared in format {index.get('format')!r}; this version reads "
                          f"{FORMAT!r}: prepare the source again with this version.")
    itemsize = np.dtype(index["dtype"]).itemsize
    sizes = listing(root)
    for split in SPLITS:
        for name, tokens in index["splits"][split]["shards"]:
            want, have = tokens * itemsize, sizes.get(name)
            if have != want:
                state = "is missing" if have is None else f"has {have:,} bytes"
                raise CorpusError(
                    f"{field}={root!r}: shard {storage.join(root, name)} {state}, its index says {want:,} bytes "
                    f"(a copy cut short?): copy the folder again, or prepare the source again into a new folder.")
    return Prepared(root, index)


def listing(root: str) -> dict[str, int]:
    """{file name: size} of the folder's files (one listing in a bucket)."""
    if storage.is_remote(root):
        import gcsfs

        fs = gcsfs.GCSFileSystem()
        fs.invalidate_cache(root)  # a listing cached earlier in this process would show old sizes
        entries = storage.retrying(lambda: fs.ls(root, detail=True), f"listing {root}")
        return {storage.basename(e["name"]): int(e["size"]) for e in entries if e.get("type") == "file"}
    return {e.name: e.stat().st_size for e in os.scandir(root) if e.is_file()}
