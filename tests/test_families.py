"""The three families end to end: masks as behaviour, dropout, scan vs unrolled, remat.

Tiny shapes throughout; weights are large (std 0.3) so that a leak through a mask
would move the outputs by far more than the tolerance. Every forward pass goes
through one jitted function per (config, deterministic) that also returns the sown
intermediates, and inputs come in two structures ("plain": tokens only, the
default None-mask path; "packed": with segment ids and positions), so the file
compiles a handful of programs rather than one per call.
"""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matrixmagic.configs import ModelConfig
from matrixmagic.model import build_model, init_params, masks
from matrixmagic.model.layers import DecoderLayer
from matrixmagic.model.stack import LayerStack

B, T, V = 2, 8, 32
# Dropout is on in the config: every test but the dropout one runs deterministic=True,
# so each of them also checks that evaluation ignores the dropout rates.
TINY = dict(vocab_size=V, d_model=16, num_heads=2, num_layers=2, d_ff=32, max_len=16,
            dropout_rate=0.2, attention_dropout_rate=0.1, init_std=0.3)
FAMILY_KW = {
    "decoder": dict(family="decoder", activation="gelu_tanh", norm_position="pre", positional="learned"),
    "encoder": dict(family="encoder", activation="gelu", norm_position="post", positional="learned",
                    type_vocab_size=2, layer_norm_eps=1e-12),
    "encoder_decoder": dict(family="encoder_decoder", activation="relu", norm_position="post",
                            positional="sinusoidal", scale_embeddings=True),
}
FAMILIES = tuple(FAMILY_KW)


def config(family: str, **kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **FAMILY_KW[family], **kw})


def tokens(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, V, size=(B, T)).astype(np.int32)


def changed(ids: np.ndarray, where) -> np.ndarray:
    """A copy of ids with every token selected by `where` replaced by a different one."""
    out = ids.copy()
    out[where] = ids[where] % (V - 1) + 1  # 1..V-1, never equal to the old id
    assert (out[where] != ids[where]).all()
    return out


def plain(family: str, ids, src=None) -> dict:
    if family == "encoder_decoder":
        return {"encoder_inputs": jnp.asarray(ids if src is None else src), "decoder_inputs": jnp.asarray(ids)}
    return {"inputs": jnp.asarray(ids)}


def packed(family: str, ids, segments, positions, src=None, src_segments=None, src_positions=None) -> dict:
    seg, pos = jnp.asarray(segments, jnp.int32), jnp.asarray(positions, jnp.int32)
    if family == "encoder_decoder":
        src_seg = seg if src_segments is None else jnp.asarray(src_segments, jnp.int32)
        src_pos = np.broadcast_to(np.arange(T), (B, T)) if src_positions is None else src_positions
        return {"encoder_inputs": jnp.asarray(ids if src is None else src), "decoder_inputs": jnp.asarray(ids),
                "encoder_segment_ids": src_seg, "decoder_segment_ids": seg,
                "encoder_positions": jnp.asarray(src_pos, jnp.int32), "decoder_positions": pos}
    return {"inputs": jnp.asarray(ids), "segment_ids": seg, "positions": pos}


@functools.cache
def params_for(cfg: ModelConfig):
    """The model's real parameter tree (shapes from `init` under eval_shape), filled with
    seeded random values: compiling `init` (one threefry per weight) costs seconds on CPU."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if str(path[-1].key) == "scale":  # LayerNorm gains near 1
            return jnp.asarray(1.0 + rng.normal(0.0, 0.1, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.normal(0.0, cfg.init_std, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def _compiled(cfg: ModelConfig, deterministic: bool):
    model = build_model(cfg)
    return jax.jit(lambda params, inputs, rng: model.apply(
        {"params": params}, **inputs, deterministic=deterministic, rngs={"dropout": rng},
        mutable=("intermediates",)))


def run(cfg, inputs, params=None, seed=0, deterministic=True):
    """-> (logits as numpy, sown intermediates)."""
    params = params_for(cfg) if params is None else params
    # rbg: dropout's bernoulli compiles in a fraction of threefry's time on CPU
    logits, state = _compiled(cfg, deterministic)(params, inputs, jax.random.key(seed, impl="rbg"))
    return np.asarray(logits), state["intermediates"]


def attention_weights(intermediates, stack: str = "", kind: str = "self_attention") -> np.ndarray:
    """The softmax weights [L, B, H, Tq, Tk] of one scanned stack ("": the only one)."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if "weights" in keys and kind in keys and (not stack or stack in keys):
            found.append(np.asarray(leaf))
    assert len(found) == 1, f"expected one {stack}/{kind} weights, found {len(found)}"
    return found[0]


def logits_change(a, b) -> float:
    return float(np.abs(a - b).max())


# ---------------------------------------------------------------- causal masking

@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
@pytest.mark.parametrize("t", [0, 3, T - 2])
def test_causal_future_tokens_do_not_change_past_outputs(family, t):
    cfg = config(family)
    a, src = tokens(1), tokens(2)  # encoder-decoder: the same source for both runs
    b = changed(a, (slice(None), slice(t + 1, None)))  # every token after position t
    la, _ = run(cfg, plain(family, a, src))
    lb, _ = run(cfg, plain(family, b, src))
    np.testing.assert_allclose(la[:, :t + 1], lb[:, :t + 1], rtol=0, atol=1e-6)
    assert logits_change(la[:, t + 1:], lb[:, t + 1:]) > 1e-3  # later positions did see the change


def test_encoder_is_bidirectional():
    """Control for the causal test: BERT's first position does see the last token."""
    cfg = config("encoder")
    a = tokens(1)
    la, _ = run(cfg, plain("encoder", a))
    lb, _ = run(cfg, plain("encoder", changed(a, (slice(None), -1))))
    assert logits_change(la[:, 0], lb[:, 0]) > 1e-3


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_causal_attention_weights_are_lower_triangular(family):
    cfg = config(family)
    _, inter = run(cfg, plain(family, tokens(3)))
    w = attention_weights(inter, "decoder")
    assert w.shape == (cfg.num_layers, B, cfg.num_heads, T, T)
    upper = np.triu(np.ones((T, T), bool), 1)
    assert (w[..., upper] == 0.0).all()
    assert (w[..., ~upper] > 0.0).all()
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)


# ---------------------------------------------------------------- padding

def test_padding_keys_get_exactly_zero_weight_and_do_not_leak():
    cfg = config("encoder")
    ids = tokens(4)
    seg = np.array([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]], np.int32)  # 0 = padding
    pos = np.broadcast_to(np.arange(T), (B, T))
    real = seg > 0
    la, inter = run(cfg, packed("encoder", ids, seg, pos))
    w = attention_weights(inter, "encoder")  # [L, B, H, Tq, Tk]
    for b in range(B):
        at_real_queries = w[:, b][:, :, real[b]]  # [L, H, real q, Tk]
        assert (at_real_queries[..., ~real[b]] == 0.0).all()
        assert (at_real_queries[..., real[b]] > 0.0).all()
    # whatever sits in the padding slots, real positions are unchanged
    lb, _ = run(cfg, packed("encoder", changed(ids, ~real), seg, pos))
    np.testing.assert_allclose(la[real], lb[real], rtol=0, atol=1e-6)
    assert logits_change(la[~real], lb[~real]) > 1e-3


def test_encoder_decoder_source_padding_is_invisible_to_decoder():
    cfg = config("encoder_decoder")
    src, tgt = tokens(5), tokens(6)
    dec_seg, pos = np.ones((B, T), np.int32), np.broadcast_to(np.arange(T), (B, T))
    enc_seg = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], np.int32)
    other = changed(src, enc_seg == 0)
    la, inter = run(cfg, packed("encoder_decoder", tgt, dec_seg, pos, src, enc_seg))
    lb, _ = run(cfg, packed("encoder_decoder", tgt, dec_seg, pos, other, enc_seg))
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-6)
    cross = attention_weights(inter, "decoder", "cross_attention")  # [L, B, H, T, S]
    assert cross.shape == (cfg.num_layers, B, cfg.num_heads, T, T)
    for b in range(B):
        assert (cross[:, b][..., enc_seg[b] == 0] == 0.0).all()
    # control: with every source position marked real, the decoder does see those tokens
    everything = np.ones((B, T), np.int32)
    lc, _ = run(cfg, packed("encoder_decoder", tgt, dec_seg, pos, src, everything))
    ld, _ = run(cfg, packed("encoder_decoder", tgt, dec_seg, pos, other, everything))
    assert logits_change(lc, ld) > 1e-3


# ---------------------------------------------------------------- packed documents

# row 0: doc A (3 tokens), doc B (4 tokens), one pad slot; row 1: doc B of row 0 alone, then padding
PACKED = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0, 0, 0]], np.int32)
PACKED_POS = np.array([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 0, 0, 0, 0]], np.int32)


def _packed_tokens(seed):
    ids = tokens(seed)
    ids[1, :4] = ids[0, 3:7]  # row 1 holds row 0's doc B on its own
    return ids


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_segment_ids_block_attention_across_documents(family):
    cfg = config(family)
    ids = _packed_tokens(7)
    la, inter = run(cfg, packed(family, ids, PACKED, PACKED_POS))
    w = attention_weights(inter)  # [L, B, H, T, T]
    for b in range(B):
        seg = PACKED[b]
        other_doc = (seg[:, None] != seg[None, :]) & (seg[:, None] > 0)  # real query, key of another doc / pad
        assert other_doc.any() and (w[:, b][..., other_doc] == 0.0).all()
    # change every token of doc B: doc A's outputs do not move
    doc_a, doc_b = np.zeros((B, T), bool), np.zeros((B, T), bool)
    doc_a[0], doc_b[0] = PACKED[0] == 1, PACKED[0] == 2
    lb, _ = run(cfg, packed(family, changed(ids, doc_b), PACKED, PACKED_POS))
    np.testing.assert_allclose(la[doc_a], lb[doc_a], rtol=0, atol=1e-6)
    assert logits_change(la[doc_b], lb[doc_b]) > 1e-3
    # doc B, restarted at position 0, equals doc B run on its own
    np.testing.assert_allclose(la[0, 3:7], la[1, :4], rtol=1e-5, atol=1e-5)


def test_encoder_decoder_packed_documents_are_independent():
    cfg = config("encoder_decoder")
    src, tgt = tokens(8), _packed_tokens(9)
    src_seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 0, 0, 0, 0, 0]], np.int32)
    src_pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 0, 0, 0, 0, 0]], np.int32)
    src[1, :3] = src[0, 4:7]  # row 1: row 0's doc B (source and target) alone
    kw = dict(segments=PACKED, positions=PACKED_POS, src_segments=src_seg, src_positions=src_pos)
    la, _ = run(cfg, packed("encoder_decoder", tgt, src=src, **kw))
    doc_b_src, doc_b_tgt = np.zeros((B, T), bool), np.zeros((B, T), bool)
    doc_b_src[0], doc_b_tgt[0] = src_seg[0] == 2, PACKED[0] == 2
    lb, _ = run(cfg, packed("encoder_decoder", changed(tgt, doc_b_tgt), src=changed(src, doc_b_src), **kw))
    np.testing.assert_allclose(la[0, :3], lb[0, :3], rtol=0, atol=1e-6)  # doc A unchanged
    assert logits_change(la[0, 3:7], lb[0, 3:7]) > 1e-3
    # doc A's decoder does read doc A's source
    doc_a_src = np.zeros((B, T), bool)
    doc_a_src[0] = src_seg[0] == 1
    lc, _ = run(cfg, packed("encoder_decoder", tgt, src=changed(src, doc_a_src), **kw))
    assert logits_change(la[0, :3], lc[0, :3]) > 1e-3
    # doc B packed after doc A gives the same logits as doc B alone
    np.testing.assert_allclose(la[0, 3:7], la[1, :4], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- GPT forward vs numpy

def _ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _mha(p, x, causal):
    n_heads = p["query"]["kernel"].shape[1]
    t = x.shape[1]
    outs = []
    for h in range(n_heads):
        q, k, v = (x @ p[n]["kernel"][:, h] + p[n]["bias"][h] for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
        s = np.where(np.tril(np.ones((t, t), bool)) if causal else True, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        outs.append((a / a.sum(-1, keepdims=True)) @ v)
    heads = np.concatenate(outs, -1)
    return heads @ p["output"]["kernel"].reshape(-1, x.shape[-1]) + p["output"]["bias"]


def test_gpt_forward_matches_numpy():
    """Token + position embedding, pre-LN causal layers, final LN, tied logits (GPT-2)."""
    cfg = config("decoder")
    ids = tokens(10)
    got, _ = run(cfg, plain("decoder", ids))
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params_for(cfg))
    table = p["token_embedding"]["embedding"]
    x = table[ids] + p["position_embedding"]["embedding"][np.arange(T)]
    gelu = lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    for i in range(cfg.num_layers):
        lp = jax.tree_util.tree_map(lambda a, i=i: a[i], p["decoder"]["layers"])
        x = x + _mha(lp["self_attention"], _ln(x, lp["self_attention_norm"], cfg.layer_norm_eps), causal=True)
        h = _ln(x, lp["feed_forward_norm"], cfg.layer_norm_eps)
        ff = lp["feed_forward"]
        x = x + gelu(h @ ff["hidden"]["kernel"] + ff["hidden"]["bias"]) @ ff["output"]["kernel"] + ff["output"]["bias"]
    logits = _ln(x, p["final_norm"], cfg.layer_norm_eps) @ table.T
    np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- dropout

@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_off_when_deterministic_and_on_otherwise(family):
    cfg = config(family)
    assert cfg.dropout_rate > 0 and cfg.attention_dropout_rate > 0
    inputs = plain(family, tokens(11))
    logits = lambda det, seed: run(cfg, inputs, seed=seed, deterministic=det)[0]
    np.testing.assert_array_equal(logits(True, 1), logits(True, 2))
    train_1, train_2 = logits(False, 1), logits(False, 2)
    assert logits_change(train_1, train_2) > 1e-3
    np.testing.assert_array_equal(train_1, logits(False, 1))  # same rng, same mask
    assert logits_change(train_1, logits(True, 1)) > 1e-3
    # evaluation is the model's default
    assert inspect.signature(build_model(cfg).__call__).parameters["deterministic"].default is True


# ---------------------------------------------------------------- scan vs unrolled, remat

def unroll(tree, num_layers: int):
    """Stacked [L, ...] params under `layers` -> layer_0 .. layer_{L-1}."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "layers":
            for i in range(num_layers):
                out[f"layer_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], value)
        else:
            out[key] = unroll(value, num_layers)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_scanned_and_unrolled_stacks_agree(family):
    scanned_cfg = config(family)
    unrolled_cfg = scanned_cfg.replace(scan_layers=False)
    if family == "decoder":  # real `init` once (3 s of compile): nn.scan must give each layer its own draw
        scanned = jax.jit(lambda key: init_params(scanned_cfg, key))(jax.random.key(0, impl="rbg"))
    else:
        scanned = params_for(scanned_cfg)
    converted = unroll(scanned, scanned_cfg.num_layers)
    # the conversion lands on exactly the tree the unrolled model builds
    reference = jax.eval_shape(lambda: init_params(unrolled_cfg, jax.random.key(0)))
    assert jax.tree_util.tree_structure(converted) == jax.tree_util.tree_structure(reference)
    for a, b in zip(jax.tree_util.tree_leaves(converted), jax.tree_util.tree_leaves(reference)):
        assert a.shape == b.shape
    inputs = plain(family, tokens(12))
    la, _ = run(scanned_cfg, inputs, scanned)
    lb, _ = run(unrolled_cfg, inputs, converted)
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)
    # the layers really differ, so a conversion that repeated or swapped layers would fail
    stacks = [v for k, v in scanned.items() if isinstance(v, dict) and "layers" in v]
    assert len(stacks) == (2 if family == "encoder_decoder" else 1)
    for stack in stacks:
        for path, a in jax.tree_util.tree_leaves_with_path(stack["layers"]):
            assert a.shape[0] == scanned_cfg.num_layers
            if path[-1].key == "kernel":  # random at init (biases start at 0, LayerNorm scales at 1)
                assert not np.allclose(a[0], a[1]), jax.tree_util.keystr(path)


def _assert_same_grads(g0, g1):
    flat0, flat1 = jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves(g1)
    assert len(flat0) == len(flat1)
    # recomputation may reorder float sums; some gradients (e.g. the key bias, to which the
    # softmax is invariant) are exactly zero in theory, so the tolerance is set by the largest
    scale = max(float(np.abs(np.asarray(a)).max()) for _, a in flat0)
    for (path, a), b in zip(flat0, flat1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    assert scale > 1e-2


def _has_remat(fn, *args) -> bool:
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    return "checkpoint" in jaxpr or "remat" in jaxpr


@functools.cache
def _stack_grads(scan: bool, policy: str):
    """Gradients wrt params, decoder input and encoder output of a stack of decoder layers
    with cross attention (the richest layer), under one remat policy."""
    # unrolled: one layer is enough to exercise nn.remat outside scan, and compiles in half the time
    cfg = config("encoder_decoder", scan_layers=scan, remat_policy=policy, num_layers=2 if scan else 1)
    stack = LayerStack(cfg, DecoderLayer, layer_kwargs=(("cross_attention", True),))
    rng = np.random.default_rng(21)
    x, encoded, probe = (jnp.asarray(rng.normal(size=(B, n, cfg.d_model)), jnp.float32) for n in (T, T - 2, T))
    self_mask = masks.causal_mask(T)
    cross_mask = masks.cross_attention_mask(None, jnp.asarray([[1] * (T - 3) + [0], [1] * (T - 2)]))
    scanned = params_for(cfg.replace(scan_layers=True, remat_policy="none"))["decoder"]
    params = {"params": scanned if scan else unroll(scanned, cfg.num_layers)}

    def loss(p, x, encoded):
        return (stack.apply(p, x, self_mask, encoded, cross_mask) * probe).sum()

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return fn(params, x, encoded), (policy == "none" or _has_remat(fn, params, x, encoded))


@pytest.mark.parametrize("scan,policy", [(True, "full"), (True, "save_dots"), (True, "save_dots_no_batch"),
                                         (False, "full")])
def test_remat_stack_gives_the_same_gradients(scan, policy):
    reference, _ = _stack_grads(scan, "none")
    grads, rematerialized = _stack_grads(scan, policy)
    assert rematerialized  # the policy really wraps the layers
    _assert_same_grads(reference, grads)
