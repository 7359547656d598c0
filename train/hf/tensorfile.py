"""The safetensors format, read one tensor at a time and written as a stream.

A `.safetensors` file is an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets: [begin, end]}, optional "__metadata__"}), then the
raw little-endian bytes, offsets counted from the end of the header. We read it
ourselves rather than through `safetensors.numpy`: its numpy API has no bfloat16, and
loading a file there means loading all of it. Here `read_headers` validates every
entry against the file size (a truncated download is an error naming the tensor
before anything is read), and `read` pulls one tensor's bytes with a positioned read,
so host memory holds one tensor at a time whatever the checkpoint's size.
bfloat16 comes from ml_dtypes (a jax dependency).

Sharded checkpoints (`model.safetensors.index.json`: {"weight_map": {name: file}}) are
read as one table; `write_checkpoint` writes one file or shards of at most
`max_shard_bytes` plus that index, as `transformers.save_pretrained` does.

Paths are local or `gs://` (train/storage.py): every file is opened through epath, so a
tensor in Cloud Storage is one ranged read of its bytes (never a download of the file),
and a written file is streamed to its object, which appears whole when it is closed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any, Callable, Iterable, Optional

import ml_dtypes
import numpy as np

from .. import storage
from .errors import HFError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # the reference implementation's own limit
DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
          "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
CODES = {dtype: code for code, dtype in DTYPES.items()}
FLOATS = ("F64", "F32", "F16", "BF16")  # the codes that can hold NaN or inf


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute byte range, dtype code and shape."""

    name: str
    path: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _size(path: str) -> int:
    return storage.path(path).stat().length


def _is_file(path: str) -> bool:
    return storage.path(path).is_file()


def _header(path: str) -> tuple[dict, int]:
    size = _size(path)
    with storage.path(path).open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HFError(f"{path} is {size} bytes: too short for a safetensors file (truncated download?).")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise HFError(f"{path}: its header claims {length:,} bytes but the file has {size:,}: the file is "
                          f"truncated or not safetensors; download it again.")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise HFError(f"{path}: the header is not valid JSON ({err}); the file is damaged, download it again.") from None
    if not isinstance(header, dict):
        raise HFError(f"{path}: the header is not a JSON object; the file is not safetensors.")
    return header, 8 + length


def read_header(path: str) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of one file, every entry checked against the file's size."""
    header, data_start = _header(path)
    size = _size(path)
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise HFError(f"{path}: the header entry of {name!r} lacks dtype, shape or data_offsets.") from None
        if code not in DTYPES:
            raise HFError(f"{path}: tensor {name!r} has dtype {code}; only {', '.join(DTYPES)} can be read.")
        expected = math.prod(shape) * DTYPES[code].itemsize
        if end - begin != expected:
            raise HFError(f"{path}: tensor {name!r} {code}{list(shape)} needs {expected:,} bytes but its offsets span "
                          f"{end - begin:,}; the file is damaged.")
        if data_start + end > size:
            raise HFError(f"{path} is truncated: tensor {name!r} ends at byte {data_start + end:,} but the file has "
                          f"{size:,}; download it again.")
        out[name] = TensorInfo(name, path, code, shape, data_start + begin, data_start + end)
    return out


def read_checkpoint(directory: str) -> dict[str, TensorInfo]:
    """Every tensor of a model directory: `model.safetensors`, or the shards its index names."""
    single, index = storage.join(directory, SINGLE_FILE), storage.join(directory, INDEX_FILE)
    if _is_file(index):
        try:
            weight_map = json.loads(storage.read_text(index))["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise HFError(f"{index} is not a safetensors index (no 'weight_map'); download it again.") from None
        tables = {}
        for file in sorted(set(weight_map.values())):
            path = storage.join(directory, file)
            if not _is_file(path):
                names = sorted(n for n, f in weight_map.items() if f == file)
                raise HFError(f"{index} puts {len(names)} tensors (e.g. {names[0]!r}) in {file}, which is missing; "
                              f"download every shard.")
            tables[file] = read_header(path)
        for name, file in weight_map.items():
            if name not in tables[file]:
                raise HFError(f"{index} lists tensor {name!r} in {file}, but that shard does not hold it.")
        return {name: tables[file][name] for name, file in weight_map.items()}
    if _is_file(single):
        return read_header(single)
    others = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack") if
              storage.exists(storage.join(directory, n))]
    hint = (f" It holds {others[0]}: convert it once with transformers (`AutoModel.from_pretrained(dir)"
            f".save_pretrained(dir)` writes safetensors).") if others else ""
    raise HFError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}.{hint}")


def read(info: TensorInfo) -> np.ndarray:
    """The tensor's values (one positioned read; nothing else of the file is touched). Values
    that are NaN or inf are an error naming the tensor: a model with them gives NaN for every
    token, and the check is one pass over bytes already in memory."""
    out = np.empty(info.shape, DTYPES[info.dtype])
    view = out.reshape(-1).view(np.uint8).data  # a memoryview of out's bytes, which readinto fills
    with storage.path(info.path).open("rb") as f:
        f.seek(info.begin)
        got = f.readinto(view)
    if got != info.nbytes:
        raise HFError(f"{info.path}: tensor {info.name!r} could be read only partly ({got} of {info.nbytes} bytes): "
                      f"the file changed or is truncated.")
    if info.dtype in FLOATS and not np.isfinite(out).all():
        raise HFError(f"{info.path}: tensor {info.name!r} holds NaN or inf values: the checkpoint is damaged; "
                      f"download it again, or export it again from a model whose weights are finite.")
    return out


# ----------------------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class Planned:
    """A tensor to write: its name, shape and dtype are known before its values are."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def _shards(tensors: list[Planned], max_shard_bytes: Optional[int]) -> list[list[Planned]]:
    if not max_shard_bytes:
        return [tensors]
    shards: list[list[Planned]] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def write_file(path: str, tensors: list[Planned], produce: Callable[[Planned], np.ndarray],
               metadata: Optional[dict] = None) -> int:
    """Write one safetensors file: the header first (the offsets follow from the shapes), then
    each tensor's bytes as `produce` returns them, one at a time. Returns the data bytes."""
    entries: dict[str, dict[str, Any]] = {}  # name -> its header entry (strings, shapes, offsets)
    offset = 0
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for t in tensors:
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        entries[t.name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as the reference writer pads it
    with storage.path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for t in tensors:
            value = np.ascontiguousarray(produce(t))
            if value.shape != t.shape or value.dtype != t.dtype:
                raise AssertionError(f"{t.name}: produced {value.dtype}{list(value.shape)}, planned "
                                     f"{t.dtype}{list(t.shape)}")
            f.write(value.reshape(-1).view(np.uint8).data)
    return offset


def write_checkpoint(directory: str, tensors: Iterable[Planned], produce: Callable[[Planned], np.ndarray],
                     max_shard_bytes: Optional[int] = None) -> list[str]:
    """`model.safetensors`, or `model-0000k-of-0000n.safetensors` shards plus the index when the
    tensors exceed `max_shard_bytes`; returns the files written."""
    shards = _shards(list(tensors), max_shard_bytes)
    metadata = {"format": "pt"}  # transformers refuses files whose metadata names no known framework
    if len(shards) == 1:
        write_file(storage.join(directory, SINGLE_FILE), shards[0], produce, metadata)
        return [SINGLE_FILE]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    total = sum(write_file(storage.join(directory, n), s, produce, metadata) for n, s in zip(names, shards))
    index = {"metadata": {"total_size": total}, "weight_map": {t.name: n for n, s in zip(names, shards) for t in s}}
    storage.write_text(storage.join(directory, INDEX_FILE), json.dumps(index, indent=2))
    return names + [INDEX_FILE]
