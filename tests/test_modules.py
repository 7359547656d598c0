"""Each model/ module against an independent numpy implementation of its formula.

The references below never call the module's own helpers: they take the
parameters `init` created (randomized, so biases and norm scales matter) and
recompute the paper's formula in float64 numpy.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from matrixmagic.configs import ModelConfig
from matrixmagic.model import masks
from matrixmagic.model.add_norm import LayerNorm, add_and_norm
from matrixmagic.model.attention import MultiHeadAttention
from matrixmagic.model.dropout import Dropout
from matrixmagic.model.embeddings import TokenEmbedding
from matrixmagic.model.feed_forward import FeedForward
from matrixmagic.model.layers import DecoderLayer, EncoderLayer
from matrixmagic.model.linear import Linear
from matrixmagic.model.output_head import OutputHead, vocab_softmax
from matrixmagic.model.positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding

B, T, D, H, F, V = 2, 6, 16, 4, 32, 24


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=D, num_heads=H, num_layers=2, d_ff=F, max_len=32,
                dropout_rate=0.0, attention_dropout_rate=0.0)
    return ModelConfig(**{**base, **kw})


def randomize(params, seed: int = 0, scale: float = 0.3):
    """Replace every leaf by random normal values, so zero biases / unit scales can't hide bugs."""
    params = nn.meta.unbox(params)
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        tree, [jnp.asarray(rng.normal(0.0, scale, leaf.shape), jnp.float32) for leaf in leaves])


def f64(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def randn(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------- numpy references

def np_layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_gelu_exact(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


NP_ACTIVATIONS = {"relu": lambda x: np.maximum(x, 0.0), "gelu": np_gelu_exact, "gelu_tanh": np_gelu_tanh}


def np_ffn(p, x, activation):
    h = NP_ACTIVATIONS[activation](x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return h @ p["output"]["kernel"] + p["output"]["bias"]


def np_attention(p, xq, xkv, allowed):
    """Vaswani 3.2: per head Q K^T / sqrt(d_k), mask, softmax, A V; concat; W_o.

    allowed: bool [B, Tq, Tk] or None. Returns every intermediate the module sows.
    """
    p = f64(p)
    xq, xkv = np.asarray(xq, np.float64), np.asarray(xkv, np.float64)
    n_heads, d_k = p["query"]["kernel"].shape[1:]
    if allowed is None:
        allowed = np.ones((xq.shape[0], xq.shape[1], xkv.shape[1]), bool)
    qs, ks, vs, scores, weights, outs = [], [], [], [], [], []
    for h in range(n_heads):
        q = xq @ p["query"]["kernel"][:, h, :] + p["query"]["bias"][h]
        k = xkv @ p["key"]["kernel"][:, h, :] + p["key"]["bias"][h]
        v = xkv @ p["value"]["kernel"][:, h, :] + p["value"]["bias"][h]
        s = np.einsum("bqd,bkd->bqk", q, k) / math.sqrt(d_k)
        e = np.where(allowed, np.exp(s - np.where(allowed, s, -np.inf).max(-1, keepdims=True)), 0.0)
        a = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)  # all-masked rows: compared nowhere
        qs.append(q), ks.append(k), vs.append(v), scores.append(s), weights.append(a)
        outs.append(a @ v)
    concat = np.concatenate(outs, axis=-1)  # [B, Tq, H * d_k], head 0 first
    w_o = np.concatenate([p["output"]["kernel"][h] for h in range(n_heads)], axis=0)
    return {
        "q": np.stack(qs, 2), "k": np.stack(ks, 2), "v": np.stack(vs, 2),
        "scores": np.stack(scores, 1), "weights": np.stack(weights, 1),
        "heads_concatenated": concat, "output_projection": concat @ w_o + p["output"]["bias"],
    }


# ---------------------------------------------------------------- attention

def _segments():
    # row 0: two documents and one padding slot; row 1: two documents, no padding
    return np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 2, 2]], np.int32)


def _key_valid():
    return np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)


SELF_MASKS = {
    # name: (mask the module gets, from model.masks; allowed[b, q, k] written from the definition)
    "none": (lambda: None, lambda: None),
    "causal": (lambda: masks.causal_mask(T),
               lambda: np.broadcast_to(np.arange(T)[None, :] <= np.arange(T)[:, None], (B, T, T))),
    "padding": (lambda: masks.padding_mask(jnp.asarray(_key_valid()), jnp.asarray(_key_valid())),
                lambda: np.broadcast_to(_key_valid()[:, None, :], (B, T, T))),
    "segment": (lambda: masks.segment_mask(jnp.asarray(_segments()), jnp.asarray(_segments())),
                lambda: (_segments()[:, :, None] == _segments()[:, None, :]) & (_segments()[:, None, :] > 0)),
    "causal_segment": (
        lambda: masks.self_attention_mask(jnp.asarray(_segments()), causal=True),
        lambda: ((_segments()[:, :, None] == _segments()[:, None, :]) & (_segments()[:, None, :] > 0)
                 & (np.arange(T)[None, :] <= np.arange(T)[:, None])[None])),
}


def _check_attention(config, xq, xkv, mask, allowed, seed=0):
    """Run the module (its own init, randomized) and compare every sown matrix with numpy.

    allowed [B, Tq, Tk] (None: all visible) says where the reference lets queries look.
    Queries with no visible key at all (padding queries of a segment mask) are not compared.
    """
    module = MultiHeadAttention(config)
    params = randomize(module.init(jax.random.key(0), xq, xkv, mask)["params"], seed)
    out, state = module.apply({"params": params}, xq, xkv, mask, mutable=["intermediates"])
    got = {name: np.asarray(value[0]) for name, value in state["intermediates"].items()}
    ref = np_attention(params, xq, xkv, allowed)
    if allowed is None:
        allowed = np.ones((xq.shape[0], xq.shape[1], xkv.shape[1]), bool)
    rows = allowed.any(-1)  # [B, Tq]
    assert set(got) == set(ref)
    tol = dict(rtol=2e-5, atol=2e-5)
    for name in ("q", "k", "v"):
        np.testing.assert_allclose(got[name], ref[name], **tol, err_msg=name)
    visible = np.broadcast_to(allowed[:, None], ref["scores"].shape)  # masked scores: -1e9 vs -inf
    np.testing.assert_allclose(got["scores"][visible], ref["scores"][visible], **tol, err_msg="scores")
    w_rows = np.broadcast_to(rows[:, None, :, None], ref["weights"].shape)
    np.testing.assert_allclose(got["weights"][w_rows], ref["weights"][w_rows], **tol, err_msg="weights")
    for name in ("heads_concatenated", "output_projection"):
        np.testing.assert_allclose(got[name][rows], ref[name][rows], **tol, err_msg=name)
    np.testing.assert_allclose(np.asarray(out)[rows], ref["output_projection"][rows], **tol)
    assert out.shape == xq.shape and np.isfinite(np.asarray(out)).all()
    assert got["weights"].dtype == np.float32  # softmax computed in float32
    return got, ref


@pytest.mark.parametrize("mask_type", sorted(SELF_MASKS))
def test_self_attention_matches_numpy(mask_type):
    make_mask, make_allowed = SELF_MASKS[mask_type]
    x = randn(1, B, T, D)
    got, _ = _check_attention(cfg(), x, x, make_mask(), make_allowed())
    allowed = make_allowed()
    if allowed is not None:  # masked keys get exactly zero weight at every real query
        masked = np.broadcast_to(~allowed[:, None], got["weights"].shape) & \
            np.broadcast_to(allowed.any(-1)[:, None, :, None], got["weights"].shape)
        assert masked.any()
        assert (got["weights"][masked] == 0.0).all()


@pytest.mark.parametrize("which", ["no_mask", "encoder_padding", "segments"])
def test_cross_attention_different_lengths_matches_numpy(which):
    tq, tk = 3, 5
    xq, xkv = randn(2, B, tq, D), randn(3, B, tk, D)
    enc_seg = np.array([[1, 1, 2, 0, 0], [1, 2, 2, 2, 2]], np.int32)
    dec_seg = np.array([[1, 2, 2], [2, 1, 2]], np.int32)
    if which == "no_mask":
        mask, allowed = masks.cross_attention_mask(None, None), None
        assert mask.dense(tq, tk) is None
    elif which == "encoder_padding":
        mask = masks.cross_attention_mask(None, jnp.asarray(enc_seg))
        allowed = np.broadcast_to((enc_seg > 0)[:, None, :], (B, tq, tk))
    else:
        mask = masks.cross_attention_mask(jnp.asarray(dec_seg), jnp.asarray(enc_seg))
        allowed = (dec_seg[:, :, None] == enc_seg[:, None, :]) & (enc_seg[:, None, :] > 0)
    got, _ = _check_attention(cfg(), xq, xkv, mask, allowed, seed=4)
    assert got["weights"].shape == (B, H, tq, tk)


def test_single_head_single_query_keeps_time_axis():
    """d_k = d_model and Tq = 1 (one decoding step of a 1-head model): the output
    projection must still see [B, 1, d], not collapse the time axis."""
    config = cfg(num_heads=1)
    xq, xkv = randn(5, 3, 1, D), randn(6, 3, 4, D)
    _check_attention(config, xq, xkv, None, None, seed=2)


def test_attention_weights_rows_sum_to_one_and_causal_upper_triangle_zero():
    x = randn(7, B, T, D)
    module = MultiHeadAttention(cfg())
    variables = module.init(jax.random.key(1), x, x, masks.causal_mask(T))
    _, state = module.apply(variables, x, x, masks.causal_mask(T), mutable=["intermediates"])
    w = np.asarray(state["intermediates"]["weights"][0])
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert (w[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0.0).all()


# ---------------------------------------------------------------- masks

def test_mask_functions_match_definitions():
    seg = _segments()
    causal = np.asarray(masks.causal_mask(T))
    assert causal.shape == (1, 1, T, T)
    np.testing.assert_array_equal(causal[0, 0], [[k <= q for k in range(T)] for q in range(T)])
    kv = _key_valid()
    pad = np.asarray(masks.padding_mask(jnp.asarray(kv), jnp.asarray(kv)))
    assert pad.shape == (B, 1, 1, T)
    np.testing.assert_array_equal(pad[:, 0, 0], kv)
    sm = np.asarray(masks.segment_mask(jnp.asarray(seg), jnp.asarray(seg)))
    expected = np.array([[[seg[b, q] == seg[b, k] and seg[b, k] > 0 for k in range(T)] for q in range(T)]
                         for b in range(B)])
    np.testing.assert_array_equal(sm[:, 0], expected)
    both = np.asarray(masks.self_attention_mask(jnp.asarray(seg), causal=True).dense(T, T))
    np.testing.assert_array_equal(both[:, 0], expected & causal[0, 0][None])
    assert masks.self_attention_mask(None, causal=False).dense(T, T) is None
    np.testing.assert_array_equal(np.asarray(masks.self_attention_mask(None, causal=True).dense(T, T)), causal)
    enc = np.array([[1, 1, 0], [1, 2, 2]], np.int32)  # decoding: key ids alone mean "every non-padding key"
    decoding = np.asarray(masks.cross_attention_mask(None, jnp.asarray(enc)).dense(2, 3))
    np.testing.assert_array_equal(np.broadcast_to(decoding, (2, 1, 2, 3))[:, 0],
                                  np.broadcast_to((enc > 0)[:, None, :], (2, 2, 3)))


# ---------------------------------------------------------------- positional encodings

def test_sinusoidal_matches_vaswani_3_5_elementwise():
    d, max_len = 10, 40
    config = cfg(d_model=d, num_heads=2, max_len=max_len, positional="sinusoidal")
    positions = jnp.asarray([[0, 1, 2, 3, 17, 39], [0, 1, 0, 1, 2, 5]], jnp.int32)  # packed rows restart
    module = SinusoidalPositionalEncoding(config)
    variables = module.init(jax.random.key(0), positions)
    assert not jax.tree_util.tree_leaves(variables)  # fixed table: no parameters
    got = np.asarray(module.apply(variables, positions))
    expected = np.zeros(positions.shape + (d,))
    for b in range(positions.shape[0]):
        for t in range(positions.shape[1]):
            pos = int(positions[b, t])
            for j in range(d):
                i = j // 2  # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(same)
                angle = pos / 10000 ** (2 * i / d)
                expected[b, t, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_learned_positions_are_a_table_lookup():
    config = cfg()
    positions = jnp.asarray([[0, 1, 2], [5, 0, 31]], jnp.int32)
    module = LearnedPositionalEmbedding(config)
    params = randomize(module.init(jax.random.key(0), positions)["params"])
    table = np.asarray(params["embedding"])
    assert table.shape == (config.max_len, D)
    np.testing.assert_array_equal(np.asarray(module.apply({"params": params}, positions)), table[np.asarray(positions)])


# ---------------------------------------------------------------- LayerNorm, add & norm

@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_layer_norm_matches_numpy(eps):
    config = cfg(layer_norm_eps=eps)
    x = randn(3, B, T, D) * 3.0 + 1.5
    module = LayerNorm(config)
    params = randomize(module.init(jax.random.key(0), x)["params"], scale=1.0)
    got = np.asarray(module.apply({"params": params}, x))
    p = f64(params)
    expected = np_layer_norm(x.astype(np.float64), p["scale"], p["bias"], eps)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["pre", "post"])
def test_add_and_norm_order_matches_numpy(order):
    config = cfg()
    x = randn(4, B, T, D)
    w = randn(5, D, D) * 0.5
    norm = LayerNorm(config)
    params = randomize(norm.init(jax.random.key(0), x)["params"], scale=1.0)
    bound = norm.bind({"params": params})
    got = np.asarray(add_and_norm(jnp.asarray(x), lambda h: jnp.tanh(h @ w), bound, lambda h: h, order))
    p, x64, w64 = f64(params), x.astype(np.float64), w.astype(np.float64)
    ln = lambda h: np_layer_norm(h, p["scale"], p["bias"], config.layer_norm_eps)
    pre = x64 + np.tanh(ln(x64) @ w64)  # GPT-2: x + sublayer(LN(x))
    post = ln(x64 + np.tanh(x64 @ w64))  # Vaswani / BERT: LN(x + sublayer(x))
    assert np.abs(pre - post).max() > 0.1  # the two orders are distinguishable here
    np.testing.assert_allclose(got, pre if order == "pre" else post, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["pre", "post"])
def test_encoder_layer_matches_numpy(order):
    """A whole encoder layer: attention + FFN, each wrapped by residual + LayerNorm in `order`."""
    config = cfg(norm_position=order, activation="relu")
    x = randn(6, B, T, D)
    seg = _segments()
    mask = masks.self_attention_mask(jnp.asarray(seg), causal=False)
    layer = EncoderLayer(config)
    params = randomize(layer.init(jax.random.key(0), x, mask)["params"], seed=3)
    got, _ = layer.apply({"params": params}, x, mask)
    p = f64(params)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    ln = lambda name, h: np_layer_norm(h, p[name]["scale"], p[name]["bias"], config.layer_norm_eps)
    attn = lambda h: np_attention(params["self_attention"], h, h, allowed)["output_projection"]
    ffn = lambda h: np_ffn(p["feed_forward"], h, "relu")
    h = x.astype(np.float64)
    if order == "pre":
        h = h + attn(ln("self_attention_norm", h))
        h = h + ffn(ln("feed_forward_norm", h))
    else:
        h = ln("self_attention_norm", h + attn(h))
        h = ln("feed_forward_norm", h + ffn(h))
    rows = allowed.any(-1)
    np.testing.assert_allclose(np.asarray(got)[rows], h[rows], rtol=1e-4, atol=1e-4)


def test_decoder_layer_with_cross_attention_matches_numpy():
    config = cfg(norm_position="post", activation="relu")
    x, enc = randn(8, B, 4, D), randn(9, B, 5, D)
    enc_seg = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    self_mask = masks.causal_mask(4)
    cross_mask = masks.cross_attention_mask(None, jnp.asarray(enc_seg))
    layer = DecoderLayer(config, cross_attention=True)
    params = randomize(layer.init(jax.random.key(0), x, self_mask, enc, cross_mask)["params"], seed=5)
    got, _ = layer.apply({"params": params}, x, self_mask, enc, cross_mask)
    p = f64(params)
    ln = lambda name, h: np_layer_norm(h, p[name]["scale"], p[name]["bias"], config.layer_norm_eps)
    causal = np.broadcast_to(np.tril(np.ones((4, 4), bool)), (B, 4, 4))
    cross_allowed = np.broadcast_to((enc_seg > 0)[:, None, :], (B, 4, 5))
    h = x.astype(np.float64)
    h = ln("self_attention_norm", h + np_attention(params["self_attention"], h, h, causal)["output_projection"])
    cross = np_attention(params["cross_attention"], h, enc, cross_allowed)["output_projection"]
    h = ln("cross_attention_norm", h + cross)
    h = ln("feed_forward_norm", h + np_ffn(p["feed_forward"], h, "relu"))
    np.testing.assert_allclose(np.asarray(got), h, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- feed-forward, linear

@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_feed_forward_matches_numpy(activation):
    config = cfg(activation=activation)
    x = randn(10, B, T, D)
    module = FeedForward(config)
    params = randomize(module.init(jax.random.key(0), x)["params"], scale=0.5)
    got, state = module.apply({"params": params}, x, mutable=["intermediates"])
    p = f64(params)
    pre_act = x.astype(np.float64) @ p["hidden"]["kernel"] + p["hidden"]["bias"]
    # The two GELUs differ by more than the tolerance on these inputs, so a swap would fail.
    assert np.abs(np_gelu_exact(pre_act) - np_gelu_tanh(pre_act)).max() > 1e-4
    np.testing.assert_allclose(np.asarray(state["intermediates"]["activated"][0]),
                               NP_ACTIVATIONS[activation](pre_act), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), np_ffn(p, x.astype(np.float64), activation), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_shape,out_shape,use_bias", [
    ((D,), (D * 2,), True), ((D,), (H, D // H), True), ((H, D // H), (D,), True), ((D,), (3,), False)])
def test_linear_matches_numpy(in_shape, out_shape, use_bias):
    axes = tuple(f"a{i}" for i in range(len(in_shape) + len(out_shape)))
    module = Linear(in_shape, out_shape, axes, use_bias)
    x = randn(11, B, T, *in_shape)
    params = randomize(module.init(jax.random.key(0), x)["params"])
    assert set(params) == ({"kernel", "bias"} if use_bias else {"kernel"})
    assert params["kernel"].shape == in_shape + out_shape
    got = np.asarray(module.apply({"params": params}, x))
    p = f64(params)
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    ref = x.reshape(B, T, n_in).astype(np.float64) @ p["kernel"].reshape(n_in, n_out)
    if use_bias:
        ref = ref + p["bias"].reshape(n_out)
    assert got.shape == (B, T) + out_shape
    np.testing.assert_allclose(got.reshape(B, T, n_out), ref, rtol=1e-5, atol=1e-5)
    if len(in_shape) > 1:  # heads already concatenated: same product from the flat input
        flat = np.asarray(module.apply({"params": params}, x.reshape(B, T, n_in)))
        np.testing.assert_allclose(flat.reshape(B, T, n_out), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- embeddings, output head

@pytest.mark.parametrize("scale", [False, True])
def test_token_embedding_lookup_and_tied_attend(scale):
    config = cfg(scale_embeddings=scale)
    ids = jnp.asarray([[0, 3, 3, 23], [7, 1, 0, 2]], jnp.int32)
    module = TokenEmbedding(config)
    params = randomize(module.init(jax.random.key(0), ids)["params"])
    table = np.asarray(params["embedding"], np.float64)
    assert table.shape == (V, D)
    got = np.asarray(module.apply({"params": params}, ids))
    np.testing.assert_allclose(got, table[np.asarray(ids)] * (math.sqrt(D) if scale else 1.0), rtol=1e-6)
    h = randn(12, B, 3, D)
    logits = np.asarray(module.apply({"params": params}, h, method=TokenEmbedding.attend))
    np.testing.assert_allclose(logits, h.astype(np.float64) @ table.T, rtol=1e-5, atol=1e-5)


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("tied", [True, False])
def test_output_head_masks_padding_vocab(tied):
    valid = 17
    config = cfg(num_valid_tokens=valid, tie_embeddings=tied)
    h = randn(13, B, 3, D)

    class Head(nn.Module):
        @nn.compact
        def __call__(self, x):
            emb = TokenEmbedding(config, name="emb") if tied else None
            if emb is not None:
                emb(jnp.zeros((1, 1), jnp.int32))  # create the table
            return OutputHead(config, emb, name="head")(x)

    module = Head()
    params = randomize(module.init(jax.random.key(0), h)["params"], scale=1.0)
    logits = np.asarray(module.apply({"params": params}, h))
    w = np.asarray(params["emb"]["embedding"], np.float64).T if tied else \
        np.asarray(params["head"]["unembedding"]["kernel"], np.float64)
    raw = h.astype(np.float64) @ w
    assert logits.dtype == np.float32 and logits.shape == (B, 3, V)
    np.testing.assert_allclose(logits[..., :valid], raw[..., :valid], rtol=1e-5, atol=1e-5)
    probs = np.asarray(vocab_softmax(jnp.asarray(logits)))
    assert probs[..., valid:].max() < 1e-30  # padding ids are never predicted
    np.testing.assert_allclose(probs[..., :valid], _np_softmax(raw[..., :valid]), rtol=1e-5, atol=1e-7)
    # control: unmasked, the same weights would give the padding ids real probability
    assert _np_softmax(raw)[..., valid:].max() > 1e-4
    if not tied:  # and with num_valid_tokens=None the head returns the raw logits
        free = OutputHead(config.replace(num_valid_tokens=None)).apply({"params": params["head"]}, h)
        np.testing.assert_allclose(np.asarray(free), raw, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- dropout

def test_dropout_module_statistics():
    rate, n = 0.3, 200_000
    x = jnp.ones((n,), jnp.float32)
    drop = Dropout(rate)
    y = np.asarray(drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}))
    kept = y != 0
    # kept fraction ~ 1 - p within 5 standard errors
    assert abs(kept.mean() - (1 - rate)) < 5 * math.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(y[kept], 1.0 / (1.0 - rate), rtol=1e-6)  # inverted dropout scaling
    assert abs(y.mean() - 1.0) < 5 * math.sqrt(rate / (1 - rate) / n)  # expectation preserved
    y2 = np.asarray(drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)}))
    assert (y2 != y).any()
    np.testing.assert_array_equal(np.asarray(drop.apply({}, x, deterministic=True)), np.ones(n))
    np.testing.assert_array_equal(np.asarray(Dropout(0.0).apply({}, x, deterministic=False)), np.ones(n))


def test_attention_dropout_only_when_not_deterministic():
    config = cfg(attention_dropout_rate=0.5)
    x = randn(14, B, T, D)
    params = MultiHeadAttention(config).init(jax.random.key(0), x, x)["params"]
    run = lambda det, seed: np.asarray(MultiHeadAttention(config, deterministic=det).apply(
        {"params": params}, x, x, rngs={"dropout": jax.random.key(seed)}))
    np.testing.assert_array_equal(run(True, 1), run(True, 2))
    assert np.abs(run(False, 1) - run(False, 2)).max() > 1e-3
    assert np.abs(run(False, 1) - run(True, 1)).max() > 1e-3
