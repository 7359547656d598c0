"""A run directory in Cloud Storage, end to end, against a real GCS server on 127.0.0.1
(tests/gcs_server.py: gcp-storage-emulator, plus GCS's generation preconditions).

TPU VMs share no filesystem, so a pod run's workdir is a gs:// URL: checkpoints through
orbax and tensorstore, metrics.jsonl, command.txt, config.json, TensorBoard, the loss
curve, and the one-writer lease (train/lease.py). The runs are the resume tests' tiny GPT
(tests/test_resume.py), compared with the same run on local disk, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from gcs_helpers import GcsServer, gs_dirs, read_object
from run_helpers import REPO, TINY, assert_same_log, magic_env, train_rows, wait_for

pytestmark = pytest.mark.slow

STEPS = 30
SETS = [*TINY, f"steps={STEPS}", "checkpoint_every=5", "eval_every=15"]
RUN = "gs://bkt/run"
NO_GOOGLE = {"NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}


@pytest.fixture
def gcs(tmp_path):
    with GcsServer(log=str(tmp_path / "gcs.log")) as server:
        yield server
    assert not gs_dirs(REPO, tmp_path), "a gs:// URL was taken for a local folder"


def command(workdir, corpus, *extra: str, subcommand: str = "train") -> list[str]:
    sets = SETS + [f"data.source={corpus['src']}", f"data.data_dir={corpus['data']}", *extra]
    return [sys.executable, "-m", "matrixmagic.train.cli", subcommand, "--workdir", str(workdir),
            *[a for s in sets for a in ("--set", s)]]


def env_for(server, **extra) -> dict:
    return magic_env(**(server.env if server else {}), **NO_GOOGLE, **extra)


def run(workdir, corpus, server, *extra: str, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir, corpus, *extra), env=env_for(server, **env), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def start(workdir, corpus, server, *extra: str, **env) -> subprocess.Popen:
    return subprocess.Popen(command(workdir, corpus, *extra), env=env_for(server, **env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


def committed(server, run_name="run") -> list[int]:
    """Steps whose checkpoint orbax committed (GCS has no rename: a step counts once its
    commit_success.txt is written, after all its items)."""
    names = server.objects(f"{run_name}/checkpoints/")
    return sorted(int(n.split("/")[2]) for n in names if n.count("/") == 3 and n.endswith("/commit_success.txt"))


def started(server, run_name="run") -> list[int]:
    names = server.objects(f"{run_name}/checkpoints/")
    return sorted({int(n.split("/")[2]) for n in names if n.split("/")[2].isdigit()})


def kill_during_save(server, proc) -> list[int]:
    """SIGKILLs proc in the same poll that saw a save in flight after a committed one, and
    returns the steps that poll saw in flight. (Listing again after the poll loses the race
    on a loaded machine: the held-open save commits between the poll and the second look.)"""
    seen: list[int] = []

    def in_save() -> bool:
        begun, done = started(server), committed(server)  # begun first: a commit between adds to done only
        if not done or begun[-1] <= done[-1]:  # by step, not count: keep_checkpoints deletes old ones
            return False
        proc.send_signal(signal.SIGKILL)
        seen.extend(s for s in begun if s > done[-1])
        return True

    assert wait_for(in_save, proc, poll=0.1), "the run ended before a save was in flight"
    assert proc.wait(60) == -signal.SIGKILL
    return seen


def gcs_rows(server, run_name="run") -> list[dict]:
    text = read_object(server, f"{run_name}/metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines() if line.strip() and json.loads(line)["split"] == "train"]




@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory):
    """The reference: the same run, uninterrupted, on local disk."""
    workdir = tmp_path_factory.mktemp("local") / "run"
    done = run(workdir, corpus, None)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_killed_mid_save_and_mid_run_then_resumed_equals_local(local, corpus, gcs):
    """SIGKILL inside a save (held open 1 s by the test hook), then after a later step; the
    rerun resumes from the last committed step and every logged loss equals the local run's."""
    proc = start(RUN, corpus, gcs, MATRIXMAGIC_TEST_SAVE_DELAY="2.0")
    in_flight = kill_during_save(gcs, proc)
    assert in_flight, "the kill was not during a save"
    last = committed(gcs)[-1]
    assert in_flight[-1] > last, "the step being written was not committed"

    proc = start(RUN, corpus, gcs)
    assert wait_for(lambda: committed(gcs) and committed(gcs)[-1] >= 20, proc, poll=0.1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL

    done = run(RUN, corpus, gcs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting from checkpoint step" in done.stdout
    assert_same_log(gcs_rows(gcs), train_rows(local), STEPS)
    with open(os.path.join(local, "checkpoints", str(STEPS), "integrity", "metadata")) as f:
        want = json.load(f)["fingerprint"]
    got = json.loads(read_object(gcs, f"run/checkpoints/{STEPS}/integrity/metadata"))["fingerprint"]
    assert got == want, "the final state is bit-identical to the local run's"
    names = gcs.objects("run/")
    for name in ("run/config.json", "run/command.txt", "run/loss_curve.png"):
        assert name in names
    assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)
    assert read_object(gcs, "run/command.txt").decode().count("# resumed at step") == 2
    assert "run/run.lock" not in names, "the lease is released at the end"
    assert committed(gcs) == sorted(committed(gcs))[-3:], "keep_checkpoints=3 applies on GCS too"


def test_readers_and_init_from_a_gcs_run(corpus, gcs, tmp_path):
    done = run(RUN, corpus, gcs, "steps=6", "eval_every=6")
    assert done.returncode == 0, done.stderr[-3000:]
    env = env_for(gcs)
    gen = subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", "generate", "--workdir", RUN, "--prompt",
                          "ab", "--max-new-tokens", "8", "--temperature", "0"], env=env, capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.strip().startswith("ab")
    explained = subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", "explain", "--workdir", RUN, "--text",
                                "abc"], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert explained.returncode == 0, explained.stderr[-3000:]
    assert "attention" in explained.stdout.lower()

    child = run("gs://bkt/child", corpus, gcs, "steps=2", "checkpoint_every=1000", f"init_from={RUN}/checkpoints/6")
    assert child.returncode == 0, child.stderr[-3000:]
    rows = gcs_rows(gcs, "child")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] < gcs_rows(gcs)[0]["loss"] - 0.5, "trained params, not a fresh init"


def test_second_writer_is_refused_and_a_killed_holder_is_taken_over(corpus, gcs):
    first = start(RUN, corpus, gcs, "steps=100000", "checkpoint_every=1000", MATRIXMAGIC_LEASE_SECONDS="6")
    assert wait_for(lambda: "run/run.lock" in gcs.objects("run/"), first, poll=0.1)
    t0 = time.monotonic()
    second = run(RUN, corpus, gcs, "steps=100000", MATRIXMAGIC_LEASE_SECONDS="6")
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by pid {first.pid} on host" in second.stderr
    assert time.monotonic() - t0 < 60, "refused at once, not after the lease ran out"
    holder = json.loads(read_object(gcs, "run/run.lock"))
    assert holder["pid"] == first.pid

    first.send_signal(signal.SIGKILL)
    assert first.wait(60) == -signal.SIGKILL
    assert "run/run.lock" in gcs.objects("run/"), "a killed holder cannot release"
    third = run(RUN, corpus, gcs, "steps=3", "checkpoint_every=1000", MATRIXMAGIC_LEASE_SECONDS="6")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "run/run.lock" not in gcs.objects("run/")


def test_storage_gone_for_seconds_mid_save_is_ridden_out(local, corpus, tmp_path):
    """The server stops while a step is being written and comes back 3 s later on the same
    port with the same objects: the retries carry the save through, the run ends as the local
    one does."""
    server = GcsServer(data_dir=str(tmp_path / "objects"), log=str(tmp_path / "gcs.log")).start()
    try:
        proc = start(RUN, corpus, server, MATRIXMAGIC_TEST_SAVE_DELAY="1.0")
        assert wait_for(lambda: committed(server) and len(started(server)) > len(committed(server)), proc, poll=0.1)
        server.stop()
        time.sleep(3)
        server.start()
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert_same_log(gcs_rows(server), train_rows(local), STEPS)
        assert committed(server)[-1] == STEPS
    finally:
        server.stop()
    assert not gs_dirs(REPO, tmp_path)


def test_storage_stopped_mid_save_exits_75_and_resumes(local, corpus, tmp_path):
    """The server dies while a step is being written: one clear line, exit 75, the last
    committed step intact; with the server back, the same command finishes the run exactly."""
    server = GcsServer(data_dir=str(tmp_path / "objects"), log=str(tmp_path / "gcs.log")).start()
    try:
        proc = start(RUN, corpus, server, MATRIXMAGIC_TEST_SAVE_DELAY="1.0", MATRIXMAGIC_STORAGE_RETRIES="2")
        assert wait_for(lambda: committed(server) and len(started(server)) > len(committed(server)), proc, poll=0.1)
        last = committed(server)[-1]
        server.stop()
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 75, err[-3000:]
        message = err.strip().splitlines()[-1]
        assert message.startswith("magic train: error:") and "rerun" in message.lower(), err[-3000:]
        assert "Traceback" not in err

        server.start()
        assert committed(server)[-1] >= last
        done = run(RUN, corpus, server)
        assert done.returncode == 0, done.stderr[-3000:]
        assert_same_log(gcs_rows(server), train_rows(local), STEPS)
    finally:
        server.stop()
    assert not gs_dirs(REPO, tmp_path)


@pytest.mark.parametrize("workdir, words", [
    ("s3://bkt/run", ["workdir='s3://bkt/run'", "s3:// scheme is not supported", "gs://BUCKET/PATH"]),
    ("gs://nobucket/run", ["the bucket gs://nobucket does not exist", "gcloud storage buckets create"]),
    ("gs://Bad_Bucket/run", ["is not a valid bucket name"]),
])
def test_bad_cloud_workdirs_are_one_line_before_any_work(workdir, words, corpus, gcs):
    done = run(workdir, corpus, gcs)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("magic train: error:") and "Traceback" not in done.stderr
    for word in words:
        assert word in lines[-1], lines[-1]
    assert "params," not in done.stdout, "it stopped before building the model"


def test_gs_workdir_without_credentials_or_emulator_names_what_to_set(corpus, tmp_path):
    env = {k: v for k, v in env_for(None, HOME=str(tmp_path)).items()
           if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
    done = subprocess.run(command(RUN, corpus), env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    for word in ("needs Google Cloud credentials", "gcloud auth application-default login",
                 "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST"):
        assert word in message, message
    assert not gs_dirs(REPO, tmp_path)
