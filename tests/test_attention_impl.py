"""model.attention_impl: the fused kernel computes what the matrices compute.

"matrices" is the reference (Q K^T / sqrt(d_k), mask, softmax, A V as arrays); "fused"
calls jax.nn.dot_product_attention. Each family is compared in float32 on small shapes
with causal masks, packed documents (segment ids) and padding (segment 0), forward and
gradients; cross attention through the encoder-decoder; and KV-cache decoding through
generation. Bad combinations are config errors naming the field and the fix.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from matrixmagic.configs import ConfigError, get_preset
from matrixmagic.configs.train_config import apply_overrides, train_config_for
from matrixmagic.model import build_model, init_params
from matrixmagic.model.explain import explain
from matrixmagic.model.families import family_of
from matrixmagic.model.generate import Sampling, generate, init_cache, set_cache_index, translate
from matrixmagic.train.data.tokenizers import ByteTokenizer
from matrixmagic.train.run import resolve_config

SMALL = dict(d_model=32, num_heads=4, d_ff=64, num_layers=2, max_len=24, vocab_size=384, dropout_rate=0.0,
             attention_dropout_rate=0.0)
TOK = ByteTokenizer()


def configs(preset: str):
    matrices = get_preset(preset).model.replace(**SMALL)
    return matrices, matrices.replace(attention_impl="fused")


def packed_batch(preset: str, seq_len: int = 16, batch: int = 3) -> dict:
    """Rows holding several documents and a padded tail, as the pipeline packs them."""
    family = family_of(get_preset(preset).model)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (batch, family.row_len(seq_len))).astype(np.int32)
    rows[:, 5] = TOK.eot_id  # a second document starts inside every row
    rows[0, -4:] = TOK.pad_id  # padding: segment 0
    return family.make_batch(rows, TOK, seq_len)


@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny", "transformer-tiny", "llama-tiny"])
def test_fused_equals_matrices_forward_and_gradients(preset):
    matrices, fused = configs(preset)
    assert fused.attention_impl == "fused" and matrices.attention_impl == "matrices"
    family = family_of(matrices)
    batch = packed_batch(preset)
    params = init_params(matrices, jax.random.key(1))

    def loss(p, config):
        logits = build_model(config).apply({"params": p}, **family.model_inputs(batch), deterministic=True)
        return (logits.astype(np.float32) ** 2 * batch["loss_mask"][..., None]).mean(), logits

    (l_ref, out_ref), g_ref = jax.value_and_grad(loss, has_aux=True)(params, matrices)
    (l_new, out_new), g_new = jax.value_and_grad(loss, has_aux=True)(params, fused)
    np.testing.assert_allclose(np.asarray(out_new), np.asarray(out_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(l_new), float(l_ref), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g_new)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    attention = [g for path, g in jax.tree_util.tree_leaves_with_path(g_ref) if "attention" in jax.tree_util.keystr(path)]
    assert attention and all(np.abs(np.asarray(g)).max() > 0 for g in attention)  # Q, K, V, W_o all get gradients


@pytest.mark.parametrize("preset", ["gpt-tiny", "transformer-tiny"])
def test_fused_equals_matrices_in_bfloat16(preset):
    """bf16 compute, float32 params: the same numbers to bf16 precision."""
    matrices, fused = (c.replace(dtype="bfloat16") for c in configs(preset))
    family, batch = family_of(matrices), packed_batch(preset)
    params = init_params(matrices, jax.random.key(4))
    out = [np.asarray(build_model(c).apply({"params": params}, **family.model_inputs(batch)), np.float32)
           for c in (matrices, fused)]
    np.testing.assert_allclose(out[1], out[0], rtol=2e-2, atol=2e-2)
    assert np.isfinite(out[1]).all()


def test_fused_equals_matrices_with_the_kv_cache():
    """Decoding against the cache: a padded prefill (rows of different lengths), then single
    tokens at each row's own position; the logits of every step agree, and so does greedy
    generation token for token."""
    matrices, fused = configs("gpt-tiny")
    params = init_params(matrices, jax.random.key(2))
    lengths = np.array([4, 2, 7], np.int32)
    prefill = np.random.default_rng(5).integers(0, 256, (3, 7)).astype(np.int32)

    def decode_logits(config):
        model = build_model(config)
        cache = init_cache(model, 3, 12)
        positions = np.tile(np.arange(7, dtype=np.int32), (3, 1))
        logits, state = model.apply({"params": params, "cache": cache}, prefill, positions, decode=True,
                                    mutable=["cache"])
        steps = [np.asarray(logits)[np.arange(3), lengths - 1]]
        cache = set_cache_index(state["cache"], jax.numpy.asarray(lengths))  # forget the padded slots
        token = steps[-1].argmax(-1)[:, None].astype(np.int32)
        for t in range(3):
            logits, state = model.apply({"params": params, "cache": cache}, token, (lengths + t)[:, None],
                                        decode=True, mutable=["cache"])
            cache = state["cache"]
            steps.append(np.asarray(logits)[:, -1])
            token = steps[-1].argmax(-1)[:, None].astype(np.int32)
        return np.stack(steps)

    np.testing.assert_allclose(decode_logits(fused), decode_logits(matrices), rtol=1e-5, atol=1e-5)
    prompts = [[TOK.eot_id, 72, 105, 33], [TOK.eot_id, 100], [TOK.eot_id, 1, 2, 3, 4, 5, 6]]
    outs = [generate(build_model(c), params, prompts, max_new_tokens=10, eot_id=TOK.eot_id,
                     sampling=Sampling(temperature=0.0)).rows() for c in (matrices, fused)]
    assert [list(r) for r in outs[0]] == [list(r) for r in outs[1]]
    assert sum(len(r) for r in outs[0]) > 0


def test_fused_equals_matrices_decoding_with_cross_attention():
    matrices, fused = configs("transformer-tiny")
    params = init_params(matrices, jax.random.key(3))
    sources = [[72, 101, 108, 108, 111], [87, 111, 114]]
    outs = [translate(build_model(c), params, sources, bos_id=TOK.bos_id, eot_id=TOK.eot_id, max_new_tokens=8).rows()
            for c in (matrices, fused)]
    assert [list(r) for r in outs[0]] == [list(r) for r in outs[1]]
    assert sum(len(r) for r in outs[0]) > 0


def test_bad_combinations_name_the_field_and_the_fix():
    with pytest.raises(ConfigError, match="attention_impl='fused' is invalid.*attention_dropout_rate=0.1.*matrices"):
        get_preset("gpt2").model.replace(attention_impl="fused")  # GPT-2 drops attention weights
    with pytest.raises(ConfigError, match="model.attention_impl must be one of matrices, fused"):
        apply_overrides(train_config_for("gpt-tiny"), ["model.attention_impl=flash"])


def test_platform_defaults_and_the_flag():
    """bf16 compute on accelerators, float32 on CPU; attention stays the matrices unless asked."""
    cpu = resolve_config("gpt-tiny", devices=1, platform="cpu").model
    gpu = resolve_config("gpt-tiny", devices=1, platform="gpu").model
    assert (cpu.dtype, cpu.attention_impl) == ("float32", "matrices")
    assert (gpu.dtype, gpu.attention_impl) == ("bfloat16", "matrices")
    asked = resolve_config("gpt-tiny", ["model.attention_impl=fused", "model.dtype=float32"], devices=1,
                           platform="tpu").model
    assert (asked.dtype, asked.attention_impl) == ("float32", "fused")  # the flags win


def test_explain_walks_the_matrices_of_a_fused_model():
    _, fused = configs("gpt-tiny")
    e = explain(fused, init_params(fused, jax.random.key(0)), np.arange(65, 75, dtype=np.int32)[None], tokenizer=TOK)
    weights = np.asarray(e.stage("attention weights").value)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
