"""A pod without a shared filesystem, in miniature: two `magic train` processes (gloo over
127.0.0.1, 4 fake CPU devices each) with separate HOMEs and caches share nothing but a
bucket on the test GCS server. The text files, the prepared dataset (built once, by process
0, into the bucket while process 1 waits) and the run directory are all gs:// URLs, and the
job trains exactly like one process with 8 devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from gcs_helpers import GcsServer, gs_dirs, put_object, read_object
from run_helpers import REPO, STORAGE_VARS

pytestmark = pytest.mark.slow

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
WORDS = ["alpha", "beta", "gamma", "delta", "matrix", "magic", "tensor", "shard", "mesh", "host"]
NO_GOOGLE = {"NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}


def upload_corpus(server: GcsServer) -> None:
    import random

    rng = random.Random(0)
    for i in range(40):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(30)) + "\n"
        put_object(server, f"texts/doc{i}.txt", text.encode())


def magic_train(args: list[str], devices: int, home, server: GcsServer) -> subprocess.Popen:
    os.makedirs(home, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MATRIXMAGIC_DATA_DIR", "JAX_COMPILATION_CACHE_DIR", *STORAGE_VARS)}
    env.update({"JAX_PLATFORMS": "cpu", "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
                **NO_GOOGLE, **server.env})
    return subprocess.Popen([sys.executable, "-m", "matrixmagic.train.cli", "train", *args], cwd=home, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # a failed peer leaves the other waiting at a barrier: not left behind
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-6000:]
    return out


def history(server: GcsServer, run: str) -> list[dict]:
    return [json.loads(line) for line in read_object(server, f"{run}/metrics.jsonl").decode().splitlines()]


def test_two_hosts_sharing_only_a_bucket_train_like_one(tmp_path):
    from socket import socket

    common = ["--mesh", "data=2,fsdp=2,tensor=2", "--layout", "fsdp+tp",
              "--set", "data.source=gs://bkt/texts", "--set", "steps=5", "--set", "log_every=1",
              "--set", "batch_size=8", "--set", "data.seq_len=32", "--set", "model.d_model=32",
              "--set", "model.num_heads=4", "--set", "model.d_ff=64", "--set", "model.num_layers=2",
              "--set", "eval_batches=1", "--set", "eval_every=5", "--set", "checkpoint_every=5",
              "--set", "sample_tokens=4"]
    with GcsServer(log=str(tmp_path / "gcs.log")) as server:
        upload_corpus(server)
        with socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [magic_train(common + ["--set", "data.data_dir=gs://bkt/tfds-two", "--workdir", "gs://bkt/two",
                                       "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                       "--process-id", str(i)], 4, tmp_path / f"host{i}", server) for i in range(2)]
        try:
            outputs = [finish(p) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        assert "8 device(s)" in outputs[0] and "building the texts dataset" in outputs[0]
        assert "building" not in outputs[1], "process 1 read what process 0 prepared in the bucket"
        finish(magic_train(common + ["--set", "data.data_dir=gs://bkt/tfds-one", "--workdir", "gs://bkt/one"], 8,
                           tmp_path / "single", server))

        one, two = history(server, "one"), history(server, "two")
        assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one]  # one writer
        for a, b in zip(one, two):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert len([r for r in two if r["split"] == "train"]) == 5
        assert any(n.startswith("two/checkpoints/5/state/ocdbt.process_1") for n in server.objects("two/")), \
            "each process wrote its own shards to the bucket"
        assert any(n.startswith("tfds-two/") and n.endswith("dataset_info.json") for n in server.objects("tfds-two/"))
    for host in ("host0", "host1"):  # nothing of the run or the data on a host's own disk
        written = [os.path.relpath(os.path.join(d, f), tmp_path / host) for d, _, fs in os.walk(tmp_path / host)
                   for f in fs]
        assert not [w for w in written if "tfds" in w or "checkpoints" in w or "metrics" in w], written
    assert not gs_dirs(REPO, tmp_path)
