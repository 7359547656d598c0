"""Two processes, one job: `magic train` on 2 x 4 fake CPU devices joined by
jax.distributed (gloo collectives over 127.0.0.1) trains exactly like one
process with 8 devices: same losses, same eval, one log written by process 0.

Each process loads only its half of every global batch (the pipeline's
process_index/process_count) and `put_batch` assembles the global array, so
the global batch, and with it every loss, is the same as on one host.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_corpus(root) -> str:
    words = ["alpha", "beta", "gamma", "delta", "matrix", "magic", "tensor", "shard", "mesh", "host"]
    rng = random.Random(0)
    os.makedirs(root, exist_ok=True)
    for i in range(40):
        lines = (" ".join(rng.choice(words) for _ in range(12)) for _ in range(30))
        with open(os.path.join(root, f"doc{i}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return str(root)


def _magic_train(args: list[str], devices: int) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}
    return subprocess.Popen([sys.executable, "-m", "matrixmagic.train.cli", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out[-6000:]
    return out


def _history(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_train_like_one_with_eight_devices(tmp_path):
    corpus = _write_corpus(tmp_path / "text")
    common = ["--mesh", "data=2,fsdp=2,tensor=2", "--layout", "fsdp+tp",
              "--set", f"data.source={corpus}", "--set", f"data.data_dir={tmp_path / 'tfds'}",
              "--set", "steps=5", "--set", "log_every=1", "--set", "batch_size=8", "--set", "data.seq_len=32",
              "--set", "model.d_model=32", "--set", "model.num_heads=4", "--set", "model.d_ff=64",
              "--set", "model.num_layers=2", "--set", "eval_batches=1", "--set", "eval_every=5",
              "--set", "checkpoint_every=5", "--set", "sample_tokens=4"]
    # One process, 8 devices. It also prepares the dataset both runs read, so the two
    # processes below don't race to build it.
    _finish(_magic_train(common + ["--workdir", str(tmp_path / "one")], devices=8))

    port = _free_port()
    procs = [_magic_train(common + ["--workdir", str(tmp_path / "two"), "--coordinator", f"127.0.0.1:{port}",
                                    "--num-processes", "2", "--process-id", str(i)], devices=4) for i in range(2)]
    outputs = [_finish(p) for p in procs]
    assert "8 device(s)" in outputs[0]  # process 0 sees the whole job's devices
    assert "sample from the trained model" in outputs[0] and "sample from" not in outputs[1]

    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one]  # one writer
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b.get("grad_norm", 0) == pytest.approx(a.get("grad_norm", 0), rel=1e-5)
    assert len([r for r in two if r["split"] == "train"]) == 5

    # The same two processes as two "slices": mesh.dcn_data=2 puts only the data axis across
    # them (a hybrid mesh, each process a granule, as on a multi-slice TPU pod)
    dcn = [a if a != "data=2,fsdp=2,tensor=2" else "data=2,fsdp=2,tensor=2,dcn_data=2" for a in common]
    port = _free_port()
    procs = [_magic_train(dcn + ["--workdir", str(tmp_path / "slices"), "--coordinator", f"127.0.0.1:{port}",
                                 "--num-processes", "2", "--process-id", str(i)], devices=4) for i in range(2)]
    [_finish(p) for p in procs]
    slices = _history(tmp_path / "slices")
    assert [(r["step"], r["split"]) for r in slices] == [(r["step"], r["split"]) for r in one]
    for a, b in zip(one, slices):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b.get("grad_norm", 0) == pytest.approx(a.get("grad_norm", 0), rel=1e-5)
