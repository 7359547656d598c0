"""Run paths: a local path or a `gs://` URL, one type for every file a run reads or writes.

TPU VMs in a pod share no filesystem, so a pod run keeps its checkpoints, logs and data in
Cloud Storage, as MaxText, Levanter and EasyLM do. Why this shape:

* One path type, etils `epath`: orbax, TFDS and grain already speak it, so a `gs://` workdir
  reaches orbax (whose arrays go to GCS through tensorstore directly, with no local staging
  copy) and a `gs://` data_dir reaches TFDS unchanged. Code here never calls `open()` or
  `os.path` on a run path; it calls `path()` and the helpers below.
* Run paths stay strings in the configs (they are hashed, compared and printed); `normalize`
  is their one gate: `~` expanded, a local path made absolute, a URL's scheme and bucket
  checked. Any other scheme (`s3://`, `gcs://`) is refused naming the field, instead of
  becoming a local folder named `s3:`.
* The emulator convention of Google's own client libraries: when `STORAGE_EMULATOR_HOST`
  is set, every GCS access goes there with no other setting: gcsfs/epath read that
  variable themselves; tensorstore (orbax's arrays) reads `TENSORSTORE_GCS_HTTP_URL` and,
  for its test token, `GOOGLE_AUTH_TOKEN_FOR_TESTING`, which `use_emulator` derives.
* gcsfs's experimental zonal-bucket support first asks a gRPC endpoint what kind of bucket
  it is, which against an emulator (or without network) waits about a minute before it
  falls back; `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` skips the question (plain buckets,
  the only kind training writes to, need none of it).
* Credentials are checked before any work: without them (and without an emulator) a
  `gs://` path is one error saying what to set, not a traceback from deep inside orbax.
* Object storage has no rename and no append. A file written here appears whole when it is
  closed (GCS commits an object at the end of its upload), which is the atomicity a local
  write gets from a temporary name plus `os.replace`; `write_bytes` gives both the same way.
  Transient errors (HTTP 429/5xx, a dropped connection) are retried with backoff by gcsfs
  and tensorstore themselves; our own requests (train/lease.py) retry the same way.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import TypeVar

from matrixmagic.configs import ConfigError

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# tensorstore's GCS endpoint (orbax's arrays) and array_record's reader's (Google's C++ client)
DERIVED_ENV = ("TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT")
SCHEMES = ("gs",)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")  # GCS bucket naming rules (3-222 characters)

T = TypeVar("T")


class StorageError(ConfigError):
    """A cloud path cannot be used (scheme, bucket, credentials, permission); the message says what to do."""


class StorageUnavailable(StorageError):
    """The storage service stopped answering mid-run: a retry later is the fix (exit 75)."""


def use_emulator(env: MutableMapping[str, str] = os.environ) -> None:
    """Point tensorstore and gcsfs at the emulator `STORAGE_EMULATOR_HOST` names, if any, and
    turn off gcsfs's gRPC bucket probe. Idempotent; an explicit setting of the user's wins."""
    env.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    host = env.get(EMULATOR_ENV, "").strip()
    if not host:
        return
    url = host if "://" in host else f"http://{host}"
    env[EMULATOR_ENV] = url
    # The derived variables follow STORAGE_EMULATOR_HOST, also when set before: a value left by
    # an earlier emulator (another test, a notebook cell) would send tensorstore or array_record
    # to a server that is gone while gcsfs talks to the new one.
    for name in DERIVED_ENV:
        env[name] = url
    env.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore's token for a test server


use_emulator()  # before gcsfs or tensorstore is first imported: both read their settings once


def bound_tensorstore_retries(env: Mapping[str, str] = os.environ) -> None:
    """tensorstore retries a failed GCS request 32 times with backoff up to 32 s (about 15
    minutes) before an orbax save fails: right for a pod run riding out a blip, long for a
    test of a dead server. With MATRIXMAGIC_STORAGE_RETRIES=N its checkpoint reads and writes
    give up after N tries, like ours. orbax builds every tensorstore context from the two
    dicts below (orbax/checkpoint/_src/serialization/tensorstore_utils.py) and has no option
    for it, hence the update in place; unset, nothing changes."""
    attempts = env.get("MATRIXMAGIC_STORAGE_RETRIES")
    if not attempts:
        return
    from orbax.checkpoint._src.serialization import tensorstore_utils

    retries = {"max_retries": int(attempts), "initial_delay": "0.5s", "max_delay": "4s"}
    for context in (tensorstore_utils._BASE_TS_CONTEXT, tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):
        context["gcs_request_retries"] = retries


def is_url(path: object) -> bool:
    return bool(_URL.match(str(path)))


def is_remote(path: object) -> bool:
    """A `gs://` URL (after normalize, the only URL a run path can be)."""
    return str(path).startswith("gs://")


def normalize(path: str, field: str) -> str:
    """The canonical string of a run path: `~` expanded and made absolute for a local path; a
    `gs://bucket/...` URL checked and its trailing slashes dropped. StorageError names `field`."""
    text = str(path).strip()
    match = _URL.match(text)
    if not match:
        return os.path.abspath(os.path.expanduser(text))
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in SCHEMES:
        raise StorageError(f"{field}={text!r}: the {scheme}:// scheme is not supported; give a local path or a "
                           f"gs://BUCKET/PATH URL (Google Cloud Storage).")
    bucket = rest.split("/", 1)[0]
    if not _BUCKET.match(bucket):
        raise StorageError(f"{field}={text!r}: {bucket!r} is not a valid bucket name; write gs://BUCKET/PATH with "
                           f"a bucket of 3-222 lowercase letters, digits, '-', '_' or '.'.")
    return "gs://" + rest.rstrip("/")


def bucket_of(url: str) -> str:
    return url[len("gs://"):].split("/", 1)[0]


def path(p: object):
    """An epath.Path for a run path (local or gs://)."""
    from etils import epath

    return epath.Path(str(p))


def join(base: str, *parts: str) -> str:
    """A child of a run path, as a string (`os.path.join` turns `gs://b` into a local path on some inputs)."""
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)]) if is_remote(base) \
        else os.path.join(base, *parts)


def parent(p: str) -> str:
    return p.rstrip("/").rsplit("/", 1)[0] if is_remote(p) else os.path.dirname(p)


def basename(p: str) -> str:
    return str(p).rstrip("/").rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------- credentials


def _credentials_message(field: str, url: str, reason: str) -> str:
    return (f"{field}={url!r} needs Google Cloud credentials ({reason}): run `gcloud auth application-default "
            f"login` (or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file; on a TPU or GCE VM the "
            f"VM's service account is found by itself), or set {EMULATOR_ENV}=HOST:PORT to use a local emulator.")


def check_credentials(url: str, field: str) -> None:
    """StorageError before any work when a gs:// path has neither credentials nor an emulator."""
    if not is_remote(url) or os.environ.get(EMULATOR_ENV):
        return
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
    except ImportError as err:  # gcsfs brings google-auth; a minimal install may lack both
        raise StorageError(f"{field}={url!r}: gs:// paths need the gcsfs package: pip install gcsfs.") from err
    try:
        google.auth.default()
    except DefaultCredentialsError:
        raise StorageError(_credentials_message(field, url, "none found")) from None


def check_bucket(url: str, field: str) -> None:
    """StorageError when a gs:// path's bucket does not exist or cannot be read (after credentials)."""
    if not is_remote(url):
        return
    check_credentials(url, field)
    bucket = bucket_of(url)
    try:
        exists = retrying(lambda: path(f"gs://{bucket}").exists(), f"{field}={url!r}")
    except StorageUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - gcsfs raises OSError/HttpError/ValueError for the same refusals
        raise classify(err, url, field) from None
    if not exists:
        raise StorageError(f"{field}={url!r}: the bucket gs://{bucket} does not exist (or this account cannot see "
                           f"it): create it (`gcloud storage buckets create gs://{bucket}`) or name another.")


def classify(err: BaseException, url: str, field: str) -> StorageError:
    """One StorageError for a storage failure: permission, missing bucket, or the service gone."""
    text = f"{type(err).__name__}: {err}"
    if is_transient(err):
        return StorageUnavailable(f"{field}={url!r}: the storage service did not answer ({short(err)}); nothing was "
                                  f"lost: rerun the same command when it is reachable again.")
    if "403" in text or "Forbidden" in text or "PermissionError" in text or "PERMISSION_DENIED" in text:
        return StorageError(f"{field}={url!r}: permission denied ({short(err)}): give this account read and write "
                            f"access to the bucket (roles/storage.objectAdmin) or use another path.")
    if "401" in text or "Unauthorized" in text or "UNAUTHENTICATED" in text:
        return StorageError(_credentials_message(field, url, "they were refused"))
    if "404" in text or "NOT_FOUND" in text or "FileNotFoundError" in text:
        return StorageError(f"{field}={url!r}: not found ({short(err)}): check the bucket and path.")
    return StorageError(f"{field}={url!r}: {short(err)}")


_TRANSIENT = ("Connection refused", "Cannot connect", "ConnectionReset", "Connection reset", "ServerDisconnected",
              "Server disconnected", "UNAVAILABLE", "Timeout", "timed out", "503", "502", "504", "429",
              "ClientConnectorError", "RemoteDisconnected", "Connection aborted", "Failed to connect")


def is_transient(err: BaseException | None) -> bool:
    """A dropped or refused connection, a timeout, HTTP 429/5xx, anywhere in the chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, TimeoutError)) or any(t in str(err) for t in _TRANSIENT):
            return True
        err = err.__cause__ or err.__context__
    return False


def short(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def retrying(fn: Callable[[], T], what: str, attempts: int | None = None, first_delay: float = 0.5) -> T:
    """fn(), retried with exponential backoff on transient errors; StorageUnavailable when they last.
    MATRIXMAGIC_STORAGE_RETRIES overrides the attempt count (tests shorten it)."""
    attempts = attempts or int(os.environ.get("MATRIXMAGIC_STORAGE_RETRIES", "6"))
    delay = first_delay
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # only transient ones are retried (re-raised below otherwise)
            if not is_transient(err):
                raise
            if attempt == attempts - 1:
                raise StorageUnavailable(f"{what}: the storage service did not answer after {attempts} tries "
                                         f"({short(err)}); nothing was lost: rerun the same command when it is "
                                         f"reachable again.") from None
            time.sleep(delay)
            delay = min(delay * 2, 16.0)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- small files


def exists(p: str) -> bool:
    return path(p).exists()


def is_dir(p: str) -> bool:
    return path(p).is_dir()


def read_text(p: str) -> str:
    return path(p).read_text(encoding="utf-8")


def read_bytes(p: str) -> bytes:
    return path(p).read_bytes()


def write_bytes(p: str, data: bytes) -> None:
    """`p` holds `data` or its old contents, never a part: a temporary sibling and os.replace on
    disk; on GCS an object appears whole when its upload ends."""
    if is_remote(p):
        path(p).write_bytes(data)
        return
    os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
    tmp = f"{p}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, p)


def write_text(p: str, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def listdir(p: str) -> list[str]:
    return sorted(c.name for c in path(p).iterdir())


def move(source: str, target: str) -> None:
    """A file or directory tree to `target` (its parent made as needed). On GCS a copy then a
    delete of each object: there is no rename."""
    if is_remote(source):
        import gcsfs

        gcsfs.GCSFileSystem().mv(source, target, recursive=True)
        return
    import shutil

    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(source, target)


def remove_tree(p: str) -> None:
    target = path(p)
    if target.exists():
        target.rmtree() if target.is_dir() else target.unlink()
