"""model.attention_impl="splash": the Pallas TPU kernel computes what the matrices compute.

On CPU the kernel runs in Pallas's interpreter (`splash.interpreted`, a test hook) with
blocks of 128 over sequences of 256, so causal block skipping, several blocks per row
and segment ids that cross block edges are all exercised. Each family is compared with
`matrices` in float32, forward and gradients, on packed rows (several documents, a
padded tail): padding queries' outputs differ by design (the loss discards them,
masks.AttentionMask.kernel_segments) and are left out. The shard_map path runs one real
train step on a 4-device CPU mesh (subprocess); the TPU path lowers and compiles for a
v5e topology when libtpu is installed. Bad requests are config errors naming the field.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matrixmagic.configs import ConfigError, get_preset
from matrixmagic.configs.train_config import apply_overrides, train_config_for
from matrixmagic.model import build_model, init_params, masks, splash
from matrixmagic.model.attention import MultiHeadAttention
from matrixmagic.model.families import family_of
from matrixmagic.model.generate import Sampling, generate, translate
from matrixmagic.train.data.tokenizers import ByteTokenizer
from matrixmagic.train.planning import chips
from matrixmagic.train.run import resolve_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()
T = 256  # attention length of every stack: two blocks of 128
# init_std 0.2: scores of order 1, so attention is far from uniform and a wrong score shows.
SMALL = {"d_model": 32, "num_heads": 4, "d_ff": 64, "num_layers": 2, "max_len": T, "vocab_size": 384,
         "dropout_rate": 0.0, "attention_dropout_rate": 0.0, "init_std": 0.2}
needs_libtpu = pytest.mark.skipif(not chips.libtpu_available(),
                                  reason="libtpu not installed (pip install 'matrixmagic[tpu]'); CPU paths still run")


def packed_batch(preset: str, batch: int = 2) -> dict:
    """Rows of several documents, boundaries inside and across blocks (and, for the encoder-decoder,
    a later document in the decoder half: its queries have no encoder key), row 0 padded."""
    family = family_of(get_preset(preset).model)
    seq_len = T * len(family.sides)
    rows = np.random.default_rng(0).integers(0, 256, (batch, family.row_len(seq_len))).astype(np.int32)
    for start in (5, 130, 300):
        if start < rows.shape[1]:
            rows[:, start] = TOK.eot_id
    rows[0, -40:] = TOK.pad_id  # padding: segment 0
    return family.make_batch(rows, TOK, seq_len)


def real_rows(batch: dict) -> np.ndarray:
    """[B, T] True at the queries whose outputs count (non-padding segment ids)."""
    return batch.get("segment_ids", batch.get("decoder_segment_ids")) > 0


def configs(preset: str):
    matrices = get_preset(preset).model.replace(**SMALL)
    return matrices, matrices.replace(attention_impl="splash")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny", "transformer-tiny", "llama-tiny"])
def test_splash_equals_matrices_forward_and_gradients(preset):
    """Causal + segments + padding (GPT), bidirectional (BERT), and encoder-decoder self and
    cross attention by segment ids."""
    matrices, kernel = configs(preset)
    family, batch = family_of(matrices), packed_batch(preset)
    params = init_params(matrices, jax.random.key(1))

    def loss(p, config):
        logits = build_model(config).apply({"params": p}, **family.model_inputs(batch), deterministic=True)
        return (logits ** 2 * batch["loss_mask"][..., None]).mean(), logits

    (l_ref, out_ref), g_ref = jax.value_and_grad(loss, has_aux=True)(params, matrices)
    with splash.interpreted(largest_block=128):
        (l_new, out_new), g_new = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, kernel)
    rows = real_rows(batch)
    assert rows.sum() > 0 and (~rows).sum() > 0
    assert np.isfinite(np.asarray(out_new)).all()  # padding queries too (some see no key at all)
    np.testing.assert_allclose(np.asarray(out_new)[rows], np.asarray(out_ref)[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(l_new), float(l_ref), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g_new)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    attention = [g for path, g in jax.tree_util.tree_leaves_with_path(g_ref) if "attention" in jax.tree_util.keystr(path)]
    assert attention and all(np.abs(np.asarray(g)).max() > 0 for g in attention)  # Q, K, V, W_o all get gradients


def test_cross_attention_with_key_ids_alone_and_unequal_lengths():
    """Decoder queries (128) x encoder keys (256) with only the encoder's padding known, the
    mask the encoder-decoder gives cross attention while decoding: every query sees every
    non-padding key, as in the dense form."""
    matrices, kernel = configs("transformer-tiny")
    rng = np.random.default_rng(3)
    xq, xkv = (jnp.asarray(rng.normal(size=(2, n, SMALL["d_model"])), jnp.float32) for n in (128, T))
    enc = np.ones((2, T), np.int32)
    enc[1, 200:] = 0
    mask = masks.cross_attention_mask(None, jnp.asarray(enc))
    params = MultiHeadAttention(matrices).init(jax.random.key(0), xq, xkv, mask)

    def run(config):
        return MultiHeadAttention(config).apply(params, xq, xkv, mask)

    with splash.interpreted(largest_block=128):
        got = jax.jit(run, static_argnums=0)(kernel)
    np.testing.assert_allclose(np.asarray(got), np.asarray(run(matrices)), rtol=1e-5, atol=1e-5)
    shifted = np.asarray(run(matrices)) - np.asarray(MultiHeadAttention(matrices).apply(params, xq, xkv, None))
    assert np.abs(shifted[1]).max() > 1e-2  # the padding of row 1 really is masked


def test_kv_cache_decoding_keeps_the_dense_path():
    """Generation with a splash model: prompts of 2..7 tokens (no block of 128 tiles them) decode
    against the KV cache through the dense path, token for token as the matrices do; the
    encoder-decoder encodes 128-token sources with the kernel and decodes densely."""
    matrices, kernel = configs("gpt-tiny")
    params = init_params(matrices, jax.random.key(2))
    prompts = [[TOK.eot_id, 72, 105, 33], [TOK.eot_id, 100], [TOK.eot_id, 1, 2, 3, 4, 5, 6]]
    outs = [generate(build_model(c), params, prompts, max_new_tokens=8, eot_id=TOK.eot_id,
                     sampling=Sampling(temperature=0.0)).rows() for c in (matrices, kernel)]
    assert [list(r) for r in outs[0]] == [list(r) for r in outs[1]] and sum(map(len, outs[0])) > 0

    matrices, kernel = configs("transformer-tiny")
    params = init_params(matrices, jax.random.key(3))
    rng = np.random.default_rng(4)
    sources = [list(rng.integers(0, 256, 128)), list(rng.integers(0, 256, 100))]  # padded to 128
    with splash.interpreted(largest_block=128):
        outs = [translate(build_model(c), params, sources, bos_id=TOK.bos_id, eot_id=TOK.eot_id,
                          max_new_tokens=6).rows() for c in (matrices, kernel)]
    assert [list(r) for r in outs[0]] == [list(r) for r in outs[1]] and sum(map(len, outs[0])) > 0


def test_block_sizes_divide_the_lengths():
    assert [splash.block_size(n) for n in (128, 256, 384, 512, 1024, 2048)] == [128, 256, 128, 512, 512, 512]
    assert splash.block_size(1024, largest=128) == 128
    with pytest.raises(ValueError, match="model.attention_impl='splash'.*multiple of 128.*matrices or fused"):
        splash.block_size(100)


# ----------------------------------------------------------------------------- the mesh: shard_map


def test_sharded_train_step_equals_matrices():
    """One train step (remat, 2 microbatches) on a 4-device CPU mesh, fsdp=2 x tensor=2: the
    kernel runs inside shard_map (batch over fsdp, heads over tensor) and gives the loss and
    the updated params of the matrices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "sharded"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shard_map_in_step"]
    assert abs(result["loss"]["splash"] - result["loss"]["matrices"]) <= 1e-5 * abs(result["loss"]["matrices"])
    assert result["param_excess"] <= 1.0, result


def _worker_sharded() -> dict:
    import dataclasses

    from matrixmagic.train.run import train_run

    assert jax.device_count() == 4
    base = train_config_for("gpt-tiny")
    base = apply_overrides(base, [f"model.{k}={v}" for k, v in SMALL.items()] + [
        f"data.seq_len={T}", "batch_size=4", "microbatches=2", "model.remat_policy=full", "mesh.data=1",
        "mesh.fsdp=2", "mesh.tensor=2", "mesh.layout=fsdp+tp", "optimizer.learning_rate=1e-2"])
    batch = packed_batch("gpt-tiny", batch=4)
    out = {"loss": {}, "params": {}}
    for impl in ("matrices", "splash"):
        config = dataclasses.replace(base, model=base.model.replace(attention_impl=impl))
        _, run = train_run(config)
        state = run.init_state(jax.random.PRNGKey(0))
        with splash.interpreted(largest_block=128):
            if impl == "splash":
                jaxpr = str(jax.make_jaxpr(run.train_step)(state, run.put_batch(batch)))
                out["shard_map_in_step"] = "shard_map" in jaxpr
            state, metrics = run.train_step(state, run.put_batch(batch))
        out["loss"][impl] = float(metrics["loss"])
        out["params"][impl] = jax.device_get(state.params)
    # params after one Adam step: |p - p_ref| within 1e-5 + 1e-5 |p_ref| (test_sharding's tolerance)
    excess = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b) / (1e-5 + 1e-5 * np.abs(b)))),
                          out["params"]["splash"], out["params"]["matrices"])
    return {"loss": out["loss"], "shard_map_in_step": out["shard_map_in_step"],
            "param_excess": max(jax.tree.leaves(excess))}


# ----------------------------------------------------------------------------- TPU (libtpu)


@needs_libtpu
def test_splash_lowers_and_compiles_for_a_tpu_topology():
    """The train step with the Pallas kernel (a Mosaic custom call in the HLO) compiles for v5e-4,
    fsdp=2 x tensor=2. At T=1024 the matrices path holds [.., T, T] scores, weights and masks;
    the splash step has no such array at all, and a lower peak of live buffers."""
    from matrixmagic.train import aot
    from matrixmagic.train.run import with_tokenizer_vocab

    target = chips.parse_target("v5e-4")
    devices = chips.target_devices(target)
    flags = ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "batch_size=8", "model.d_model=128", "model.num_heads=4",
             "model.d_ff=256", "model.num_layers=2", "model.max_len=1024", "data.seq_len=1024"]
    square, peak = re.compile(r"\[[\d,]*1024,1024\]"), {}
    for impl in ("matrices", "splash"):
        config = resolve_config("gpt-tiny", flags + [f"model.attention_impl={impl}"], devices=4, platform="tpu")
        config = with_tokenizer_vocab(config, TOK)
        assert config.model.attention_impl == impl
        outcome = aot.compile_step(config, devices)
        assert outcome.fits and "optimal_seconds" in outcome.cost
        hlo = outcome.compiled.as_text()
        assert ("tpu_custom_call" in hlo) == (impl == "splash")
        assert bool(square.search(hlo)) == (impl == "matrices")
        peak[impl] = outcome.memory.peak
    assert 0 < peak["splash"] < peak["matrices"], peak


def test_analytic_activations_drop_the_score_matrices():
    """train/planning/plan.py: with splash each head keeps one logsumexp per token, not S scores: the
    remat-none estimate shrinks by L x tokens x 11 a (S - 1) / t bytes."""
    from matrixmagic.train.planning import plan

    flags = ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=8", "model.remat_policy=none", "microbatches=4",
             "model.attention_dropout_rate=0"]
    est = {impl: plan.estimate(resolve_config("gpt3-175b", flags + [f"model.attention_impl={impl}"], devices=512,
                                              platform="tpu"), 512) for impl in ("matrices", "splash")}
    cfg, seq = get_preset("gpt3-175b").model, 2048
    tokens = 1536 // 64 // 4 * seq  # per device per microbatch
    saved = cfg.num_layers * tokens * 11 * cfg.num_heads * (seq - 1) / 8
    assert est["matrices"].activation_bytes - est["splash"].activation_bytes == pytest.approx(saved)


# ----------------------------------------------------------------------------- defaults and errors


def test_tpu_defaults_to_splash_unless_the_flags_choose():
    tpu = resolve_config("gpt3-175b", devices=8, platform="tpu").model
    assert (tpu.attention_impl, tpu.attention_dropout_rate, tpu.dtype) == ("splash", 0.0, "bfloat16")
    asked = resolve_config("gpt3-175b", ["model.attention_impl=matrices"], devices=8, platform="tpu").model
    assert (asked.attention_impl, asked.attention_dropout_rate) == ("matrices", 0.1)  # the preset's dropout kept
    dropout = resolve_config("gpt2", ["model.attention_dropout_rate=0.1"], devices=8, platform="tpu").model
    assert dropout.attention_impl == "matrices"
    short = resolve_config("transformer-tiny", devices=8, platform="tpu").model  # 64 + 64: no 128 blocks
    assert short.attention_impl == "matrices"
    for platform in ("cpu", "gpu"):
        assert resolve_config("gpt-tiny", devices=1, platform=platform).model.attention_impl == "matrices"


@pytest.mark.parametrize("preset, flags, platform, words", [
    ("gpt-tiny", ["model.attention_impl=splash"], "cpu",
     "model.attention_impl='splash' is invalid on cpu.*TPU.*matrices or fused"),
    ("gpt-tiny", ["model.attention_impl=splash"], "gpu", "model.attention_impl='splash' is invalid on gpu"),
    ("gpt-tiny", ["model.attention_impl=splash", "data.seq_len=100"], "tpu",
     "model.attention_impl='splash' is invalid.*decoder length 100.*multiple of 128.*matrices or fused"),
    ("transformer-tiny", ["model.attention_impl=splash"], "tpu",
     "encoder length 64, decoder length 64.*multiple of 256"),
    ("gpt3-175b", ["model.attention_impl=splash"], "tpu",
     "model.attention_impl='splash' is invalid.*attention_dropout_rate=0.1.*model.attention_impl=matrices"),
])
def test_splash_where_it_cannot_run_is_a_config_error(preset, flags, platform, words):
    with pytest.raises(ConfigError, match=words):
        resolve_config(preset, flags, devices=1, platform=platform)


def test_magic_train_refuses_splash_on_cpu_cleanly(capsys):
    from matrixmagic.train.cli import main

    assert main(["train", "--set", "model.attention_impl=splash", "--set", "steps=1"]) == 2
    err = capsys.readouterr().err
    assert "model.attention_impl='splash'" in err and "Traceback" not in err


if __name__ == "__main__":
    print(json.dumps(globals()[f"_worker_{sys.argv[1]}"]()))
