"""A Google Cloud Storage server on 127.0.0.1 for the tests: gcp-storage-emulator (PyPI), run
as its own process, with GCS's object generations added where the emulator leaves them out.

Real GCS (https://cloud.google.com/storage/docs/request-preconditions):
* refuses an upload or delete whose `ifGenerationMatch` does not hold with HTTP 412
  (`ifGenerationMatch=0`: the object must not exist yet);
* answers a media download with the object's generation in `x-goog-generation`, refuses one
  whose `ifGenerationMatch` fails with 412, and answers one whose `ifGenerationNotMatch`
  names the current generation with 304 Not Modified.
The emulator does none of this. Without it the one-writer lease (train/lease.py) would pass
its tests without being right, and tensorstore's OCDBT manifest updates (orbax's checkpoint
format), which read the generation and write conditionally, fail with "Malformed
StorageGeneration". So this launcher wraps the emulator's insert, delete and download
handlers with exactly those rules. The rest (JSON API, resumable uploads, listing, object
bytes) is the emulator's own.

usage: python tests/gcs_server.py PORT BUCKET [DATA_DIR]   (no DATA_DIR: in memory)
"""

from __future__ import annotations

import logging
import os
import sys
from http import HTTPStatus

from gcp_storage_emulator import server, storage
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str) -> str:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def _precondition(handler, object_name):
    def wrapped(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        name = object_name(request)
        if wanted and name is not None:
            current = _generation(storage, request.params["bucket_name"], name)
            if wanted[0] != current:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you "
                                         "specified did not hold.", "errors": [{"reason": "conditionNotMet"}]}})
                return None
        return handler(request, response, storage, *args, **kwargs)

    return wrapped


def _download(handler):
    def wrapped(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        current = _generation(storage, bucket, name)
        match, not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
        if current != "0":
            if match and match[0] != current:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
            if not_match and not_match[0] == current:
                response.status = HTTPStatus.NOT_MODIFIED
                response["x-goog-generation"] = current
                return None
            response["x-goog-generation"] = current
            response["x-goog-metageneration"] = "1"
        return handler(request, response, storage, *args, **kwargs)

    return wrapped


def _upload_name(request):
    if "upload_id" in request.query:  # a later chunk of a resumable upload: checked when it was started
        return None
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data if isinstance(request.data, dict) else {}
    return (data.get("meta") or {}).get("name") or data.get("name")


def _install() -> None:
    insert = _precondition(objects.insert, _upload_name)
    delete = _precondition(objects.delete, lambda r: r.params["object_id"])
    download = _download(objects.download)
    replaced = {objects.insert: insert, objects.delete: delete, objects.download: download}
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            handlers[method] = replaced.get(handler, handler)
    objects.insert = insert  # the router's fallback for uploads posted without the /upload prefix
    objects.download = download  # objects.get's alt=media path calls it by this name


def _atomic_files() -> None:
    """On disk (DATA_DIR) the emulator rewrites its whole index (.meta) and each object's file in
    place, so a server killed mid-write (what the stop-mid-save test does) can leave the index
    truncated, and the restart dies reading it. GCS never loses what it acknowledged: every file is
    written beside its place and renamed over it, so a kill leaves the old version or the new."""
    write = storage._FileStore.write_bytes

    def atomic(self, rel: str, content: bytes) -> None:
        if self._use_memory:
            return write(self, rel, content)
        path = self._disk_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        partial.write_bytes(content)
        os.replace(partial, path)
        return None

    storage._FileStore.write_bytes = atomic


def main(argv: list[str]) -> None:
    port, bucket = int(argv[0]), argv[1]
    data_dir = argv[2] if len(argv) > 2 else None
    logging.basicConfig(level=logging.CRITICAL)  # the emulator logs every 404 as an error
    _install()
    _atomic_files()
    srv = server.create_server("127.0.0.1", port, in_memory=data_dir is None, default_bucket=bucket,
                               data_dir=data_dir)
    print("ready", flush=True)
    srv.run()


if __name__ == "__main__":
    main(sys.argv[1:])
