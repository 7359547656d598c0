"""`magic explain`: the walk follows the forward pass in order, its values are the real
model's, GPT-3 175B runs on shapes only, and the pictures are written."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matrixmagic.configs import get_preset
from matrixmagic.model import build_model, init_params
from matrixmagic.model import explain as explain_module
from matrixmagic.model.explain import explain, format_explanation
from matrixmagic.train.cli import main

CORE_ORDER = ["tokens", "token embeddings", "positional encodings", "embeddings (sum)", "Q", "K", "V", "scores",
              "mask", "attention weights", "weighted values", "heads concatenated", "output projection",
              "add & norm (self attention)", "FFN hidden", "FFN output", "add & norm (FFN)",
              "logits (final linear)", "softmax over vocabulary"]
TEXT = "Hi, matrices!"


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("gpt-tiny").model
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    ids = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int32)[None]
    return cfg, params, ids, explain(cfg, params, ids, layer=1)


def test_gpt3_175b_runs_on_shapes_only_without_allocating(monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("explain allocated weights for a shape-only preset")

    monkeypatch.setattr(explain_module, "init_params", no_weights)
    B = 2
    e = explain(get_preset("gpt3-175b").model, batch=B)
    assert e.shapes_only and all(s.value is None for s in e.stages)
    assert e.stage("Q").per_head_shape == (B, 2048, 128)
    assert e.stage("Q").shape == (B, 2048, 96, 128)
    assert e.stage("scores").shape == (B, 96, 2048, 2048)
    assert e.stage("attention weights").shape == (B, 96, 2048, 2048)
    assert e.stage("FFN hidden").shape == (B, 2048, 4 * 12288)
    assert e.stage("logits (final linear)").shape == (B, 2048, 50257)
    assert e.stage("scores").flops == 2 * B * 96 * 2048 * 2048 * 128  # Q K^T for all heads


def test_stages_follow_the_forward_pass_in_order(tiny):
    *_, e = tiny
    names = [s.name for s in e.stages]
    positions = [names.index(n) for n in CORE_ORDER]
    assert positions == sorted(positions), names
    printed = format_explanation(e)
    offsets = [printed.index(f". {n} ") for n in CORE_ORDER]
    assert offsets == sorted(offsets)
    assert "values" in printed and "matmul" in printed


def test_values_come_from_the_real_forward_pass(tiny):
    cfg, params, ids, e = tiny
    logits, state = build_model(cfg).apply({"params": params}, jnp.asarray(ids), mutable=["intermediates"])
    np.testing.assert_allclose(e.stage("logits (final linear)").value, logits, rtol=1e-6)
    np.testing.assert_allclose(e.stage("softmax over vocabulary").value.sum(-1), 1.0, rtol=1e-5)
    attention = state["intermediates"]["decoder"]["layers"]["self_attention"]
    np.testing.assert_allclose(e.stage("Q").value, attention["q"][0][1], rtol=1e-6)  # layer 1
    np.testing.assert_allclose(e.stage("attention weights").value, attention["weights"][0][1], rtol=1e-6)
    T = ids.shape[1]
    assert e.stage("scores").shape == (1, cfg.num_heads, T, T)
    np.testing.assert_array_equal(e.stage("mask").value[0, 0], np.tril(np.ones((T, T), bool)))
    assert e.labels[:3] == ["H", "i", ","]


def test_other_families_walk_their_own_stages():
    bert = explain(get_preset("bert-tiny").model, shapes_only=True)
    assert "token type embeddings" in [s.name for s in bert.stages]
    seq2seq = explain(get_preset("transformer-tiny").model, shapes_only=True)
    names = [s.name for s in seq2seq.stages]
    order = [names.index(n) for n in ("add & norm (self attention)", "cross attention weights", "FFN hidden")]
    assert order == sorted(order)
    with pytest.raises(ValueError, match="layer=9"):
        explain(get_preset("gpt-tiny").model, layer=9, shapes_only=True)


def test_plots_are_written(tiny, tmp_path):
    from matrixmagic.model.plots import plot_explanation

    *_, e = tiny
    paths = plot_explanation(e, tmp_path)
    assert {p.name for p in paths} == {"attention_layer1.png", "positional_encoding.png", "causal_mask.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_cli_explain_shape_only(capsys):
    assert main(["explain", "--preset", "gpt3-175b", "--batch", "3", "--text", "Hello"]) == 0
    out = capsys.readouterr().out
    # 6 tokens: the prompt's start (end-of-text, as `magic generate` reads a prompt), then 5 bytes
    assert "prompts start with <|endoftext|>" in out
    assert "shapes only" in out and "[3, 96, 6, 6]" in out and "per head [3, 6, 128]" in out
    assert main(["explain", "--preset", "gpt3-175b", "--text", "Hello", "--no-bos"]) == 0
    assert "per head [1, 5, 128]" in capsys.readouterr().out


def test_positional_picture_is_the_models_own(tiny):
    """Learned positions are drawn as the rows P[pos] the forward pass used (not the sinusoidal table);
    a sinusoidal model gets its sinusoids; a shape-only learned walk draws none."""
    from matrixmagic.model.plots import positional_picture
    from matrixmagic.model.positional import sinusoidal_encoding

    cfg, params, *_, e = tiny
    assert cfg.positional == "learned"
    table, _, title = positional_picture(e)
    rows = np.asarray(params["position_embedding"]["embedding"])  # [max_len, d_model]
    np.testing.assert_allclose(table, rows[:table.shape[0]], rtol=1e-6)
    assert title.startswith("learned position embeddings")
    assert positional_picture(explain(cfg, shapes_only=True)) is None
    sinusoidal = cfg.replace(positional="sinusoidal")
    table, _, title = positional_picture(explain(sinusoidal, shapes_only=True))
    np.testing.assert_array_equal(table, sinusoidal_encoding(sinusoidal.max_len, sinusoidal.d_model)[:256, :512])
