"""Sequence parallelism (mesh.sequence_parallel, sharding/rules.py): under a tp layout the residual
stream between the blocks is split over `tensor` along the sequence. Checked on 8 fake CPU devices
(subprocesses, as tests/test_sharding.py does it): the step equals the step without it (losses,
first-batch gradients, params after 5 Adam steps); each block's all-reduce becomes a reduce-scatter
into [rows, T / tensor, d_model]; and the compiled step's temporary memory shrinks by what the
analytic model (train/planning/plan.py) says it should.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from functools import partial

import pytest
from test_pipeline_parallel import _excess, _train
from test_sharding import _config, _llama_config, _run_for, run_worker

LOSS_RTOL = 1e-5
# First-batch gradients: tests/test_pipeline_parallel.py's tolerance (measured within 1% of it): SP
# changes only where partial sums are reduced, not what is summed. Params after 5 Adam steps: atol
# 3e-5 (1.5% of one step at the peak lr 2e-3) as tests/test_context_parallel.py, since Adam's
# g / sqrt(v) turns rounding-order noise in small gradients into ~1e-5 moves (measured: 2.4e-5 on the
# Llama FFN's hidden kernel, everything else within 1e-5). A real bug moves params O(lr).
PARAM_RTOL, PARAM_ATOL = 1e-5, 3e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
# A tensor split of 4 on 8 devices, GPT and the Llama options (RoPE, RMSNorm, SwiGLU, grouped K/V heads
# replicated over tensor since 2 K/V heads do not divide 4), each with and without an fsdp split.
CASES = {"gpt dp2 x tp4": ("gpt", "tp", "", dict(data=2, tensor=4)),
         "llama fsdp2 x tp4": ("llama", "fsdp+tp", "kv_heads=none", dict(data=1, fsdp=2, tensor=4))}
MEMORY_TOLERANCE = 0.25  # the bound on measured / predicted temp-memory drop


def _case_config(case: str, sequence_parallel: bool):
    model, layout, override, mesh = CASES[case]
    mesh = dict(mesh, sequence_parallel=sequence_parallel)
    return _llama_config(layout, override, **mesh) if model == "llama" else _config(layout, **mesh)


# ----------------------------------------------------------------------------- 1 device


def test_the_rule_table_splits_only_the_residual_stream_over_tensor():
    from matrixmagic.configs.train_config import MeshConfig
    from matrixmagic.sharding.rules import rules_for, sequence_parallel

    on = dict(rules_for(MeshConfig(layout="fsdp+tp", tensor=4)))
    assert on["activation_residual_length"] == ("context", "tensor")
    assert on["activation_length"] == "context"  # attention and the MLP still read the whole sequence
    off = dict(rules_for(MeshConfig(layout="fsdp+tp", tensor=4, sequence_parallel=False)))
    assert off["activation_residual_length"] == "context"
    assert dict(rules_for(MeshConfig(layout="fsdp")))["activation_residual_length"] == "context"  # no tp: nothing to split
    assert sequence_parallel(MeshConfig(layout="tp"), 4)
    assert not sequence_parallel(MeshConfig(layout="tp"), 1)
    assert not sequence_parallel(MeshConfig(layout="fsdp"), 4)
    assert not sequence_parallel(MeshConfig(layout="tp", sequence_parallel=False), 4)
    # an override still wins
    assert dict(rules_for(MeshConfig(layout="tp", rules_override="activation_residual_length=none"))
                )["activation_residual_length"] is None


def test_analytic_activations_follow_korthikanti_table_2():
    """Korthikanti et al. 2022, Table 2, per layer: sbh (10 + 24/t + 5as/(ht)) with tensor parallelism,
    sbh (34/t + 5as/(ht)) with sequence parallelism too (16-bit activations; this code keeps
    11 a S / t bytes of float32 scores where the paper has 5as/(ht) per sbh, and c/2 per h-term)."""
    from matrixmagic.configs import get_preset
    from matrixmagic.train.planning.plan import activation_bytes_per_token_layer

    cfg = get_preset("gpt3-175b").model.replace(dtype="bfloat16", attention_impl="matrices", remat_policy="none")
    h, a, s, t = cfg.d_model, cfg.num_heads, 2048, 8
    scores = 11 * a * s / t
    assert activation_bytes_per_token_layer(cfg, t, s) == pytest.approx(h * (10 + 24 / t) + scores)
    assert activation_bytes_per_token_layer(cfg, t, s, True) == pytest.approx(h * 34 / t + scores)
    full = cfg.replace(remat_policy="full")  # the paper's 2sbh per layer input, split over t under SP
    assert activation_bytes_per_token_layer(full, t, s, True) == pytest.approx(
        2 * h / t + (h * 34 / t + scores) / cfg.num_layers)


def test_the_175b_estimate_drops_by_the_residual_streams_share():
    """The closed form for gpt3-175b on 512 devices, fsdp 64 x tensor 8, full remat, 4 microbatches:
    each of the 96 saved layer inputs (6 rows x 2048 x 12288 bf16) shrinks 8-fold."""
    from matrixmagic.configs.train_config import MeshConfig, train_config_for
    from matrixmagic.train.planning.plan import estimate

    config = train_config_for("gpt3-175b")
    config = dataclasses.replace(config, batch_size=1536, microbatches=4,
                                 model=config.model.replace(dtype="bfloat16", remat_policy="full"))
    on = dataclasses.replace(config, mesh=MeshConfig(layout="fsdp+tp", data=1, fsdp=64, tensor=8))
    off = dataclasses.replace(on, mesh=dataclasses.replace(on.mesh, sequence_parallel=False))
    saved = 96 * 6 * 2048 * 12288 * 2
    recompute_working = 6 * 2048 * 12288 * 10 * (1 - 1 / 8)  # one layer's unsplit 10 h, bf16
    assert estimate(off, 512).activation_bytes - estimate(on, 512).activation_bytes == pytest.approx(
        saved * (1 - 1 / 8) + recompute_working)


# ----------------------------------------------------------------------------- 8 fake devices


def test_sequence_parallel_step_equals_the_step_without_it():
    result, stderr = run_worker("equivalence", script=__file__)
    assert set(result) == set(CASES)
    for case, got in result.items():
        assert len(got["on"]) == len(got["off"]) == 5
        for a, b in zip(got["on"], got["off"]):
            assert abs(a - b) <= LOSS_RTOL * abs(b), (case, got)
        assert got["grad_excess"] <= 1.0, (case, got)  # max |g - g_ref| / (atol + rtol |g_ref|)
        assert got["param_excess"] <= 1.0, (case, got)
    assert "Involuntary full rematerialization" not in stderr


def test_each_block_gathers_the_sequence_the_residual_stream_splits():
    """With SP, each block's input is all-gathered from [rows, T / 4, d_model] to the whole sequence
    (two per layer: into Q/K/V and into the MLP); without it there is nothing to gather. (How the
    blocks' partial sums come back is the backend's choice: this CPU keeps an all-reduce and slices
    it, libtpu fuses the pair into a reduce-scatter; the memory test below sees the split either way.)"""
    result, _ = run_worker("collectives", script=__file__)
    rows, length, width = result["activation_shape"]
    for sp, layers in (("on", result["num_layers"]), ("off", 0)):
        gathers = [r["op"] for r in result[sp] if r["kind"] == "all-gather" and r["shape"] == [rows, length, width]
                   and "/decoder/" in r["op"]]
        assert len(gathers) == 2 * layers, (sp, gathers)
        for op in gathers:
            assert op.endswith(("self_attention/query/dot_general", "self_attention/value/dot_general",
                                "self_attention/key/dot_general", "feed_forward/hidden/dot_general")), op


@pytest.mark.parametrize("remat", ["none", "full"])
def test_compiled_temp_memory_shrinks_as_the_analytic_model_predicts(remat):
    result, _ = run_worker(f"memory_{remat}", script=__file__)
    measured = result["temp_off"] - result["temp_on"]
    predicted = result["analytic_off"] - result["analytic_on"]
    assert predicted > 0 and measured > 0, result
    assert abs(measured / predicted - 1) <= MEMORY_TOLERANCE, (measured / predicted, result)


# ----------------------------------------------------------------------------- subprocess workers


def _worker_equivalence() -> dict:
    out = {}
    for case in CASES:
        _, on_state, on_losses, on_grads = _train(_case_config(case, True))
        _, off_state, off_losses, off_grads = _train(_case_config(case, False))
        out[case] = {"on": on_losses, "off": off_losses,
                     "grad_excess": _excess(on_grads, off_grads, GRAD_ATOL, GRAD_RTOL),
                     "param_excess": _excess(on_state.params, off_state.params, PARAM_ATOL, PARAM_RTOL),
                     "worst_param": _worst_leaf(on_state.params, off_state.params)}
    return out


def _worst_leaf(got, ref) -> str:
    """The parameter whose excess over the tolerance is largest (for the failure message)."""
    import jax
    import numpy as np

    flat = jax.tree_util.tree_flatten_with_path(jax.tree.map(
        lambda g, r: float(np.max(np.abs(g - r) / (PARAM_ATOL + PARAM_RTOL * np.abs(r)))), got, ref))[0]
    path, _ = max(flat, key=lambda item: item[1])
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _apply(model, params, ids):
    return model.apply({"params": params}, ids)


def _worker_collectives() -> dict:
    """The forward pass of dp2 x tp4 with and without SP, unscanned so each layer's collectives are
    separate ops: (kind, shape, op name) of every all-gather and all-reduce."""
    import re

    import jax
    import jax.numpy as jnp

    from matrixmagic.model import build_model
    from matrixmagic.sharding.partition import with_rules

    out = {}
    for sp, name in ((True, "on"), (False, "off")):
        config = _config("tp", data=2, tensor=4, sequence_parallel=sp)
        config = dataclasses.replace(config, model=config.model.replace(scan_layers=False))
        run, model = _run_for(config), build_model(config.model)
        forward = jax.jit(with_rules(partial(_apply, model), run.mesh, run.rules),
                          in_shardings=(run.state_shardings.params, run.batch_sharding))
        ids = jax.ShapeDtypeStruct((config.batch_size, config.data.seq_len), jnp.int32)
        hlo = forward.lower(run.abstract_state.params, ids).compile().as_text()
        out[name] = [{"kind": m.group(2), "shape": [int(d) for d in m.group(1).split(",")], "op": m.group(3)}
                     for m in re.finditer(r"= \w+\[([\d,]+)\]\{[^}]*\} (all-gather|all-reduce)(?:-start)?\("
                                          r".*?op_name=\"([^\"]+)\"", hlo)]
    return {**out, "num_layers": config.model.num_layers,
            "activation_shape": [config.batch_size // 2, config.data.seq_len, config.model.d_model]}


def _memory(remat: str) -> dict:
    """gpt-tiny's shape (d_model 128, 4 layers, 128 tokens, batch 32) with 4 heads, dp2 x tp4: the
    compiled step's temporaries and the analytic activations, with and without SP."""
    from matrixmagic.configs.train_config import MeshConfig, train_config_for
    from matrixmagic.train.planning.plan import estimate
    from matrixmagic.train.run import abstract_batch

    out = {}
    for sp, name in ((True, "on"), (False, "off")):
        config = train_config_for("gpt-tiny", steps=5)
        config = dataclasses.replace(config, model=config.model.replace(num_heads=4, remat_policy=remat),
                                     mesh=MeshConfig(layout="tp", data=2, tensor=4, sequence_parallel=sp))
        run = _run_for(config)
        batch = abstract_batch(config, run.batch_sharding)
        stats = run.train_step.lower(run.abstract_state, batch).compile().memory_analysis()
        out[f"temp_{name}"] = stats.temp_size_in_bytes
        out[f"analytic_{name}"] = estimate(config, 8).activation_bytes
    return out


def _worker_memory_none() -> dict:
    return _memory("none")


def _worker_memory_full() -> dict:
    return _memory("full")


if __name__ == "__main__":
    print(json.dumps(globals()[f"_worker_{sys.argv[1]}"]()))
