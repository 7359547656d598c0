"""Weight-decay mask, AdamW + clipping, and exact gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from matrixmagic.train.optimizer import accumulate_gradients, make_optimizer, weight_decay_mask

L, D, H, K, V = 3, 8, 2, 4, 11


def _realistic_params():
    rng = np.random.default_rng(0)
    n = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    layers = {
        "attn": {
            "query": {"kernel": n(L, D, H, K), "bias": n(L, H, K)},
            "out": {"kernel": n(L, H, K, D), "bias": n(L, D)},
        },
        "ln_1": {"scale": n(L, D), "bias": n(L, D)},
        "mlp": {"wi": {"kernel": n(L, D, 4 * D), "bias": n(L, 4 * D)}},
    }
    return {
        "token_embed": {"embedding": n(V, D)},
        "pos_embed": {"embedding": n(16, D)},
        "type_embed": {"embedding": n(2, D)},
        "layers": layers,  # stacked by nn.scan: leading [L] axis everywhere
        "final_ln": {"scale": n(D), "bias": n(D)},
        "lm_head": {"kernel": n(D, V), "bias": n(V)},
    }


def _expected_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key in ("kernel", "embedding"), params
    )


def test_mask_decides_by_name_not_ndim():
    params = _realistic_params()
    mask = weight_decay_mask(params)
    assert mask == _expected_mask(params)
    assert mask["layers"]["attn"]["out"]["bias"] is False  # 2-D [L, d] bias
    assert mask["layers"]["ln_1"]["scale"] is False
    assert mask["layers"]["attn"]["query"]["kernel"] is True  # 4-D kernel
    assert mask["token_embed"]["embedding"] is True
    assert mask["final_ln"]["bias"] is False


def test_mask_rejects_unknown_leaf_names_with_path():
    params = {"block": {"mystery": jnp.ones(3), "kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match=r"\['block'\]\['mystery'\]"):
        weight_decay_mask(params)


def test_adamw_zero_grad_step_decays_only_masked_in_leaves():
    params = _realistic_params()
    lr, wd = 0.1, 0.1
    tx = make_optimizer(learning_rate=lr, weight_decay=wd)
    state = tx.init(params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, state, params)
    new = optax.apply_updates(params, updates)
    for decayed, p, q in zip(
        jax.tree_util.tree_leaves(weight_decay_mask(params)),
        jax.tree_util.tree_leaves(params),
        jax.tree_util.tree_leaves(new),
    ):
        if decayed:
            np.testing.assert_allclose(q, p * (1 - lr * wd), rtol=1e-6)
        else:
            np.testing.assert_array_equal(q, p)


def _adam_mu_norm(state):
    return float(optax.tree.norm(optax.tree_utils.tree_get(state, "mu")))


def test_clipping_to_global_norm_one():
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
    grads = jax.tree_util.tree_map(
        lambda p: 1e6 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params
    )
    unit = jax.tree_util.tree_map(lambda g: g / optax.tree.norm(grads), grads)
    b1 = 0.9
    tx = make_optimizer(learning_rate=1e-3, eps=1.0)  # large eps: update depends on scale
    upd_huge, state = tx.update(grads, tx.init(params), params)
    upd_unit, _ = tx.update(unit, tx.init(params), params)
    np.testing.assert_allclose(_adam_mu_norm(state), (1 - b1) * 1.0, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(upd_huge), jax.tree_util.tree_leaves(upd_unit)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    # Control: without clipping the first moment carries the huge norm.
    tx_off = make_optimizer(learning_rate=1e-3, clip_norm=None)
    _, state_off = tx_off.update(grads, tx_off.init(params), params)
    assert _adam_mu_norm(state_off) > 1e4


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(learning_rate=1e-3, b2=1.0), "b2"),
        (dict(learning_rate=1e-3, b1=-0.1), "b1"),
        (dict(learning_rate=1e-3, eps=0.0), "eps"),
        (dict(learning_rate=1e-3, weight_decay=-0.1), "weight_decay"),
        (dict(learning_rate=1e-3, clip_norm=0.0), "clip_norm"),
    ],
)
def test_make_optimizer_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_optimizer(**kwargs)


def test_make_optimizer_accepts_schedule():
    schedule = optax.linear_schedule(0.0, 1e-3, 10)
    params = {"d": {"kernel": jnp.ones((2, 2))}}
    tx = make_optimizer(learning_rate=schedule)
    updates, _ = tx.update(params, tx.init(params), params)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)


# --- gradient accumulation -------------------------------------------------

B, T, F = 8, 5, 6


def _model_and_batch():
    k = jax.random.split(jax.random.PRNGKey(42), 5)
    params = {
        "hidden": {"kernel": 0.5 * jax.random.normal(k[0], (F, 16)), "bias": jnp.zeros(16)},
        "out": {"kernel": 0.5 * jax.random.normal(k[1], (16, V)), "bias": jnp.zeros(V)},
    }
    # Non-uniform mask: row b keeps its first (b % T) + 1 tokens, and row 3 none,
    # so every microbatch split (k = 2, 4, 8) has unequal token counts.
    lengths = np.array([(b % T) + 1 for b in range(B)])
    lengths[3] = 0
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    batch = {
        "inputs": jax.random.normal(k[2], (B, T, F)),
        "targets": jax.random.randint(k[3], (B, T), 0, V),
        "loss_mask": jnp.asarray(mask),
    }
    return params, batch


def _loss_fn(params, batch, rng, *, report_weight=True):
    h = jnp.tanh(batch["inputs"] @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    if rng is not None:  # dropout-like noise, to exercise rng plumbing
        h = h * jax.random.bernoulli(rng, 0.9, h.shape) / 0.9
    logits = h @ params["out"]["kernel"] + params["out"]["bias"]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    weight = mask.sum()
    loss = (nll * mask).sum() / jnp.maximum(weight, 1.0)
    correct = (logits.argmax(-1) == batch["targets"]) * mask
    aux = {"accuracy": correct.sum() / jnp.maximum(weight, 1.0)}
    if report_weight:
        aux["weight"] = weight
    return loss, aux


def _assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, **tol)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_accumulation_equals_full_batch_token_weighted(k):
    params, batch = _model_and_batch()
    counts = batch["loss_mask"].reshape(B // k, k, T).sum(axis=(0, 2))  # strided split
    assert len(set(np.asarray(counts).tolist())) > 1, "test must exercise unequal token counts"
    (full_loss, full_aux), full_grads = jax.value_and_grad(_loss_fn, has_aux=True)(params, batch, None)
    loss, grads, aux = jax.jit(accumulate_gradients, static_argnums=(0, 3))(_loss_fn, params, batch, k)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
    _assert_trees_close(grads, full_grads, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux["accuracy"], full_aux["accuracy"], rtol=1e-5)
    np.testing.assert_allclose(aux["weight"], full_aux["weight"])


def test_equal_weighting_without_weight_is_inexact():
    """Control: dropping aux['weight'] gives the mean of microbatch means."""
    params, batch = _model_and_batch()
    unweighted = lambda p, b, r: _loss_fn(p, b, r, report_weight=False)
    full_loss, _ = _loss_fn(params, batch, None)
    loss, _, aux = accumulate_gradients(unweighted, params, batch, 4)
    assert "weight" not in aux
    assert abs(float(loss) - float(full_loss)) > 1e-3


def test_single_microbatch_is_plain_grad_without_scan():
    params, batch = _model_and_batch()
    rng = jax.random.PRNGKey(7)
    (ref_loss, ref_aux), ref_grads = jax.value_and_grad(_loss_fn, has_aux=True)(params, batch, rng)
    loss, grads, aux = accumulate_gradients(_loss_fn, params, batch, 1, rng)
    np.testing.assert_array_equal(loss, ref_loss)
    _assert_trees_close(grads, ref_grads, rtol=0, atol=0)
    assert aux.keys() == ref_aux.keys()
    jaxpr = lambda n: str(jax.make_jaxpr(lambda p, b: accumulate_gradients(_loss_fn, p, b, n, rng))(params, batch))
    assert "scan" not in jaxpr(1)
    assert "scan" in jaxpr(4)


def test_accumulation_with_rng_runs_and_is_deterministic():
    params, batch = _model_and_batch()
    rng = jax.random.PRNGKey(3)
    out1 = accumulate_gradients(_loss_fn, params, batch, 4, rng)
    out2 = accumulate_gradients(_loss_fn, params, batch, 4, rng)
    _assert_trees_close(out1, out2, rtol=0, atol=0)
    assert np.isfinite(float(out1[0]))


def test_accumulation_bad_arguments():
    params, batch = _model_and_batch()
    with pytest.raises(ValueError, match=r"num_microbatches=3"):
        accumulate_gradients(_loss_fn, params, batch, 3)
    with pytest.raises(ValueError, match=r"num_microbatches=0"):
        accumulate_gradients(_loss_fn, params, batch, 0)


def test_inactive_microbatches_are_skipped_not_computed():
    """The batch ramp's flags: an inactive microbatch is not run at all. Its rows here carry a
    nonzero loss_mask on purpose, so computing it would change the result; the result must
    equal the plain gradient over the active microbatches' rows alone."""
    params, batch = _model_and_batch()
    batch = {**batch, "loss_mask": jnp.ones((B, T), jnp.float32).at[0, 2:].set(0.0)}
    k, active = 4, jnp.array([True, False, True, False])
    rows = np.arange(B)[np.isin(np.arange(B) % k, [0, 2])]  # microbatch i holds rows i, i + k, ...
    subset = jax.tree_util.tree_map(lambda x: x[rows], batch)
    (ref_loss, _), ref_grads = jax.value_and_grad(_loss_fn, has_aux=True)(params, subset, None)
    loss, grads, aux = jax.jit(accumulate_gradients, static_argnums=(0, 3))(_loss_fn, params, batch, k, None, active)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    _assert_trees_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux["weight"], float(subset["loss_mask"].sum()))
    all_on = accumulate_gradients(_loss_fn, params, batch, k, None, jnp.ones(k, bool))
    plain = accumulate_gradients(_loss_fn, params, batch, k)
    _assert_trees_close(all_on, plain, rtol=1e-6, atol=1e-7)
    jaxpr = lambda flags: str(jax.make_jaxpr(lambda p, b: accumulate_gradients(_loss_fn, p, b, k, None, flags))(
        params, batch))
    assert "cond" in jaxpr(active) and "cond" not in jaxpr(None), "no flags: the scan compiles as before"
