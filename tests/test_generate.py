"""Generation with the KV cache equals recomputing the whole sequence at every step.

Small models with a wide init (init_std 0.3) so the argmax is far from ties and
cached / recomputed float rounding cannot flip a token. Each jitted loop compiles
once per shape, so the tests share prompts and fixtures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matrixmagic.configs import ModelConfig
from matrixmagic.model import build_model, init_params
from matrixmagic.model.generate import (
    Sampling,
    _unrolled,
    beam_search,
    fill_masks,
    filter_logits,
    generate,
    init_cache,
    sample_token,
    translate,
)

SMALL = dict(vocab_size=64, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_len=32, dropout_rate=0.0,
             attention_dropout_rate=0.0, init_std=0.3)
PROMPTS = [[5, 9, 2, 7, 1, 3], [11, 4, 8]]  # different lengths in one batch
NEW = 10
EOT = 63  # never produced by these random models unless chosen from their output
GREEDY = Sampling(temperature=0.0)


def _params(cfg):
    return jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(1))


@pytest.fixture(scope="module")
def gpt():
    cfg = ModelConfig(family="decoder", **SMALL)
    return build_model(cfg), _params(cfg)


SEQ2SEQ = ModelConfig(family="encoder_decoder", positional="sinusoidal", norm_position="post", activation="relu",
                      scale_embeddings=True, **SMALL)


@pytest.fixture(scope="module")
def seq2seq():
    return build_model(SEQ2SEQ), _params(SEQ2SEQ)


@pytest.fixture(scope="module")
def greedy_batch(gpt):
    model, params = gpt
    return generate(model, params, PROMPTS, max_new_tokens=NEW, eot_id=EOT, sampling=GREEDY)


@jax.jit
def _forward(params, ids):
    return build_model(ModelConfig(family="decoder", **SMALL)).apply({"params": params}, ids)


def recompute_greedy(model, params, prompt, steps, eot_id=EOT):
    """Reference: the full forward pass over prompt + generated tokens at every step (no cache).
    Causal attention means right padding to max_len changes nothing before the last real token."""
    seq, out = list(prompt), []
    for _ in range(steps):
        ids = np.zeros((1, model.config.max_len), np.int32)
        ids[0, : len(seq)] = seq
        token = int(jnp.argmax(_forward(params, jnp.asarray(ids))[0, len(seq) - 1]))
        out.append(token)
        seq.append(token)
        if token == eot_id:
            break
    return out


def test_cached_greedy_equals_full_recompute(gpt, greedy_batch):
    model, params = gpt
    for prompt, row in zip(PROMPTS, greedy_batch.tokens):
        assert list(row) == recompute_greedy(model, params, prompt, NEW)
    assert len(set(greedy_batch.tokens[0].tolist())) > 1, "degenerate model: pick another seed"


def test_batch_of_different_lengths_equals_each_alone(gpt, greedy_batch):
    model, params = gpt
    for prompt, row in zip(PROMPTS, greedy_batch.tokens):
        alone = generate(model, params, [prompt], max_new_tokens=NEW, eot_id=EOT, sampling=GREEDY)
        np.testing.assert_array_equal(alone.tokens[0], row)


def test_top_k_1_equals_greedy(gpt, greedy_batch):
    model, params = gpt
    out = generate(model, params, PROMPTS, max_new_tokens=NEW, eot_id=EOT, sampling=Sampling(1.0, top_k=1),
                   rng=jax.random.key(7))
    np.testing.assert_array_equal(out.tokens, greedy_batch.tokens)


def test_stops_at_end_of_text_per_row(gpt, greedy_batch):
    model, params = gpt
    eot = int(greedy_batch.tokens[0, 3])  # make row 0's fourth token the end of text
    out = generate(model, params, PROMPTS, max_new_tokens=NEW, eot_id=eot, sampling=GREEDY)
    for row, full in zip(out.tokens, greedy_batch.tokens):
        stop = list(full).index(eot) + 1 if eot in full else NEW
        np.testing.assert_array_equal(row[:stop], full[:stop])
        assert (row[stop:] == eot).all()
    assert out.num_tokens[0] == list(greedy_batch.tokens[0]).index(eot) + 1 <= 4
    assert out.rows()[0] == list(greedy_batch.tokens[0][: out.num_tokens[0] - 1])


def test_sampling_is_seeded_and_in_vocabulary(gpt):
    model, params = gpt
    sampling = Sampling(temperature=1.0, top_k=8, top_p=0.9)
    a = generate(model, params, PROMPTS, max_new_tokens=NEW, eot_id=EOT, sampling=sampling, rng=jax.random.key(3))
    b = generate(model, params, PROMPTS, max_new_tokens=NEW, eot_id=EOT, sampling=sampling, rng=jax.random.key(3))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert ((a.tokens >= 0) & (a.tokens < 64)).all()


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.7)) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.01)) == [True, False, False, False]  # always keeps the best
    assert int(sample_token(logits, jax.random.key(0), Sampling(temperature=0.0))[0]) == 0


def test_bad_arguments_name_the_fix(gpt):
    model, params = gpt
    with pytest.raises(ValueError, match="max_len"):
        generate(model, params, [[1] * 30], max_new_tokens=10, eot_id=EOT)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, params, [[]], max_new_tokens=2, eot_id=EOT)
    with pytest.raises(ValueError, match="positions"):
        model.apply({"params": params}, jnp.zeros((1, 1), jnp.int32), decode=True, mutable=["cache"])


def test_cache_shapes_and_unchanged_params(gpt):
    model, _ = gpt
    cache = init_cache(model, batch=3, cache_len=16)["decoder"]["layers"]["self_attention"]
    assert cache["cached_key"].shape == (2, 3, 16, 4, 8)  # [layers, B, S, H, d_k]
    assert cache["cache_index"].shape == (2, 3)
    ids = jnp.zeros((1, 4), jnp.int32)
    decode_init = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, decode=True))
    assert jax.tree_util.tree_structure(decode_init["params"]) == jax.tree_util.tree_structure(
        jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"])


def test_decoding_unrolls_the_stack_with_the_same_weights(gpt):
    """The loops decode with the layers unrolled (no weight slicing per token): each layer gets
    its own slice of the stacked weights, under the names the unrolled model declares."""
    model, params = gpt
    unrolled, per_layer = _unrolled(model, params)
    assert model.config.scan_layers and not unrolled.config.scan_layers
    declared = jax.eval_shape(lambda: init_params(unrolled.config, jax.random.key(0)))
    assert jax.tree_util.tree_structure(per_layer) == jax.tree_util.tree_structure(declared)
    stacked = jax.tree_util.tree_leaves(params["decoder"]["layers"])
    for i in range(model.config.num_layers):
        for got, layers in zip(jax.tree_util.tree_leaves(per_layer["decoder"][f"layer_{i}"]), stacked, strict=True):
            np.testing.assert_array_equal(got, np.asarray(layers)[i])
    ids = jnp.asarray([PROMPTS[0]])
    np.testing.assert_allclose(unrolled.apply({"params": per_layer}, ids), model.apply({"params": params}, ids),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- encoder-decoder

SOURCES = [[3, 17, 22, 9, 5], [40, 2]]
BOS = 62


@jax.jit
def _seq2seq_logits(params, source, target):
    """Full recompute, no cache: encode the (unpadded) source, decode the whole target."""
    model = build_model(SEQ2SEQ)
    encoded = model.apply({"params": params}, source, method="encode")
    return model.apply({"params": params}, encoded, target, method="decode")


def recompute_seq2seq(model, params, source, steps):
    target, out = [BOS], []
    for _ in range(steps):
        ids = np.zeros((1, steps + 1), np.int32)
        ids[0, : len(target)] = target
        logits = _seq2seq_logits(params, jnp.asarray([source]), jnp.asarray(ids))[0, len(target) - 1]
        out.append(int(jnp.argmax(logits)))
        target.append(out[-1])
        if out[-1] == EOT:
            break
    return out


@pytest.fixture(scope="module")
def seq2seq_greedy(seq2seq):
    model, params = seq2seq
    return translate(model, params, SOURCES, bos_id=BOS, eot_id=EOT, max_new_tokens=NEW)


def test_seq2seq_cached_greedy_equals_full_recompute(seq2seq, seq2seq_greedy):
    model, params = seq2seq
    for source, row in zip(SOURCES, seq2seq_greedy.tokens):
        assert list(row) == recompute_seq2seq(model, params, source, NEW)


def test_beam_search_width_1_equals_greedy(seq2seq, seq2seq_greedy):
    model, params = seq2seq
    best, beams, _ = beam_search(model, params, SOURCES, bos_id=BOS, eot_id=EOT, max_new_tokens=NEW, beam_size=1)
    np.testing.assert_array_equal(best.tokens, seq2seq_greedy.tokens)
    assert beams.shape == (2, 1, NEW)


def test_beam_scores_are_the_log_probabilities_of_the_beams(seq2seq):
    """Recomputing each returned beam's log-probability without any cache checks the
    per-step cache reordering (a wrong parent cache would change the scores)."""
    model, params = seq2seq
    _, beams, scores = beam_search(model, params, SOURCES, bos_id=BOS, eot_id=EOT, max_new_tokens=6, beam_size=3)
    for source, source_beams, source_scores in zip(SOURCES, beams, scores):
        assert list(source_scores) == sorted(source_scores, reverse=True)
        for tokens, score in zip(source_beams, source_scores):
            target = jnp.asarray([[BOS] + list(tokens[:-1])])
            logp = jax.nn.log_softmax(_seq2seq_logits(params, jnp.asarray([source]), target)[0])
            n = list(tokens).index(EOT) + 1 if EOT in tokens else len(tokens)
            expected = float(sum(logp[t, tokens[t]] for t in range(n)))
            np.testing.assert_allclose(score, expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- encoder-only

def test_fill_masks_takes_the_mlm_argmax_at_masked_positions():
    cfg = ModelConfig(family="encoder", type_vocab_size=2, norm_position="post", **SMALL)
    model, params = build_model(cfg), _params(cfg)
    mask_id = 60
    ids = np.array([[1, 2, mask_id, 4, mask_id, 6]], np.int32)
    filled = fill_masks(model, params, ids, mask_id)
    expected = np.argmax(np.asarray(model.apply({"params": params}, jnp.asarray(ids))), -1)
    is_mask = ids == mask_id
    np.testing.assert_array_equal(filled[is_mask], expected[is_mask])
    np.testing.assert_array_equal(filled[~is_mask], ids[~is_mask])
    assert mask_id not in fill_masks(model, params, ids, mask_id, banned_ids=[mask_id])
