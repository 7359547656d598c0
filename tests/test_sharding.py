"""Sharding: layouts agree with one device, params are split as the rules say,
init never materialises a whole copy, TP all-reduces where Megatron does, and
bad meshes fail before compiling.

Checks that need 8 devices run this file as a script in a subprocess with
`--xla_force_host_platform_device_count=8`, so they never depend on which
test imported jax first (pytest-xdist workers share nothing else).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LLVM -O0: the fake CPU devices compile 2-3x faster; numerics are the same for every layout compared.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
LAYOUTS = {"dp-8": ("dp", dict(data=8)), "fsdp-8": ("fsdp", dict(data=1, fsdp=8)),
           "dp4xtp2": ("tp", dict(data=4, tensor=2)), "fsdp4xtp2": ("fsdp+tp", dict(data=1, fsdp=4, tensor=2))}
STEPS, LOSS_RTOL = 5, 1e-5
# Params: rtol 1e-5 plus atol 1e-5 (0.5% of one Adam step at the peak lr 2e-3). Why an atol: the key
# projection's bias has an exactly-zero true gradient (softmax is shift-invariant over keys), so its
# gradient is rounding noise (~1e-10) that Adam divides by sqrt(v) + eps; the result (~1e-6) depends on
# the reduction order. Every other param agrees to about one ulp. A real sharding bug moves params O(lr).
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-5
# The Llama options under tensor=4 with replicated K/V heads: sequence parallelism (on by default
# under tensor) also moves where the FFN's and attention's partial sums are reduced, and the
# bias-free, untied model's Adam updates then differ by up to 1.02e-5 (measured on an AVX-512 CPU):
# atol 3e-5 (1.5% of one step at the peak lr), as tests/test_sequence_parallel.py allows for SP.
LLAMA_PARAM_ATOL = 3e-5


def run_worker(name: str, devices: int = 8, timeout: int = 900, script: str = __file__) -> tuple[dict, str]:
    """`_worker_<name>()` of `script` (a test file) run on `devices` fake CPU devices: (its JSON, stderr)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}
    proc = subprocess.run([sys.executable, os.path.abspath(script), name], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


# ----------------------------------------------------------------------------- 8-device checks


def test_every_layout_matches_one_device():
    result, stderr = run_worker("equivalence")
    reference = result["reference"]
    assert len(reference) == STEPS
    for name, got in result["layouts"].items():
        for a, b in zip(got["losses"], reference):
            assert abs(a - b) <= LOSS_RTOL * abs(b), (name, got["losses"], reference)
        assert got["param_excess"] <= 1.0, (name, got)  # max |p - p_ref| / (atol + rtol |p_ref|)
    assert set(result["layouts"]) == set(LAYOUTS)
    assert "Involuntary full rematerialization" not in stderr


def test_llama_options_on_every_split_match_one_device():
    """RoPE + RMSNorm + SwiGLU + 2 K/V heads for 4 query heads: K/V heads split over tensor=2, and
    replicated (rules_override kv_heads=none) under tensor=4, which they cannot divide."""
    result, _ = run_worker("llama_equivalence")
    for name, got in result["layouts"].items():
        for a, b in zip(got["losses"], result["reference"]):
            assert abs(a - b) <= LOSS_RTOL * abs(b), (name, got["losses"], result["reference"])
        assert got["param_excess"] <= 1.0, (name, got)
    assert result["key_specs"] == {"fsdp4xtp2": [None, "fsdp", "tensor", None],
                                   "dp2xtp4_kv_replicated": [None, None, None, None]}
    assert result["query_specs"]["dp2xtp4_kv_replicated"] == [None, None, "tensor", None]


def test_param_shardings_follow_the_rules():
    specs, _ = run_worker("specs")
    fsdp = specs["fsdp-8"]
    matrices = [path for path in fsdp["params"] if path.endswith(("kernel", "embedding"))]
    assert len(matrices) == 8  # q, k, v, o, ffn in/out, token and position tables
    for path in matrices:  # every weight matrix is split over fsdp
        assert "fsdp" in fsdp["params"][path], (path, fsdp["params"][path])
    assert fsdp["opt_state"] == fsdp["params"]  # Adam's moments sharded like their params (ZeRO-3)
    tp = specs["dp4xtp2"]["params"]
    layer = "decoder/layers"
    for proj in ("query", "key", "value"):  # kernel [layers, embed, heads, kv]: heads over tensor
        assert tp[f"{layer}/self_attention/{proj}/kernel"] == [None, None, "tensor", None]
    assert tp[f"{layer}/self_attention/output/kernel"] == [None, "tensor", None, None]
    assert tp[f"{layer}/feed_forward/hidden/kernel"] == [None, None, "tensor"]  # [layers, embed, mlp]
    assert tp[f"{layer}/feed_forward/output/kernel"] == [None, "tensor", None]
    both = specs["fsdp4xtp2"]["params"]
    assert both[f"{layer}/self_attention/query/kernel"] == [None, "fsdp", "tensor", None]
    assert both[f"{layer}/feed_forward/hidden/kernel"] == [None, "fsdp", "tensor"]
    assert all(all(d is None for d in spec) for spec in specs["dp-8"]["params"].values())


def test_sharded_init_never_holds_a_whole_copy():
    stats, _ = run_worker("init_memory")
    full = stats["full_state_bytes"]  # fp32 params + Adam mu + nu, unsharded
    budget = full // 4  # per-device budget the full state exceeds 4x
    fsdp, dp = stats["fsdp-8"], stats["dp-8"]
    assert full > 4 * budget - 4
    assert fsdp["output"] + fsdp["temp"] < budget, stats
    assert fsdp["output"] < 1.05 * full / 8, stats  # ~1/8: only norms, step and rng are replicated
    assert dp["output"] >= full, stats  # the same measure sees the whole copy when params are replicated


def test_tensor_parallel_all_reduces_once_after_attention_and_once_after_mlp():
    result, stderr = run_worker("tp_hlo")
    layers = result["num_layers"]
    in_layers = [r for r in result["all_reduces"] if "/decoder/" in r["op"]]
    assert len(in_layers) == 2 * layers, in_layers
    for r in in_layers:  # the [B/data, T, d_model] partial sums of a row-parallel matmul, over tensor pairs
        assert r["op"].endswith(("self_attention/output/dot_general", "feed_forward/output/dot_general")), r
        assert r["shape"] == result["activation_shape"], r
    assert "Involuntary full rematerialization" not in stderr  # fsdp+tp on a 2x2x2 mesh


# ----------------------------------------------------------------------------- in-process (1 device)


def _config(layout="dp", batch_size=16, microbatches=1, **mesh):
    from matrixmagic.configs.train_config import MeshConfig, train_config_for

    config = train_config_for("gpt-tiny", steps=5)
    model = config.model.replace(d_model=32, num_heads=4, d_ff=64, num_layers=2, vocab_size=128, max_len=16)
    return dataclasses.replace(config, model=model, batch_size=batch_size, microbatches=microbatches,
                               mesh=MeshConfig(layout=layout, **mesh),
                               data=dataclasses.replace(config.data, seq_len=16))


@pytest.mark.parametrize("mesh,devices,processes,match", [
    (dict(data=3), 8, 1, "has 3 devices but 8 are available"),
    (dict(data=-1, fsdp=3), 8, 1, "not divisible by 3"),
    (dict(data=8, batch_size=12), 8, 1, "batch_size=12 is not divisible by the data-parallel size"),
    (dict(data=2, fsdp=4, microbatches=4), 8, 1, r"microbatches=4 leaves 4 .* = 2 x 4 = 8"),
    (dict(data=2, tensor=4, batch_size=6), 8, 4, "batch_size=6 is not divisible by the 4 processes"),
    (dict(data=1, tensor=8, layout="tp"), 8, 2, "not a multiple of the 2 processes"),
    (dict(data=1, tensor=8, layout="tp"), 8, 1, "model.num_heads=4 is not divisible by tensor = 8"),
    (dict(data=2, dcn_data=4), 2, 1, "mesh.dcn_data=4"),
])
def test_bad_meshes_fail_with_the_field_and_fix(mesh, devices, processes, match):
    from matrixmagic.configs import ConfigError
    from matrixmagic.sharding.validate import validate_mesh

    with pytest.raises(ConfigError, match=match):
        validate_mesh(_config(**mesh), devices, processes)


def test_tensor_split_dimensions_are_checked():
    from matrixmagic.configs import ConfigError
    from matrixmagic.sharding.validate import validate_mesh

    config = _config("tp", data=2, tensor=4)
    with pytest.raises(ConfigError, match="model.d_ff=66"):
        validate_mesh(dataclasses.replace(config, model=config.model.replace(d_ff=66)), 8)
    with pytest.raises(ConfigError, match="model.vocab_size=250.*multiple of 128"):
        validate_mesh(dataclasses.replace(config, model=config.model.replace(vocab_size=250)), 8)
    assert validate_mesh(dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, layout="dp")), 8) == \
        {"data": 2, "stage": 1, "fsdp": 1, "context": 1, "tensor": 4}  # unsplit under dp: any sizes fit


def test_unknown_mesh_axis_names_the_allowed_ones(capsys):
    from matrixmagic.train.cli import main

    assert main(["train", "--mesh", "data=2,foo=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown mesh axis 'foo'" in err and "data, stage, fsdp, context, tensor" in err


def test_magic_train_rejects_a_bad_mesh_before_data_or_compile(tmp_path, monkeypatch, capsys):
    import matrixmagic.train.loop
    import matrixmagic.train.run
    from matrixmagic.train.cli import main

    def never(*args, **kwargs):
        raise AssertionError("reached data loading / compilation with a bad mesh")

    monkeypatch.setattr(matrixmagic.train.loop, "open_data", never)
    monkeypatch.setattr(matrixmagic.train.run, "shard_run", never)
    assert main(["train", "--mesh", "data=2", "--workdir", str(tmp_path / "run")]) == 2  # 1 device here
    assert "has 2 devices but 1 are available" in capsys.readouterr().err


def test_rules_override_replaces_table_entries():
    from flax import linen as nn

    from matrixmagic.configs import ConfigError
    from matrixmagic.sharding.rules import logical_rules, parse_rules_override

    assert parse_rules_override("embed=fsdp, mlp=none,batch=data+fsdp") == \
        {"embed": "fsdp", "mlp": None, "batch": ("data", "fsdp")}
    rules = logical_rules("tp", "mlp=none,embed=fsdp")
    assert tuple(nn.logical_to_mesh_axes(("embed", "mlp"), rules)) == ("fsdp", None)
    assert tuple(nn.logical_to_mesh_axes(("embed", "heads", "kv"), rules)) == ("fsdp", "tensor", None)
    with pytest.raises(ConfigError, match="not a logical axis name.*Did you mean 'embed'"):
        parse_rules_override("embd=fsdp")
    with pytest.raises(ConfigError, match="mesh axis 'tensr'.*Did you mean 'tensor'"):
        parse_rules_override("mlp=tensr")


def test_multi_slice_mesh_puts_only_data_across_slices():
    from matrixmagic.configs import ConfigError
    from matrixmagic.configs.train_config import MeshConfig
    from matrixmagic.sharding.mesh import device_array

    devices = [types.SimpleNamespace(id=i, slice_index=i // 4, process_index=i // 2, platform="cpu",
                                     device_kind="cpu") for i in range(8)]
    sizes = {"data": 4, "stage": 1, "fsdp": 2, "context": 1, "tensor": 1}
    array = device_array(sizes, 2, devices)
    assert array.shape == (4, 1, 2, 1, 1)
    slices = [[d.slice_index for d in row.ravel()] for row in array]
    assert slices == [[0, 0], [0, 0], [1, 1], [1, 1]]  # the other axes stay inside one slice
    with pytest.raises(ConfigError, match="span 2 slices: set mesh.dcn_data=2"):
        device_array(sizes, 1, devices)
    assert MeshConfig().dcn_data == 1


def test_cluster_detection_and_explicit_flags(monkeypatch):
    import jax

    import matrixmagic.sharding.distributed
    from matrixmagic.configs import ConfigError
    from matrixmagic.sharding.distributed import detect_cluster, initialize

    assert detect_cluster({}) is None
    assert detect_cluster({"SLURM_NTASKS": "1"}) is None
    assert detect_cluster({"SLURM_NTASKS": "16"}) == "slurm"
    assert detect_cluster({"SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "1"}) is None  # one srun task
    assert detect_cluster({"OMPI_COMM_WORLD_SIZE": "4"}) == "mpi"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}) == "tpu"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert detect_cluster({"MEGASCALE_NUM_SLICES": "2"}) == "tpu"
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: pytest.fail("must not initialize"))
    monkeypatch.setattr(matrixmagic.sharding.distributed, "tpu_chips_attached", lambda: False)
    assert initialize(env={}) is False
    assert initialize("127.0.0.1:1234", 1, 0) is False
    with pytest.raises(ConfigError, match="--num-processes, --process-id missing"):
        initialize("127.0.0.1:1234")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        initialize("127.0.0.1", 2, 0)
    with pytest.raises(ConfigError, match="0..N-1"):
        initialize("127.0.0.1:1234", 2, 2)


def test_activation_constraints_are_harmless_without_a_mesh():
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from matrixmagic.model import build_model
    from matrixmagic.model.params import EMBED_ACTIVATION, constrain
    from matrixmagic.sharding.rules import logical_rules

    model, ids = build_model(_config().model), jnp.zeros((2, 16), jnp.int32)
    x = jnp.ones((2, 16, 32))
    assert constrain(x, EMBED_ACTIVATION) is x  # no rules: untouched
    plain = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)
    with nn.logical_axis_rules(logical_rules("fsdp+tp")):  # rules but no mesh: still untouched
        assert constrain(x, EMBED_ACTIVATION) is x
        ruled = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)
    assert jax.tree.structure(plain) == jax.tree.structure(ruled)  # constraints add no params
    assert jax.tree.map(lambda a: a.shape, plain) == jax.tree.map(lambda a: a.shape, ruled)


# ----------------------------------------------------------------------------- subprocess workers


def _synthetic_batch(rng, batch: int, length: int, vocab: int) -> dict:
    """The batch contract (inputs, targets, positions, segment_ids, loss_mask): two packed documents a row."""
    import numpy as np

    tokens = rng.integers(0, vocab, (batch, length + 1), dtype=np.int32)
    half = length // 2
    segments = np.repeat(np.array([[1] * half + [2] * (length - half)], np.int32), batch, axis=0)
    positions = np.repeat(np.array([list(range(half)) + list(range(length - half))], np.int32), batch, axis=0)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=positions, segment_ids=segments,
                loss_mask=np.ones((batch, length), np.float32))


def _run_for(config, devices=None):
    from matrixmagic.train.run import shard_run
    from matrixmagic.train.step import bind_train_step, eval_step

    tx, step_fn = bind_train_step(config)
    return shard_run(config, tx, step_fn, eval_step, devices=devices)


def _train(config, devices=None):
    """Losses and final params of STEPS real train steps on synthetic batches."""
    import jax
    import numpy as np

    run = _run_for(config, devices)
    state = run.init_state(jax.random.PRNGKey(config.seed))
    rng, losses = np.random.default_rng(0), []
    for _ in range(STEPS):
        batch = _synthetic_batch(rng, config.batch_size, config.data.seq_len, config.model.vocab_size)
        state, metrics = run.train_step(state, run.put_batch(batch))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def _worker_equivalence() -> dict:
    import jax
    import numpy as np

    reference, ref_params = _train(_config(), jax.devices()[:1])
    layouts = {}
    for name, (layout, mesh) in LAYOUTS.items():
        losses, params = _train(_config(layout, **mesh))
        pairs = list(zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
        layouts[name] = {
            "losses": losses,
            "param_max_abs": max(float(np.max(np.abs(p - r))) for p, r in pairs),
            "param_excess": max(float(np.max(np.abs(p - r) / (PARAM_ATOL + PARAM_RTOL * np.abs(r)))) for p, r in pairs),
        }
    return {"reference": reference, "layouts": layouts}


LLAMA_LAYOUTS = {"fsdp4xtp2": ("fsdp+tp", dict(data=1, fsdp=4, tensor=2), ""),
                 "dp2xtp4_kv_replicated": ("tp", dict(data=2, tensor=4), "kv_heads=none")}


def _llama_config(layout="dp", override="", **mesh):
    config = _config(layout, **mesh)
    model = config.model.replace(positional="rope", norm="rmsnorm", activation="swiglu", num_kv_heads=2,
                                 use_bias=False, tie_embeddings=False)
    return dataclasses.replace(config, model=model, mesh=dataclasses.replace(config.mesh, rules_override=override))


def _worker_llama_equivalence() -> dict:
    import jax
    import numpy as np

    reference, ref_params = _train(_llama_config(), jax.devices()[:1])
    layouts, key_specs, query_specs = {}, {}, {}
    for name, (layout, mesh, override) in LLAMA_LAYOUTS.items():
        config = _llama_config(layout, override, **mesh)
        losses, params = _train(config)
        pairs = list(zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
        layouts[name] = {"losses": losses, "param_excess": max(
            float(np.max(np.abs(p - r) / (LLAMA_PARAM_ATOL + PARAM_RTOL * np.abs(r)))) for p, r in pairs)}
        run = _run_for(config)
        specs = _named_specs(run.state_shardings.params, run.abstract_state.params)
        key_specs[name] = specs["decoder/layers/self_attention/key/kernel"]
        query_specs[name] = specs["decoder/layers/self_attention/query/kernel"]
    return {"reference": reference, "layouts": layouts, "key_specs": key_specs, "query_specs": query_specs}


def _named_specs(shardings, abstract) -> dict:
    """{'decoder/layers/.../kernel': [mesh axis or None per dimension]}."""
    import jax

    full = jax.tree.map(lambda s, a: list(s.spec) + [None] * (len(a.shape) - len(s.spec)), shardings, abstract)
    flat = jax.tree_util.tree_flatten_with_path(full, is_leaf=lambda x: isinstance(x, list))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): spec for path, spec in flat}


def _worker_specs() -> dict:
    import jax

    out = {}
    for name, (layout, mesh) in LAYOUTS.items():
        run = _run_for(_config(layout, **mesh))
        adam = next(s for s in jax.tree.leaves(run.state_shardings.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
                    if hasattr(s, "mu"))
        out[name] = {"params": _named_specs(run.state_shardings.params, run.abstract_state.params),
                     "opt_state": _named_specs(adam.mu, run.abstract_state.params)}
    return out


def _worker_init_memory() -> dict:
    import jax

    from matrixmagic.sharding.memory import tree_bytes

    out = {}
    for name in ("dp-8", "fsdp-8"):
        layout, mesh = LAYOUTS[name]
        config = _config(layout, **mesh)
        config = dataclasses.replace(config, model=config.model.replace(
            d_model=256, num_heads=4, num_layers=4, d_ff=1024, vocab_size=2048, max_len=128))
        run = _run_for(config)
        stats = run.init_state.lower(jax.random.PRNGKey(0)).compile().memory_analysis()
        out[name] = {"output": stats.output_size_in_bytes, "temp": stats.temp_size_in_bytes}
        out["full_state_bytes"] = tree_bytes(run.abstract_state, per_device=False)
    return out


def _worker_tp_hlo() -> dict:
    import re

    import jax
    import jax.numpy as jnp
    import numpy as np

    from matrixmagic.model import build_model
    from matrixmagic.train.run import with_rules

    config = _config("tp", data=4, tensor=2, sequence_parallel=False)  # Megatron's all-reduces (SP: test_sequence_parallel)
    config = dataclasses.replace(config, model=config.model.replace(scan_layers=False))
    run, model = _run_for(config), build_model(config.model)
    forward = jax.jit(with_rules(lambda p, x: model.apply({"params": p}, x), run.mesh, run.rules),
                      in_shardings=(run.state_shardings.params, run.batch_sharding))
    ids = jax.ShapeDtypeStruct((config.batch_size, config.data.seq_len), jnp.int32)
    hlo = forward.lower(run.abstract_state.params, ids).compile().as_text()
    reduces = [{"shape": [int(d) for d in m.group(1).split(",")], "op": m.group(2)} for m in re.finditer(
        r"= f32\[([\d,]+)\]\{[^}]*\} all-reduce(?:-start)?\(.*?op_name=\"([^\"]+)\"", hlo)]
    # FSDP x TP on 2x2x2: compile a whole train step; the caller checks XLA's stderr for rematerialization.
    mixed = dataclasses.replace(_config("fsdp+tp", data=2, fsdp=2, tensor=2, batch_size=8),
                                data=dataclasses.replace(config.data, seq_len=16))
    mixed_run = _run_for(mixed)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mixed_run.batch_sharding),
                         _synthetic_batch(np.random.default_rng(0), 8, 16, 128))
    mixed_run.train_step.lower(mixed_run.abstract_state, batch).compile()
    return {"num_layers": config.model.num_layers, "all_reduces": reduces,
            "activation_shape": [config.batch_size // 4, config.data.seq_len, config.model.d_model]}


if __name__ == "__main__":
    print(json.dumps(globals()[f"_worker_{sys.argv[1]}"]()))
