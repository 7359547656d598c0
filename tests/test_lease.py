"""The one-writer lease of a gs:// run (train/lease.py), in process, against the test GCS
server (with GCS's generation preconditions: tests/gcs_server.py). The end-to-end cases
(a second `magic train` refused, a SIGKILLed holder taken over) are in test_gcs_run.py;
here, what needs another host or a clock: expiry, waiting, a lost lease, racing takers."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from gcs_helpers import GcsServer, read_object

from matrixmagic.train.lease import GcsLease, LeaseLostError, run_lock
from matrixmagic.train.runlock import RunInUseError

RUN = "gs://bkt/run"


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    with GcsServer(log=str(tmp_path / "gcs.log")) as server:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        yield server


def plant(server, record: dict) -> None:
    """A lease written by someone else (another host), as its upload would: create-if-absent."""
    body = json.dumps(record).encode()
    url = f"{server.url}/upload/storage/v1/b/bkt/o?uploadType=media&name=run/run.lock&ifGenerationMatch=0"
    urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=10).read()


OTHER = {"host": "other-host", "pid": 4242, "started": "2026-12-06T10:00:00+00:00", "command": "magic train"}


def holder(server) -> dict:
    return json.loads(read_object(server, "run/run.lock"))


def test_a_gs_workdir_gets_the_lease_and_a_second_writer_is_refused(gcs):
    first = run_lock(RUN)
    assert isinstance(first, GcsLease)
    with first:
        assert holder(gcs)["host"] and holder(gcs)["pid"]
        with pytest.raises(RunInUseError, match=r"is in use by pid \d+ on host .*renewed 0 s ago"):
            GcsLease(RUN, ttl=30).acquire()
    assert "run/run.lock" not in gcs.objects("run/"), "released"
    with GcsLease(RUN, ttl=30):  # free again
        pass


def test_renewal_keeps_a_live_holder_and_expiry_hands_a_dead_ones_lease_over(gcs):
    with GcsLease(RUN, ttl=1.5) as live:
        first = live.generation
        time.sleep(2.5)  # past the ttl: only renewals keep it
        assert live.generation != first, "renewed"
        with pytest.raises(RunInUseError, match="other-host|in use by pid"):
            GcsLease(RUN, ttl=1.5, wait=False).acquire()
    plant(gcs, OTHER)  # a holder on another host that never renews (killed)
    with pytest.raises(RunInUseError, match="pid 4242 on host other-host"):
        GcsLease(RUN, ttl=2, wait=False).acquire()
    time.sleep(2.2)
    with GcsLease(RUN, ttl=2, wait=False):
        assert holder(gcs)["host"] != "other-host", "taken over after expiry"


def test_a_lease_that_missed_two_renewals_is_waited_for(gcs, capsys):
    plant(gcs, OTHER)
    time.sleep(2.3)  # ttl 3: renewals every 1 s, two missed, 0.7 s left
    start = time.monotonic()
    with GcsLease(RUN, ttl=3):
        waited = time.monotonic() - start
        assert holder(gcs)["host"] != "other-host"
    assert 0.5 < waited < 10, waited
    assert "waiting" in capsys.readouterr().out


def test_a_holder_whose_lease_was_taken_stops_at_its_next_check(gcs):
    lease = GcsLease(RUN, ttl=1.5).acquire()
    try:
        lease.check()
        # someone overwrites it (as a taker of an expired lease would): the holder's next renewal gets 412
        url = f"{gcs.url}/upload/storage/v1/b/bkt/o?uploadType=media&name=run/run.lock"
        urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(OTHER).encode(), method="POST")).read()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not lease._lost:
            time.sleep(0.1)
        with pytest.raises(LeaseLostError, match="lost its lease.*another run took it over"):
            lease.check()
    finally:
        lease.release()
    assert holder(gcs)["host"] == "other-host", "a lost lease is not deleted by its old holder"


def test_of_two_takers_of_an_expired_lease_exactly_one_wins(gcs):
    plant(gcs, OTHER)
    time.sleep(1.2)
    results = []

    def take():
        try:
            results.append(GcsLease(RUN, ttl=1, wait=False).acquire())
        except RunInUseError as err:
            results.append(err)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if isinstance(r, GcsLease)]
    assert len(won) == 1, results
    won[0].release()
