"""The Llama options (rotary positions, RMSNorm, SwiGLU, grouped-query attention) against
independent references, forward and backward.

Forward: float64 numpy written from each paper's formula (RoPE as complex rotations, as
RoFormer section 3.2 writes it; RMSNorm from Zhang & Sennrich 2019 eq. 4; SwiGLU from
Shazeer 2020 eq. 6; grouped-query attention as multi-head attention whose key/value heads
are shared by groups of query heads, Ainslie et al. 2023 section 2.2).
Backward: jax's gradient of the module, along a random direction, against the central
difference of the numpy reference in float64.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_modules import f64, randn, randomize

from matrixmagic.configs import ConfigError, ModelConfig
from matrixmagic.model import build_model, init_params
from matrixmagic.model.attention import MultiHeadAttention
from matrixmagic.model.gated_ffn import GatedFeedForward, swiglu_d_ff
from matrixmagic.model.generate import Sampling, generate, init_cache
from matrixmagic.model.masks import causal_mask
from matrixmagic.model.rms_norm import RMSNorm
from matrixmagic.model.rotary import apply_rotary, rope_frequencies, rotary_angles

B, T, D, H, F = 2, 7, 32, 4, 48


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=D, num_heads=H, num_layers=2, d_ff=F, max_len=32, dropout_rate=0.0,
                attention_dropout_rate=0.0, use_bias=False)
    return ModelConfig(**{**base, **kw})


def directional_check(jax_fn, np_fn, args, seed=3, eps=1e-5, rtol=2e-3):
    """d/dt np_fn(args + t v) at t=0 (central difference, float64) == <jax.grad(jax_fn)(args), v>,
    for L = sum(output * G) with a fixed random G."""
    rng = np.random.default_rng(seed)
    G = rng.normal(size=np.shape(np_fn(*f64(args))))
    direction = jax.tree_util.tree_map(lambda a: rng.normal(size=np.shape(a)), args)

    def loss_np(t):
        moved = jax.tree_util.tree_map(lambda a, v: np.asarray(a, np.float64) + t * v, args, direction)
        return float((np_fn(*moved) * G).sum())

    numeric = (loss_np(eps) - loss_np(-eps)) / (2 * eps)
    grads = jax.grad(lambda a: (jax_fn(*a) * jnp.asarray(G, jnp.float32)).sum())(args)
    analytic = sum(float((np.asarray(g, np.float64) * v).sum())
                   for g, v in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction)))
    assert analytic == pytest.approx(numeric, rel=rtol, abs=1e-4)


# ---------------------------------------------------------------- rotary positions

def np_rope(x, positions, theta):
    """RoFormer 3.2: dimensions (i, i + d/2) as one complex number, multiplied by e^{i m w_i}."""
    half = x.shape[-1] // 2
    w = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[:, :, None, None] * w)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_is_a_complex_rotation_forward_and_backward():
    c = cfg(positional="rope", rope_theta=500.0)
    x = randn(0, B, T, H, D // H)
    positions = np.array([[0, 1, 2, 3, 4, 5, 6], [3, 9, 0, 1, 2, 30, 31]], np.int32)  # packed rows restart
    got = apply_rotary(jnp.asarray(x), rotary_angles(c, jnp.asarray(positions)))
    np.testing.assert_allclose(np.asarray(got), np_rope(x.astype(np.float64), positions, 500.0), atol=2e-5)
    directional_check(lambda x: apply_rotary(x, rotary_angles(c, jnp.asarray(positions))),
                      lambda x: np_rope(x, positions, 500.0), (jnp.asarray(x),))


def test_rope_scores_depend_on_the_distance_alone():
    c = cfg(positional="rope")
    q, k = randn(1, 1, 1, 1, 8), randn(2, 1, 1, 1, 8)
    c = c.replace(d_model=8, num_heads=1)

    def score(m, n):
        turn = lambda v, p: apply_rotary(jnp.asarray(v), rotary_angles(c, jnp.asarray([[p]])))
        return float((turn(q, m) * turn(k, n)).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) == pytest.approx(score(3, 0), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_llama3_scaling_bands():
    """Meta's apply_scaling: short wavelengths kept, long ones / factor, a linear blend of the two
    in between (written here in wavelengths, continuous at both edges)."""
    base = cfg(positional="rope", rope_theta=500000.0, num_heads=1, d_model=128)
    scaled = base.replace(rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                          rope_high_freq_factor=4.0, rope_original_max_len=8192)
    w, s = rope_frequencies(base).astype(np.float64), rope_frequencies(scaled).astype(np.float64)
    wavelen = 2 * math.pi / w
    short, long = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert short.any() and long.any() and (~short & ~long).any()
    np.testing.assert_allclose(s[short], w[short], rtol=1e-6)
    np.testing.assert_allclose(s[long], w[long] / 8, rtol=1e-6)
    mid = ~short & ~long
    blend = (8192 / wavelen[mid] - 1) / (4 - 1)  # 0 at the long edge, 1 at the short edge
    np.testing.assert_allclose(s[mid], (1 - blend) * w[mid] / 8 + blend * w[mid], rtol=1e-6)
    assert np.all(np.diff(s) < 0)  # still strictly fast to slow


# ---------------------------------------------------------------- RMSNorm

def np_rms_norm(x, scale, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale


def test_rms_norm_forward_and_backward():
    c = cfg(norm="rmsnorm", layer_norm_eps=1e-6)
    x = randn(4, B, T, D)
    module = RMSNorm(c)
    params = randomize(module.init(jax.random.key(0), x)["params"], seed=1)
    assert set(params) == {"scale"}  # no bias, no mean
    got = module.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), np_rms_norm(f64(x), f64(params["scale"]), 1e-6), rtol=1e-5, atol=1e-6)
    directional_check(lambda x, s: module.apply({"params": {"scale": s}}, x),
                      lambda x, s: np_rms_norm(x, s, 1e-6), (jnp.asarray(x), params["scale"]))


# ---------------------------------------------------------------- SwiGLU

def np_swiglu(x, gate, up, down):
    a = x @ gate
    return (a / (1 + np.exp(-a)) * (x @ up)) @ down


def test_swiglu_forward_and_backward():
    c = cfg(activation="swiglu")
    x = randn(5, B, T, D)
    module = GatedFeedForward(c)
    params = randomize(module.init(jax.random.key(0), x)["params"], seed=2)
    assert {k: params[k]["kernel"].shape for k in params} == {"gate": (D, F), "hidden": (D, F), "output": (F, D)}
    kernels = (params["gate"]["kernel"], params["hidden"]["kernel"], params["output"]["kernel"])
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, x)), np_swiglu(f64(x), *f64(kernels)),
                               rtol=1e-4, atol=1e-5)

    def run(x, g, u, o):
        return module.apply({"params": {"gate": {"kernel": g}, "hidden": {"kernel": u}, "output": {"kernel": o}}}, x)

    directional_check(run, np_swiglu, (jnp.asarray(x), *kernels))


def test_swiglu_d_ff_rule_gives_the_published_widths():
    # Llama 2 7B / 13B (multiple of 256), Llama 2 70B and Llama 3 8B / 405B (ffn_dim_multiplier 1.3 / 1.2, 1024)
    assert swiglu_d_ff(4096) == 11008 and swiglu_d_ff(5120) == 13824
    assert swiglu_d_ff(8192, 4096, 1.3) == 28672
    assert swiglu_d_ff(4096, 1024, 1.3) == 14336 and swiglu_d_ff(16384, 1024, 1.2) == 53248


# ---------------------------------------------------------------- grouped-query attention

def np_gqa(p, x, allowed, groups_of, rotate=None):
    """Multi-head attention where query head h reads key/value head groups_of(h)."""
    p = f64(p)
    x = np.asarray(x, np.float64)
    heads, d_k = p["query"]["kernel"].shape[1:]
    outs = []
    for h in range(heads):
        g = groups_of(h)
        q, k, v = x @ p["query"]["kernel"][:, h], x @ p["key"]["kernel"][:, g], x @ p["value"]["kernel"][:, g]
        if rotate is not None:
            q, k = rotate(q), rotate(k)
        s = np.where(allowed, q @ k.transpose(0, 2, 1) / math.sqrt(d_k), -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        outs.append((a / a.sum(-1, keepdims=True)) @ v)
    return np.concatenate(outs, -1) @ p["output"]["kernel"].reshape(heads * d_k, -1)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_attention_forward_and_backward(kv_heads):
    c = cfg(num_kv_heads=kv_heads, positional="rope")
    x = randn(6, B, T, D)
    positions = np.broadcast_to(np.arange(T), (B, T))
    rotary = rotary_angles(c, jnp.asarray(positions))
    module = MultiHeadAttention(c)
    mask = causal_mask(T)
    params = randomize(module.init(jax.random.key(0), x, x, mask, rotary)["params"], seed=4)
    assert params["key"]["kernel"].shape == (D, kv_heads, D // H) == params["value"]["kernel"].shape
    allowed = np.tril(np.ones((T, T), bool))[None]
    group = H // kv_heads

    def rotate(v):  # [B, T, d_k], one head
        return np_rope(v[:, :, None, :], positions, c.rope_theta)[:, :, 0, :]

    ref = np_gqa(params, x, allowed, lambda h: h // group, rotate)
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, x, x, mask, rotary)), ref,
                               rtol=1e-4, atol=1e-5)
    directional_check(lambda x, p: module.apply({"params": p}, x, x, mask, rotary),
                      lambda x, p: np_gqa(p, x, allowed, lambda h: h // group, rotate), (jnp.asarray(x), params))


def test_gqa_with_one_kv_head_per_query_head_is_multi_head():
    plain, grouped = cfg(), cfg(num_kv_heads=H)
    assert grouped.kv_heads == plain.kv_heads == H
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (B, T)), jnp.int32)
    params = init_params(plain, jax.random.key(0))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(init_params(grouped, jax.random.key(0)))
    np.testing.assert_array_equal(build_model(grouped).apply({"params": params}, ids),
                                  build_model(plain).apply({"params": params}, ids))


def test_gqa_equals_multi_head_with_the_kv_heads_copied():
    """A grouped model == the multi-head model whose K/V weights repeat each group's head."""
    grouped, plain = cfg(num_kv_heads=2, positional="rope"), cfg(positional="rope")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (B, T)), jnp.int32)
    params = init_params(grouped, jax.random.key(2))
    copied = jax.tree_util.tree_map(lambda a: a, params)
    for name in ("key", "value"):
        kernel = params["decoder"]["layers"]["self_attention"][name]["kernel"]  # [layers, d, G, d_k]
        copied["decoder"]["layers"]["self_attention"][name]["kernel"] = jnp.repeat(kernel, H // 2, axis=2)
    np.testing.assert_allclose(build_model(grouped).apply({"params": params}, ids),
                               build_model(plain).apply({"params": copied}, ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the KV cache

LLAMA_SMALL = cfg(positional="rope", norm="rmsnorm", activation="swiglu", num_kv_heads=1, tie_embeddings=False,
                  init_std=0.3, rope_theta=100.0)
EOT = 0  # an id these prompts' greedy continuations never reach (asserted)


def test_kv_cache_holds_the_kv_heads_and_decodes_like_the_full_pass():
    model, params = build_model(LLAMA_SMALL), init_params(LLAMA_SMALL, jax.random.key(1))
    cache = init_cache(model, batch=2, cache_len=16)["decoder"]["layers"]["self_attention"]
    assert cache["cached_key"].shape == (2, 2, 16, 1, D // H)  # [layers, B, S, kv_heads, d_k]: H x smaller
    prompts = [[5, 9, 2, 7, 1, 3], [11, 4, 8]]
    out = generate(model, params, prompts, max_new_tokens=8, eot_id=EOT, sampling=Sampling(temperature=0.0))
    for prompt, row in zip(prompts, out.tokens):
        seq = list(prompt)
        for _ in range(8):
            logits = model.apply({"params": params}, jnp.asarray([seq]))
            seq.append(int(jnp.argmax(logits[0, -1])))
        assert EOT not in seq and list(row) == seq[len(prompt):]
    assert len(set(out.tokens[0].tolist())) > 1


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("changes, field, words", [
    (dict(num_kv_heads=3), "num_kv_heads", "must be a multiple of it"),
    (dict(num_kv_heads=0), "num_kv_heads", "positive integer"),
    (dict(positional="rope", d_model=36, num_heads=4), "positional", "must be even"),
    (dict(rope_scaling="yarn", positional="rope"), "rope_scaling", "choose one of none, llama3"),
    (dict(rope_scaling="llama3"), "rope_scaling", "set positional=rope"),
    (dict(rope_theta=1.0), "rope_theta", "above 1"),
    (dict(norm="rms"), "norm", "Did you mean 'rmsnorm'"),
    (dict(positional="rope", rope_scaling="llama3", rope_high_freq_factor=0.5), "rope_high_freq_factor", "exceed"),
])
def test_bad_llama_options_name_the_field(changes, field, words):
    with pytest.raises(ConfigError) as err:
        cfg(**changes)
    assert str(err.value).startswith(f"{field}=") and words in str(err.value)


def test_the_kv_cache_memory_check_counts_kv_heads_only():
    """llama3-70b, one 8192-token row in bfloat16: 80 layers x 8192 slots x (K + V) x 8 heads x 128
    x 2 bytes = 2.5 GiB, 1/8 of what 64 K/V heads would hold (checked without allocating)."""
    from matrixmagic.configs import get_preset
    from matrixmagic.train.planning.fit import generation_parts

    grouped = get_preset("llama3-70b").model.replace(dtype="bfloat16")
    cache = generation_parts(grouped, batch=1, prompt_len=16, cache_len=8192)["KV cache"]
    assert cache == 80 * 8192 * 2 * 8 * 128 * 2 == 2.5 * 2**30
    full = generation_parts(grouped.replace(num_kv_heads=None), batch=1, prompt_len=16, cache_len=8192)["KV cache"]
    assert full == 8 * cache
