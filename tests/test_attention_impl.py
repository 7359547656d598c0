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
from matrixmagic.model.generate import Sampling, generate, translate
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


@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny", "transformer-tiny"])
def test_fused_equals_matrices_forward_and_gradients(preset):
    matrices, fused = configs(preset)
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
    assert float(np.abs(np.asarray(jax.tree.leaves(g_ref)[0])).max()) > 0  # the gradients are not all zero


def test_fused_equals_matrices_with_the_kv_cache():
    """Generation prefills a padded batch of prompts, then decodes one token at a time against
    the cache: greedy continuations agree token for token."""
    matrices, fused = configs("gpt-tiny")
    params = init_params(matrices, jax.random.key(2))
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


def test_bad_combinations_name_the_field_and_the_fix():
    with pytest.raises(ConfigError, match="attention_impl='fused' is invalid.*attention_dropout_rate=0.1.*matrices"):
        get_preset("gpt2").model.replace(attention_impl="fused")  # GPT-2 drops attention weights
    with pytest.raises(ConfigError, match="model.attention_impl must be one of matrices, fused"):
        apply_overrides(train_config_for("gpt-tiny"), ["model.attention_impl=flash"])


def test_platform_defaults_choose_the_attention_and_say_so():
    assert resolve_config("gpt-tiny", devices=1, platform="cpu").model.attention_impl == "matrices"
    gpu = resolve_config("gpt-tiny", devices=1, platform="gpu").model
    assert (gpu.attention_impl, gpu.dtype) == ("fused", "bfloat16")
    assert resolve_config("gpt2", devices=1, platform="gpu").model.attention_impl == "matrices"  # attention dropout
    assert resolve_config("gpt-tiny", ["model.attention_impl=matrices"], devices=1,
                          platform="gpu").model.attention_impl == "matrices"  # the flag wins


def test_explain_walks_the_matrices_of_a_fused_model():
    _, fused = configs("gpt-tiny")
    e = explain(fused, init_params(fused, jax.random.key(0)), np.arange(65, 75, dtype=np.int32)[None], tokenizer=TOK)
    weights = np.asarray(e.stage("attention weights").value)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
