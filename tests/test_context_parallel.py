"""Context parallelism (model/context.py, model/ring_attention.py): the striping permutation, the
ring's blockwise softmax against plain attention, the config checks, and training with the
sequence split over context=2 on 8 fake CPU devices against one device (a subprocess, as
tests/test_sharding.py does it).

Dropout is 0 in the 8-device comparison: the dropout masks are drawn over the striped order, so
with dropout the split run would drop other elements than the one-device run (equally valid,
not equal).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
STEPS, LOSS_RTOL = 5, 1e-5
# Params after 5 Adam steps: rtol as tests/test_sharding.py, atol 3e-5 (1.5% of one step at the peak lr 2e-3):
# the key projection's bias (and the key kernel along the mean input) have a true gradient of ~0, since
# softmax is shift-invariant over keys, so Adam's g / sqrt(v) turns their rounding noise into ~1e-5 moves
# whose sign depends on the summation order, and the ring sums keys in another order (measured: 1e-5 on
# the key bias and kernel only, everything else within 2e-6). A real bug moves params O(lr).
PARAM_RTOL, PARAM_ATOL = 1e-5, 3e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6  # gradients of the first batch, before Adam: measured within 2% of this


def run_worker(name: str, devices: int = 8, timeout: int = 900) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), name], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- one device


def test_striping_gives_each_shard_an_early_and_a_late_chunk_and_inverts():
    import jax.numpy as jnp

    from matrixmagic.model.context import stripe, stripe_order, unstripe

    assert stripe_order(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]  # shard 0: chunks 0, 3; shard 1: chunks 1, 2
    assert stripe_order(8, 4).tolist() == [0, 7, 1, 6, 2, 5, 3, 4]
    assert stripe_order(6, 1).tolist() == list(range(6))
    x = jnp.arange(2 * 16 * 3).reshape(2, 16, 3)
    for shards in (1, 2, 4, 8):
        striped = stripe(x, shards)
        assert (striped == x[:, stripe_order(16, shards)]).all()
        assert (unstripe(striped, shards) == x).all()
    # causal work per shard (visible key count of its queries) is equal under striping
    order = np.asarray(stripe_order(16, 4)).reshape(4, 4)
    assert len({int((row[:, None] + 1).sum()) for row in order}) == 1


def _reference(q, k, v, mask):
    import jax.numpy as jnp

    from matrixmagic.model.attention import attention_weights

    _, weights = attention_weights(q, k, mask.dense(q.shape[1], k.shape[1]))
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _packed_segments(batch: int, length: int) -> np.ndarray:
    """Three documents and a padding tail per row, boundaries differing between rows."""
    rows = []
    for b in range(batch):
        cut1, cut2, pad = 3 + b % 3, 9 + b % 3, length - 2
        rows.append([1] * cut1 + [2] * (cut2 - cut1) + [3] * (pad - cut2) + [0] * (length - pad))
    return np.asarray(rows, np.int32)


@pytest.mark.parametrize("causal,segmented,shards", [(True, True, 2), (True, False, 4), (False, True, 2),
                                                     (True, True, 1)])
def test_blockwise_softmax_equals_plain_attention(causal, segmented, shards):
    """The ring's math on one device, K/V in 4 blocks, tokens in striped order (original indices in
    the mask), against softmax over all keys at once: values and gradients."""
    import jax
    import jax.numpy as jnp

    from matrixmagic.model.context import stripe, stripe_order
    from matrixmagic.model.masks import AttentionMask
    from matrixmagic.model.ring_attention import blockwise_attention

    batch, length, heads, d_k = 2, 16, 3, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(key, (batch, length, heads, d_k)) for key in keys[:3])
    order = stripe_order(length, shards)
    segments = stripe(jnp.asarray(_packed_segments(batch, length)), shards) if segmented else None
    mask = AttentionMask(causal, segments, segments, order)
    probe = jax.random.normal(keys[3], q.shape)

    def ring(q, k, v):
        return blockwise_attention(q, k, v, order, order, segments, segments, causal=causal, num_blocks=4)

    np.testing.assert_allclose(ring(q, k, v), _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda *a, f=f: (f(*a) * probe).sum(), argnums=(0, 1, 2))(q, k, v)
             for f in (ring, lambda q, k, v: _reference(q, k, v, mask))]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_causal_mask_follows_the_original_order():
    from matrixmagic.model.context import stripe_order
    from matrixmagic.model.masks import AttentionMask

    order = stripe_order(8, 2)
    dense = np.asarray(AttentionMask(True, order=order).dense(8, 8))[0, 0]
    plain = np.tril(np.ones((8, 8), bool))
    np.testing.assert_array_equal(dense, plain[np.ix_(np.asarray(order), np.asarray(order))])


def _config(context=2, kind="all_gather", seq_len=16, model=None, **mesh):
    from matrixmagic.configs.train_config import MeshConfig, train_config_for

    config = train_config_for("gpt-tiny", steps=5)
    model = config.model.replace(**{**dict(d_model=32, num_heads=4, d_ff=64, num_layers=2, vocab_size=128,
                                           max_len=32, dropout_rate=0.0, attention_dropout_rate=0.0), **(model or {})})
    return dataclasses.replace(config, model=model, batch_size=8,
                               mesh=MeshConfig(context=context, context_attention=kind, **mesh),
                               data=dataclasses.replace(config.data, seq_len=seq_len))


@pytest.mark.parametrize("change,match", [
    (dict(seq_len=18), r"mesh\.context=2 is invalid: data\.seq_len=18 must cut into 2 x mesh\.context = 4"),
    (dict(model=dict(family="encoder")), r"mesh\.context=2 is invalid: .*decoder-only"),
    (dict(seq_len=128, model=dict(attention_impl="splash", max_len=128)),
     r"model\.attention_impl='splash' is invalid: .*context"),
    (dict(kind="ring", model=dict(attention_dropout_rate=0.1)),
     r"mesh\.context_attention='ring' is invalid: .*attention_dropout_rate=0"),
])
def test_a_bad_context_split_names_the_field(change, match):
    from matrixmagic.configs import ConfigError

    with pytest.raises(ConfigError, match=match):
        _config(**change)


def test_unknown_context_attention_and_resolved_sizes_are_checked():
    from matrixmagic.configs import ConfigError
    from matrixmagic.configs.train_config import MeshConfig
    from matrixmagic.sharding.validate import validate_mesh

    with pytest.raises(ConfigError, match=r"mesh\.context_attention='rign' is invalid.*Did you mean 'ring'"):
        MeshConfig(context_attention="rign")
    config = _config(context=-1, seq_len=20, data=1)  # -1 fills to 8: 20 does not cut into 16 chunks
    with pytest.raises(ConfigError, match=r"mesh\.context=8 is invalid: data\.seq_len=20"):
        validate_mesh(config, 8)


def test_one_device_forward_is_unchanged_by_the_context_rules():
    """The rule table maps activation_length to context; with context=1 (and without a mesh) the
    model computes what it did before: no striping, no gathered K/V."""
    import jax
    import jax.numpy as jnp

    from matrixmagic.model import build_model
    from matrixmagic.model.context import context_split

    config = _config(context=1)
    model = build_model(config.model)
    ids = jnp.arange(32).reshape(2, 16) % 128
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    assert context_split() == (None, 1)
    out = model.apply({"params": params}, ids)
    assert out.shape == (2, 16, config.model.vocab_size) and bool(jnp.isfinite(out).all())


def test_memory_model_divides_activations_by_context():
    """train/planning/plan.py: a context split keeps S / C tokens per device (the logits too), plus
    the whole sequence's K/V per layer that attention gathered or received."""
    from matrixmagic.configs.train_config import MeshConfig
    from matrixmagic.train.planning.plan import context_kv_bytes, estimate, logit_bytes

    one = _config(context=1, seq_len=32, data=1)
    two = dataclasses.replace(one, mesh=MeshConfig(data=1, context=2))
    kv = context_kv_bytes(two, 2)
    layers, rows, width = one.model.num_layers, one.batch_size, 2 * one.model.kv_heads * one.model.head_dim
    assert kv == layers * rows * 32 * width * 4 and context_kv_bytes(one, 1) == 0  # float32 K and V
    assert logit_bytes(two, 2) == logit_bytes(one, 1) / 2
    assert estimate(two, 2).activation_bytes - kv == pytest.approx(estimate(one, 1).activation_bytes / 2)
    assert estimate(two, 2).state_bytes == estimate(one, 1).state_bytes  # weights are not split by context


# ----------------------------------------------------------------------------- 8 devices


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_context_split_trains_like_one_device(model):
    """context=2 with all_gather and with ring, for gpt-tiny (learned positions, biases) and a
    llama-style model (rope, GQA; its ring run also splits fsdp=2 x tensor=2): losses per step,
    gradients of the first batch and params after 5 steps equal the one-device run's to float32
    tolerance."""
    result = run_worker(f"equivalence_{model}")
    reference = result["reference"]
    for name, got in result["runs"].items():
        for a, b in zip(got["losses"], reference):
            assert abs(a - b) <= LOSS_RTOL * abs(b), (name, got["losses"], reference)
        assert got["grad_excess"] <= 1.0, (name, got)
        assert got["param_excess"] <= 1.0, (name, got)
    assert set(result["runs"]) == {name for name, run in RUNS.items() if run[0] == model}


def test_magic_compile_with_a_context_split():
    result = run_worker("compile")
    assert result["rc"] == 0, result["output"]


# ----------------------------------------------------------------------------- subprocess workers

RUNS = {"gpt_all_gather": ("gpt", "all_gather", dict(data=4)),
        "gpt_ring": ("gpt", "ring", dict(data=4)),
        "llama_ring_fsdp_tp": ("llama", "ring", dict(data=1, fsdp=2, tensor=2, layout="fsdp+tp")),
        "llama_all_gather": ("llama", "all_gather", dict(data=4))}


def _model_config(name: str, context=1, kind="all_gather", **mesh):
    config = _config(context, kind, **mesh)
    if name == "llama":
        config = dataclasses.replace(config, model=config.model.replace(
            positional="rope", norm="rmsnorm", activation="swiglu", num_kv_heads=2, use_bias=False,
            tie_embeddings=False))
    return config


def _batch(rng, batch: int, length: int, vocab: int) -> dict:
    """Packed documents (positions restart in each) and a padding tail the loss skips."""
    segments = _packed_segments(batch, length)
    positions = np.zeros_like(segments)
    for b in range(batch):
        for t in range(1, length):
            same = segments[b, t] == segments[b, t - 1] and segments[b, t] > 0
            positions[b, t] = positions[b, t - 1] + 1 if same else 0
    tokens = rng.integers(0, vocab, (batch, length + 1), dtype=np.int32)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=positions, segment_ids=segments,
                loss_mask=(segments > 0).astype(np.float32))


def _first_grads(config, run):
    import jax

    from matrixmagic.model import build_model, objectives
    from matrixmagic.model.families import family_of
    from matrixmagic.sharding.partition import with_rules

    model = build_model(config.model)
    batch = _batch(np.random.default_rng(0), config.batch_size, config.data.seq_len, config.model.vocab_size)

    def loss(params, batch):
        return objectives.loss_fn(family_of(config.model), model, params, batch, None, train=True)[0]

    grad = jax.jit(with_rules(jax.grad(loss), run.mesh, run.rules, config.mesh.context_attention),
                   in_shardings=(run.state_shardings.params, run.batch_sharding))
    state = run.init_state(jax.random.PRNGKey(config.seed))
    return jax.device_get(grad(state.params, run.put_batch(batch)))


def _train(config, devices=None):
    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_sharding import _run_for

    run = _run_for(config, devices)
    grads = _first_grads(config, run)
    state = run.init_state(jax.random.PRNGKey(config.seed))
    rng, losses = np.random.default_rng(0), []
    for _ in range(STEPS):
        batch = _batch(rng, config.batch_size, config.data.seq_len, config.model.vocab_size)
        state, metrics = run.train_step(state, run.put_batch(batch))
        losses.append(float(metrics["loss"]))
    return losses, grads, jax.device_get(state.params)


def _excess(got, want, rtol, atol) -> float:
    import jax

    return max(float(np.max(np.abs(g - w) / (atol + rtol * np.abs(w))))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def _equivalence(model: str) -> dict:
    import jax

    reference, ref_grads, ref_params = _train(_model_config(model), jax.devices()[:1])
    runs = {}
    for run_name, (name, kind, mesh) in RUNS.items():
        if name != model:
            continue
        losses, grads, params = _train(_model_config(name, 2, kind, **mesh))
        runs[run_name] = {"losses": losses, "grad_excess": _excess(grads, ref_grads, GRAD_RTOL, GRAD_ATOL),
                          "param_excess": _excess(params, ref_params, PARAM_RTOL, PARAM_ATOL)}
    return {"reference": reference, "runs": runs}


def _worker_equivalence_gpt() -> dict:
    return _equivalence("gpt")


def _worker_equivalence_llama() -> dict:
    return _equivalence("llama")


def _worker_compile() -> dict:
    """`magic compile` (train/aot.py's path) for a fake 8-device CPU mesh with context=2, ring."""
    proc = subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", "compile", "--preset", "llama-tiny",
                           "--topology", "cpu-8", "--mesh", "data=4,context=2", "--set", "model.max_len=64",
                           "--set", "data.seq_len=64", "--set", "batch_size=8",
                           "--set", "mesh.context_attention=ring"],
                          capture_output=True, text=True, timeout=600)
    return {"rc": proc.returncode, "output": (proc.stdout + proc.stderr)[-4000:]}


if __name__ == "__main__":
    print(json.dumps(globals()[f"_worker_{sys.argv[1]}"]()))
