"""One writer per run on Cloud Storage: a lease object `<workdir>/run.lock`.

`flock` (train/runlock.py) needs a filesystem; a pod's hosts share only the bucket. GCS gives
one primitive for mutual exclusion, the generation precondition: an upload with
`ifGenerationMatch=0` succeeds only if the object does not exist, one with `=G` only if the
object is still at generation G, and the loser gets HTTP 412. Why this shape:

* Taking: create-if-absent. Renewing: rewrite at our own generation every `ttl/3` seconds,
  from a daemon thread. A renewal refused with 412 means another run took the lease (ours
  lapsed: a long pause, a lost network), so the holder stops at its next checkpoint with an
  error instead of writing beside the new owner (`check()`).
* Expiry. A holder killed with SIGKILL cannot release. Its lease is stale once it has not
  been renewed for `ttl` seconds, measured on the server's clock (the object's `updated`
  time) against ours; a taker overwrites it with `ifGenerationMatch=<stale generation>`, so
  of two takers exactly one wins. A holder on this host whose pid is gone is stale at once;
  one that missed two renewals is waited for (it is most likely dead: a restarted pod job
  resumes instead of failing); a live one (renewed lately) refuses a second writer at once,
  naming it (host, pid, start time, command), as the local lock does.
* Release: delete at our generation (a lease someone else took is left alone).
* Requests go to the GCS JSON API (`requests`, authorised by google-auth), or to the
  emulator `STORAGE_EMULATOR_HOST` names; transient failures retry with backoff
  (train/storage.py `retrying`).

Readers never take it. MATRIXMAGIC_LEASE_SECONDS sets the ttl (default 60; tests shorten it).
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
import urllib.parse
from typing import Optional

from . import storage
from .pids import pid_alive
from .runlock import LOCK_FILE, RunInUseError, RunLock, describe_holder, holder_record

LEASE_ENV = "MATRIXMAGIC_LEASE_SECONDS"
DEFAULT_TTL = 60.0
API = "https://storage.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"


class LeaseLostError(RunInUseError):
    """Another run took this run's lease (ours lapsed): stop writing."""


def _session():
    """(requests session, API root): the emulator's, or Google's with default credentials."""
    emulator = os.environ.get(storage.EMULATOR_ENV)
    if emulator:
        import requests

        return requests.Session(), emulator.rstrip("/")
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    credentials, _ = google.auth.default(scopes=[SCOPE])
    return AuthorizedSession(credentials), API



def _parse_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()  # 3.11 reads the trailing Z


class GcsLease:
    """The lease of a gs:// run: `with GcsLease(workdir): ...`, like RunLock."""

    def __init__(self, workdir: str, command: Optional[str] = None, ttl: Optional[float] = None,
                 wait: bool = True):
        self.workdir = workdir
        self.url = storage.join(workdir, LOCK_FILE)
        self.bucket = storage.bucket_of(self.url)
        self.name = self.url[len(f"gs://{self.bucket}/"):]
        self.ttl = float(ttl or os.environ.get(LEASE_ENV) or DEFAULT_TTL)
        self.command, self.wait = command, wait
        self.generation: Optional[str] = None
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._http, self._api = _session()

    # -- the JSON API, three calls

    def _object_url(self) -> str:
        return f"{self._api}/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(self.name, safe='')}"

    def _request(self, method: str, url: str, **kwargs):
        def call():
            response = self._http.request(method, url, timeout=30, **kwargs)
            if response.status_code in (429, 500, 502, 503, 504):
                raise ConnectionError(f"HTTP {response.status_code} from {url}")
            return response

        return storage.retrying(call, f"workdir={self.workdir!r} (run.lock)")

    def _write(self, if_generation: str) -> Optional[str]:
        """Upload our record if the object is at `if_generation` ('0': absent); its new
        generation, or None when the precondition failed."""
        body = json.dumps({**holder_record(self.command), "ttl": self.ttl}).encode()
        response = self._request("POST", f"{self._api}/upload/storage/v1/b/{self.bucket}/o", data=body,
                                 params={"uploadType": "media", "name": self.name, "ifGenerationMatch": if_generation},
                                 headers={"Content-Type": "application/octet-stream"})
        if response.status_code == 412:
            return None
        self._raise_for(response)
        return str(response.json()["generation"])

    def _read(self) -> Optional[tuple[str, float, str]]:
        """(generation, seconds since its last renewal, holder text) of the lease, None if absent."""
        response = self._request("GET", self._object_url())
        if response.status_code == 404:
            return None
        self._raise_for(response)
        meta = response.json()
        body = self._request("GET", self._object_url(), params={"alt": "media", "generation": meta["generation"]})
        text = body.text if body.status_code == 200 else ""
        return str(meta["generation"]), time.time() - _parse_time(meta["updated"]), text

    def _raise_for(self, response) -> None:
        if response.status_code >= 400:
            raise storage.classify(OSError(f"HTTP {response.status_code}: {response.text[:200]}"), self.workdir,
                                   "workdir")

    # -- taking, renewing, releasing

    def acquire(self) -> GcsLease:
        waited = False
        while True:
            generation = self._write("0")
            if generation is None:
                current = self._read()
                if current is None:
                    continue  # released between our two calls: try again
                stale_generation, age, text = current
                if self._stale(age, text):
                    generation = self._write(stale_generation)  # of two takers, one wins
                    if generation is None:
                        continue
                elif self.wait and age > 2 * self.interval and not waited:
                    remaining = max(0.0, self.ttl - age)
                    print(f"waiting {remaining:.0f} s for the lease of {describe_holder(text)} on {self.workdir} to "
                          f"expire (not renewed for {age:.0f} s)", flush=True)
                    time.sleep(remaining + 0.5)
                    waited = True
                    continue
                else:
                    raise RunInUseError(
                        f"workdir={self.workdir!r} is in use by {describe_holder(text)}: one run directory has one "
                        f"writer (its lease was renewed {age:.0f} s ago; if that process is gone the lease expires "
                        f"{max(0.0, self.ttl - age):.0f} s from now and a rerun takes over). Wait for it to finish "
                        f"(or stop it), or train into another --workdir; `magic generate` and `magic explain` can "
                        f"read the run meanwhile.")
            self.generation = generation
            break
        self._thread = threading.Thread(target=self._renew_loop, name="matrixmagic-lease", daemon=True)
        self._thread.start()
        return self

    @property
    def interval(self) -> float:
        return self.ttl / 3

    def _stale(self, age: float, text: str) -> bool:
        if age >= self.ttl:
            return True
        try:
            who = json.loads(text)
            return who["host"] == holder_record()["host"] and not pid_alive(int(who["pid"]))
        except (ValueError, KeyError, TypeError):
            return False

    def _renew_loop(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.interval):
            held = self.generation
            assert held is not None  # acquire() sets it before starting this thread; release() clears it after
            try:
                generation = self._write(held)
            except Exception as err:  # noqa: BLE001 - a transient failure: the next tick tries again
                if time.monotonic() - renewed >= self.ttl:
                    self._lost = f"it could not be renewed for {self.ttl:.0f} s ({storage.short(err)})"
                    return
                continue
            if generation is None:
                self._lost = "another run took it over"
                return
            self.generation, renewed = generation, time.monotonic()

    def check(self) -> None:
        """LeaseLostError if the lease lapsed: called before each checkpoint save."""
        if self._lost:
            raise LeaseLostError(f"workdir={self.workdir!r}: this run lost its lease on run.lock ({self._lost}), so "
                                 f"another `magic train` may be writing there; stopping without saving. The last "
                                 f"committed checkpoint is intact; rerun when the other run is done.")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.generation is None or self._lost:
            return
        try:
            self._request("DELETE", self._object_url(), params={"ifGenerationMatch": self.generation})
        except Exception:  # noqa: BLE001, S110 - an unreleased lease expires by itself after ttl
            pass
        self.generation = None

    def __enter__(self) -> GcsLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_lock(workdir: str, command: Optional[str] = None):
    """The writer's lock of a run directory: flock on a disk (train/runlock.py), this lease on
    GCS, where the hosts of a pod share no filesystem."""
    if storage.is_remote(workdir):
        return GcsLease(workdir, command)
    return RunLock(workdir, command)
