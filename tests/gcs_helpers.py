"""Starting the test GCS server (tests/gcs_server.py) and pointing `magic` at it.

Each server is a process of its own on a free port of 127.0.0.1 with one bucket, so a test
can stop it mid-save and start it again. In memory by default; `data_dir` keeps the objects
on disk so they survive a restart (the stop-mid-save test)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A port the kernel hands out (bind to 0) can be
    taken, while the server is stopped, as the local end of any outgoing connection (a client retrying
    this very server included), and the restart then fails with "address in use"; ports below the
    range are only ever taken by an explicit bind."""
    import random

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768  # Linux's default range starts here
    for port in random.sample(range(10000, max(first, 10001)), k=min(200, max(first - 10000, 1))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 10000 and {first}")


class GcsServer:
    def __init__(self, bucket: str = "bkt", data_dir: str | None = None, log: str | None = None):
        self.bucket, self.data_dir, self.port = bucket, data_dir, free_port()
        self.log = log or os.devnull
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict:
        """What a `magic` process needs: the one variable of the emulator convention."""
        return {"STORAGE_EMULATOR_HOST": self.url}

    def command(self) -> list[str]:
        """The server's command line: tests/gcs_server.py PORT BUCKET [DATA_DIR] (a subclass may wrap it)."""
        args = [sys.executable, os.path.join(HERE, "gcs_server.py"), str(self.port), self.bucket]
        if self.data_dir:
            args.append(self.data_dir)
        return args

    def start(self) -> GcsServer:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/", timeout=1).read()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the test GCS server exited with {self.proc.returncode}")
                time.sleep(0.1)
        raise RuntimeError("the test GCS server did not start in 30 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def objects(self, prefix: str = "") -> list[str]:
        """Names of the bucket's objects under `prefix` (the JSON API's listing, all pages)."""
        import json
        import urllib.parse

        names, token = [], None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            url = f"{self.url}/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(query)}"
            page = json.load(urllib.request.urlopen(url, timeout=10))
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def __enter__(self) -> GcsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_object(server: GcsServer, name: str) -> bytes:
    """One object's bytes through the JSON API's media download."""
    import urllib.parse

    quoted = urllib.parse.quote(name, safe="")
    return urllib.request.urlopen(f"{server.url}/download/storage/v1/b/{server.bucket}/o/{quoted}?alt=media",
                                  timeout=30).read()


def put_object(server: GcsServer, name: str, data: bytes) -> None:
    """Upload one object through the JSON API's media upload."""
    import urllib.parse

    url = (f"{server.url}/upload/storage/v1/b/{server.bucket}/o?uploadType=media&"
           f"name={urllib.parse.quote(name, safe='')}")
    urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=30).read()


def gs_dirs(*roots) -> list[str]:
    """Local folders whose name starts with `gs:` below `roots` (what a cloud URL taken for a
    local path creates): every gs:// test asserts there are none."""
    found = []
    for root in roots:
        for here, dirs, _ in os.walk(root):
            found += [os.path.join(here, d) for d in dirs if d.startswith("gs:")]
            dirs[:] = [d for d in dirs if not d.startswith((".", "gs:"))]  # not .venv, .git
    return found
