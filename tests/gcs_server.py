"""A Google Cloud Storage server on 127.0.0.1 for the tests: gcp-storage-emulator (PyPI), run
as its own process, with GCS's generation preconditions added.

Real GCS refuses an upload or delete whose `ifGenerationMatch` does not hold with HTTP 412
(`ifGenerationMatch=0`: the object must not exist yet). The emulator ignores the parameter,
which would let the one-writer lease (train/lease.py) pass its tests without being right, so
this launcher wraps the emulator's insert and delete handlers with exactly that rule. The
rest of the server (JSON API, resumable uploads, listing, downloads) is the emulator's own.

usage: python tests/gcs_server.py PORT BUCKET [DATA_DIR]   (no DATA_DIR: in memory)
"""

from __future__ import annotations

import logging
import sys
from http import HTTPStatus

from gcp_storage_emulator import server
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
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is objects.insert:
                handlers[method] = insert
            elif handler is objects.delete:
                handlers[method] = delete
    objects.insert = insert  # the router's fallback for uploads posted without the /upload prefix


def main(argv: list[str]) -> None:
    port, bucket = int(argv[0]), argv[1]
    data_dir = argv[2] if len(argv) > 2 else None
    logging.basicConfig(level=logging.CRITICAL)  # the emulator logs every 404 as an error
    _install()
    srv = server.create_server("127.0.0.1", port, in_memory=data_dir is None, default_bucket=bucket,
                               data_dir=data_dir)
    print("ready", flush=True)
    srv.run()


if __name__ == "__main__":
    main(sys.argv[1:])
