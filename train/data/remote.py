"""A TFDS data dir in Cloud Storage (`data.data_dir=gs://...`): built once, read by every host.

A pod has no shared disk, so the prepared dataset, the token shards and the SentencePiece
model live in the bucket: process 0 makes them (train/loop.py `process_zero_first`), the
other hosts only read the bucket, and nothing is written to another host's disk. What the
libraries allow decided the shape:

* Reading: array_record's reader (0.8.6, the version pinned here) opens `gs://` paths itself,
  through the Google Cloud C++ client, so TFDS's `as_data_source()` reads the dataset from the
  bucket with random access and no local copy (a copy would be a second cache per host, to
  fill and to keep coherent; a pod host's disk may not hold the corpus). That client finds
  an emulator through its own variable, `CLOUD_STORAGE_EMULATOR_ENDPOINT`, which
  train/storage.py `use_emulator` derives from `STORAGE_EMULATOR_HOST` with tensorstore's;
  without it the reader would ask the real GCS and, with no network, hang.
* Writing: array_record's writer opens local files only (riegeli's FdWriter: google/array_record
  #120, tensorflow/datasets #10981), so TFDS cannot write an array_record dataset into a bucket.
  `build_and_upload` builds it in a local temporary folder on the building host (TFDS's own
  `incomplete.*` then rename happens there, on a real filesystem), then uploads the finished
  version folder: the data files first, `features.json` and `dataset_info.json` last. TFDS
  calls a version folder prepared only when both JSON files exist, so a reader never sees a
  half-uploaded dataset as ready (GCS has no rename, and TFDS's own rename of its
  `incomplete.*` prefix on GCS is a copy of each object then a delete: not atomic); an upload
  cut short is rebuilt and uploaded again by the next run. The staging folder is the
  building host's own temporary directory ($TMPDIR), removed when the upload ends.
* A gs:// source lists the same (name, size, generation) on every host, so all hosts name
  the same dataset. A local source on each host's own disk has that host's mtimes in its
  fingerprint: each host then builds (into the bucket) its own copy; put a pod's corpus in
  the bucket.
* Derived files are objects: the token shards (shards.py; each uploaded whole, its .json
  record after it, the index last) and `sentencepiece.model` appear whole when their upload
  ends (train/storage.py `write_bytes`), the atomicity `os.replace` gives on disk. Shards are
  read by byte range, never loaded whole.
"""

from __future__ import annotations

import functools
import os
import tempfile

from .. import storage

LAST = ("features.json", "dataset_info.json")  # TFDS: a version folder with both is prepared


def checked_root(data_dir: str, field: str) -> str:
    """A gs:// data dir, normalized, its bucket and credentials checked: StorageError naming `field`."""
    url = storage.normalize(data_dir, field)
    storage.use_emulator()  # a variable set after import (tests, notebooks) still counts
    storage.check_bucket(url, field)
    return url


def probe_write(url: str, field: str) -> None:
    """Write and delete a small object, so a read-only bucket fails before the build."""
    probe = storage.join(url, f".write-test-{os.getpid()}")
    try:
        storage.retrying(lambda: storage.write_bytes(probe, b""), f"{field}={url!r}")
        storage.path(probe).unlink()
    except storage.StorageUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - gcsfs raises OSError, HttpError or ValueError
        raise storage.classify(err, url, field) from None


def build_and_upload(make_builder, data_dir: str, build) -> None:
    """Build the dataset of `make_builder(local data dir)` with `build(builder, target)` in a
    local temporary folder, then upload its version folder to the same place under `data_dir`."""
    with tempfile.TemporaryDirectory(prefix="matrixmagic-tfds-") as stage:
        builder = make_builder(stage)
        local = str(builder.data_dir)
        target = storage.join(data_dir, os.path.relpath(local, stage).replace(os.sep, "/"))
        build(builder, target)
        upload_tree(local, target)


def upload_tree(local: str, target: str) -> None:
    """Every file below `local` to the same relative name under the gs:// `target`; LAST files last."""
    import gcsfs

    files = sorted(os.path.relpath(os.path.join(root, name), local).replace(os.sep, "/")
                   for root, _, names in os.walk(local) for name in names)
    first = [f for f in files if f not in LAST]
    fs = gcsfs.GCSFileSystem()
    for group in (first, *([f] for f in LAST if f in files)):
        if group:
            sources = [os.path.join(local, f) for f in group]
            targets = [storage.join(target, f) for f in group]
            storage.retrying(functools.partial(fs.put, sources, targets), f"uploading the dataset to {target}")
