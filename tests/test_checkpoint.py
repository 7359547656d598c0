"""The checkpointer and the guards around it, in-process (fast), plus one resharding run
on 8 fake CPU devices in a subprocess (XLA_FLAGS must be set before JAX starts)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_helpers import TINY_MODEL

from matrixmagic.configs import ConfigError
from matrixmagic.configs.train_config import TrainConfig, config_to_json
from matrixmagic.train import guards
from matrixmagic.train.checkpoint import CORRUPT_DIR, Checkpointer, CheckpointError, CheckpointWarning
from matrixmagic.train.integrity import state_fingerprint
from matrixmagic.train.preemption import PreemptionGuard
from matrixmagic.train.resume import truncate_metrics
from matrixmagic.train.state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_state(seed: int) -> TrainState:
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16)}
    return TrainState(step=jnp.asarray(seed, jnp.int32), params=params,
                      opt_state=({"mu": jax.tree.map(jnp.zeros_like, params)},), rng=jax.random.PRNGKey(seed))


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def saved_run(tmp_path, steps=(1, 2), keep=3) -> str:
    workdir = str(tmp_path / "run")
    ckpt = Checkpointer(workdir, keep=keep)
    for step in steps:
        ckpt.save(step, small_state(step), {"iterator": {"step": step}}, TrainConfig())
    ckpt.close()
    return workdir


def assert_state_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


# ----------------------------------------------------------------------------- integrity


def test_fingerprint_changes_with_any_single_bit():
    state = small_state(3)
    base = state_fingerprint(state)
    assert base == state_fingerprint(small_state(3)), "deterministic"
    for name, leaf in (("params/w", state.params["w"]), ("params/b", state.params["b"])):
        raw = np.asarray(leaf).copy()
        bits = raw.view(np.uint16 if raw.dtype.itemsize == 2 else np.uint32).reshape(-1)
        bits[5] ^= 1  # one flipped bit
        changed = state_fingerprint({**state.params, name.split("/")[1]: jnp.asarray(raw)})
        assert changed[name.split("/")[1]] != base[name]


def corrupt(workdir: str, step: int, how: str) -> None:
    """Damage step `step` the way a crash, a bad disk or a bad copy would."""
    state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
    data_files = glob.glob(os.path.join(state_dir, "**", "d", "*"), recursive=True)  # ocdbt data + b-tree nodes
    assert data_files
    for path in data_files:
        if how == "truncate data file":
            os.truncate(path, os.path.getsize(path) // 2)
        elif how == "garble data file":
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) // 3)
                f.write(b"\xde\xad\xbe\xef" * 4)
    if how == "truncate data file" or how == "garble data file":
        return
    if how == "truncate metadata":
        os.truncate(os.path.join(state_dir, "_METADATA"), 10)
    elif how == "values differ from fingerprint":  # a silent flip: files decode, numbers are wrong
        path = os.path.join(workdir, "checkpoints", str(step), "integrity", "metadata")
        with open(path) as f:
            record = json.load(f)
        record["fingerprint"]["params/w"] ^= 1
        with open(path, "w") as f:
            json.dump(record, f)
    elif how == "delete state":
        for path in glob.glob(os.path.join(state_dir, "**", "*"), recursive=True):
            if os.path.isfile(path):
                os.remove(path)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore's loop, on errors
@pytest.mark.parametrize("how", ["truncate data file", "garble data file", "truncate metadata",
                                 "values differ from fingerprint", "delete state"])
def test_corrupt_latest_checkpoint_is_skipped_with_a_warning(tmp_path, how):
    workdir = saved_run(tmp_path)
    corrupt(workdir, 2, how)
    ckpt = Checkpointer(workdir)
    with pytest.warns(CheckpointWarning, match="checkpoint step 2 .* corrupt or partial"):
        restored = ckpt.restore_latest(abstract(small_state(0)))
    assert restored.step == 1 and restored.data == {"iterator": {"step": 1}}
    assert_state_equal(restored.state, small_state(1))
    assert ckpt.all_steps() == [1] and os.listdir(os.path.join(workdir, CORRUPT_DIR))[0].startswith("2-")
    assert ckpt.save(2, small_state(22), {}, TrainConfig()), "the step can be saved again"
    ckpt.close()


def test_all_checkpoints_corrupt_is_an_error_not_a_silent_restart(tmp_path):
    workdir = saved_run(tmp_path, steps=(1,))
    corrupt(workdir, 1, "truncate metadata")
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match=r"steps \[1\]\) is corrupt"):
        Checkpointer(workdir).restore_latest(abstract(small_state(0)))
    assert Checkpointer(workdir).restore_latest(abstract(small_state(0))) is None, "a rerun starts over"


def test_incompatible_shapes_raise_naming_the_arrays_and_fields(tmp_path):
    workdir = saved_run(tmp_path)
    saved_batch = TrainConfig().batch_size  # saved_run saves the default config
    wider = small_state(0).replace(params={"w": jnp.zeros((16, 9)), "b": jnp.zeros((8,), jnp.bfloat16)})
    ckpt = Checkpointer(workdir)
    with pytest.raises(CheckpointError, match=r"params/w: checkpoint \(16, 8\) float32, this run \(16, 9\)") as err:
        ckpt.restore_latest(abstract(wider), config_to_json(TrainConfig(batch_size=saved_batch // 2)))
    assert f"batch_size: checkpoint {saved_batch}, this run {saved_batch // 2}" in str(err.value)
    assert ckpt.all_steps() == [1, 2], "an incompatible checkpoint is not mistaken for a corrupt one"
    ckpt.close()


def test_keep_best_keeps_the_lowest_eval_loss_besides_the_latest(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "run"), keep=1, keep_best=True)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None)]:
        ckpt.save(step, small_state(step), {}, TrainConfig(), metrics=None if loss is None else {"eval_loss": loss})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()


# ----------------------------------------------------------------------------- guards


def test_nonfinite_steps_keep_the_old_state_and_stop_past_the_limit():
    def step_fn(state, batch):
        params = jax.tree.map(lambda p: p + batch["delta"], state.params)
        loss = jnp.sum(params["w"]) * 0 + batch["delta"]
        return state.replace(step=state.step + 1, params=params), {"loss": loss, "grad_norm": jnp.float32(1.0)}

    step = jax.jit(guards.skip_nonfinite(step_fn))
    state = small_state(0)
    good, metrics = step(state, {"delta": jnp.float32(1.0)})
    assert float(metrics["nonfinite"]) == 0.0 and int(good.step) == 1
    bad, metrics = step(good, {"delta": jnp.float32(jnp.nan)})
    assert float(metrics["nonfinite"]) == 1.0 and int(bad.step) == 2, "the counter advances: the batch was used"
    assert_state_equal(bad.params, good.params)

    monitor = guards.NonFiniteMonitor(max_skips=1, hint="Lower optimizer.learning_rate.")
    monitor.record(1, {"nonfinite": 0.0, "loss": 1.0, "grad_norm": 1.0})
    monitor.record(2, metrics)
    with pytest.warns(RuntimeWarning, match="step 2"):
        monitor.check("step 1 in DIR")
    monitor.record(7, metrics)
    with pytest.raises(guards.NonFiniteError, match=r"at step 7: loss nan.*last good checkpoint is step 1 in DIR"):
        monitor.check("step 1 in DIR")


def test_free_space_check(monkeypatch, tmp_path):
    monkeypatch.setattr(guards, "free_bytes", lambda path: 10_000)
    with pytest.raises(ConfigError, match=r"has 9.8 KiB free but one checkpoint .* needs about 19.5 KiB"):
        guards.check_free_space(str(tmp_path), 20_000, keep=3)
    with pytest.warns(guards.DiskSpaceWarning, match="keep_checkpoints=3"):
        guards.check_free_space(str(tmp_path), 5_000, keep=3)
    assert not issubclass(guards.DiskSpaceWarning, ResourceWarning), "Python hides ResourceWarning by default"


def test_full_disk_fails_before_compiling(monkeypatch, tmp_path):
    from matrixmagic.configs.train_config import apply_overrides, train_config_for
    from matrixmagic.train import loop

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"d{i}.txt").write_text("hello world " * (20 + i))
    config = apply_overrides(train_config_for("gpt-tiny"), [
        *TINY_MODEL, f"data.source={src}", f"data.data_dir={tmp_path / 'data'}", f"workdir={tmp_path / 'run'}",
        "eval_batches=0"])
    monkeypatch.setattr(guards, "free_bytes", lambda path: 1000)
    monkeypatch.setattr(loop, "Checkpointer", lambda *a, **k: pytest.fail("got past the disk check"))
    with pytest.raises(ConfigError, match="free but one checkpoint"):
        loop.train(config, quiet=True)


def test_metrics_log_is_cut_back_to_the_restored_step(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 8)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "spl'  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    assert truncate_metrics(str(tmp_path), 5) == 3
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:5]


def test_preemption_guard_handles_sigterm_and_a_second_ctrl_c_aborts():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard(multiprocess=False) as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop(2) and guard.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before, "handlers restored"
    with PreemptionGuard(multiprocess=False) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.should_stop(3) and "Ctrl-C" in guard.reason
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    agreed = PreemptionGuard(sync_point=lambda step: step == 7, multiprocess=True)
    agreed.request("local only")  # with several hosts only the agreed step counts
    assert [agreed.should_stop(s) for s in (5, 6, 7)] == [False, False, True]


# ----------------------------------------------------------------------------- resharding

RESHARD_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from matrixmagic.configs.train_config import apply_overrides, train_config_for
    from matrixmagic.model import build_model
    from matrixmagic.train.run import shard_run
    from matrixmagic.train.checkpoint import Checkpointer
    from matrixmagic.model.families import family_of
    from matrixmagic.train.step import bind_train_step, eval_step

    workdir = sys.argv[1]
    TINY = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "data.seq_len=16",
            "batch_size=8", "model.vocab_size=256", "model.dropout_rate=0.0"]

    def setup(extra, devices):
        config = apply_overrides(train_config_for("gpt-tiny"), TINY + extra)
        tx, step_fn = bind_train_step(config)
        return config, shard_run(config, tx, step_fn, eval_step, devices=devices)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(8, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((8, 16), np.float32),
             "segment_ids": np.ones((8, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}

    def logits(config, run, params):
        model = build_model(config.model)
        fn = jax.jit(lambda p, x: model.apply({"params": p}, **family_of("decoder").model_inputs(x), deterministic=True))
        return np.asarray(fn(params, run.put_batch(batch)))

    out = {}
    config, run = setup(["mesh.data=8"], jax.devices())  # DP-8
    state = run.init_state(jax.random.PRNGKey(0))
    for _ in range(2):  # some optimizer state worth restoring
        state, _ = run.train_step(state, run.put_batch(batch))
    reference = logits(config, run, state.params)
    host = jax.device_get(state)
    ckpt = Checkpointer(workdir)
    ckpt.save(2, state, {"iterator": {"step": 2}}, config)
    ckpt.close()

    for name, extra, devices in [("fsdp4_tp2", ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "mesh.layout=fsdp+tp"],
                                  jax.devices()), ("one_device", ["mesh.data=1"], jax.devices()[:1])]:
        config2, run2 = setup(extra, devices)
        restored = Checkpointer(workdir).restore_latest(run2.abstract_state)
        placed = all(leaf.sharding == want.sharding for leaf, want in
                     zip(jax.tree.leaves(restored.state), jax.tree.leaves(run2.abstract_state)))
        same_state = all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
                         for a, b in zip(jax.tree.leaves(jax.device_get(restored.state)), jax.tree.leaves(host)))
        got = logits(config2, run2, restored.state.params)
        # the same program on the same mesh fed the original params: must be bitwise equal
        direct = logits(config2, run2, jax.device_put(host.params, run2.state_shardings.params))
        out[name] = {"placed": placed, "same_state": same_state, "step": restored.step,
                     "devices": len(run2.mesh.devices.flat), "mesh": dict(run2.mesh.shape),
                     "kernel_spec": str(restored.state.params["decoder"]["layers"]["feed_forward"]["hidden"]
                                        ["kernel"].sharding.spec),
                     "max_abs_diff": float(np.max(np.abs(got - reference))),
                     "bitwise_vs_dp8": bool(got.tobytes() == reference.tobytes()),
                     "bitwise_vs_original_params_on_this_mesh": bool(got.tobytes() == direct.tobytes())}
    print("RESULT " + json.dumps(out))
''')


@pytest.mark.slow
def test_restore_under_another_mesh_gives_the_same_logits(tmp_path):
    """Written under DP-8, restored under FSDP-4 x TP-2 and on one device: the arrays land in
    the target shardings with identical bits, and the logits match the original's."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", RESHARD_SCRIPT, str(tmp_path / "run")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["fsdp4_tp2"]["mesh"] == {"data": 1, "stage": 1, "fsdp": 4, "context": 1, "tensor": 2} and result["one_device"]["devices"] == 1
    for name, r in result.items():
        assert r["placed"] and r["same_state"] and r["step"] == 2, (name, r)
        assert r["bitwise_vs_original_params_on_this_mesh"], (name, r)
        # Another mesh is another XLA program (per-device matmul shapes, TP partial sums), so
        # its float sums may round differently: equal to fp32 precision, not necessarily bitwise.
        assert r["max_abs_diff"] <= 1e-5, (name, r)
    print(json.dumps(result, indent=1))
