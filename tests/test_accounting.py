"""Parameter counts, FLOPs and memory against published numbers and hand-written formulas,
and `magic params`.

Every expected number is written here, from a paper, the Hugging Face reference
implementation, or a closed form derived in this file (not from model/accounting.py).
Counting walks the parameter tree from `jax.eval_shape(model.init)`: nothing is allocated.
"""

import functools
import json
import resource

import jax
import pytest
from flax import linen as nn

from matrixmagic.configs import PRESETS, get_preset
from matrixmagic.model import abstract_variables
from matrixmagic.model.accounting import (
    CATEGORIES,
    categorize,
    closed_form_params,
    count_params,
    report,
    training_flops_per_token,
    training_state_bytes,
)
from matrixmagic.train.cli import main


@functools.cache
def tree_counts(cfg) -> dict:
    return count_params(cfg)


def tree_total(cfg) -> int:
    return sum(tree_counts(cfg).values())


def expected_params(cfg) -> tuple[int, int]:
    """(model, MLM head) from the architecture, written independently of model/accounting.py.

    Every Linear is x W + b (b only when use_bias; BERT's pooler and MLM transform always
    have one); every LayerNorm has a scale and a bias of d_model each, an RMSNorm a scale;
    grouped-query K and V project to num_kv_heads heads of d_model / num_heads; SwiGLU has
    a gate beside its two matrices; rotary positions have no weights.
    """
    d, f, vocab, layers = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_layers
    kv = (cfg.num_kv_heads or cfg.num_heads) * (d // cfg.num_heads)

    def linear(n_in, n_out, bias=cfg.use_bias):
        return n_in * n_out + (n_out if bias else 0)

    layer_norm = d if cfg.norm == "rmsnorm" else 2 * d
    attention = 2 * linear(d, d) + 2 * linear(d, kv)  # W_q, W_o; W_k, W_v
    ffn = linear(d, f) + linear(f, d) + (linear(d, f) if cfg.activation == "swiglu" else 0)
    token_table = vocab * d
    positions = cfg.max_len * d if cfg.positional == "learned" else 0
    final_norm = layer_norm if cfg.norm_position == "pre" else 0
    unembedding = 0 if cfg.tie_embeddings else d * vocab
    if cfg.family == "decoder":
        layer = attention + ffn + 2 * layer_norm
        return token_table + positions + layers * layer + final_norm + unembedding, 0
    if cfg.family == "encoder":
        layer = attention + ffn + 2 * layer_norm
        embeddings = token_table + positions + cfg.type_vocab_size * d + layer_norm
        pooler = linear(d, d, bias=True)
        head = linear(d, d, bias=True) + layer_norm + vocab + unembedding  # transform, norm, output bias
        return embeddings + layers * layer + final_norm + pooler, head
    encoder_layer = attention + ffn + 2 * layer_norm
    decoder_layer = 2 * attention + ffn + 3 * layer_norm  # self + cross attention
    return token_table + positions + layers * (encoder_layer + decoder_layer) + 2 * final_norm + unembedding, 0


# ---------------------------------------------------------------- published counts

# Hugging Face GPT2Model / BertModel (tied LM head, BERT with pooler and without the MLM head)
EXACT = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "bert-base": 109_482_240,
    "bert-large": 335_141_888,
    # Llama: the released checkpoints (Llama 2 7B and Llama 3 8B as their model cards print them; the
    # others: model.safetensors.index.json's total_size of the bf16 weights / 2 bytes)
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3-405b": 405_853_388_800,
}
# Brown et al. 2020, Table D.1 ("Total Params")
GPT3_TABLE_D1 = {
    "gpt3-small": 125_000_000,
    "gpt3-medium": 356_000_000,
    "gpt3-large": 760_000_000,
    "gpt3-xl": 1_320_000_000,
    "gpt3-2.7b": 2_650_000_000,
    "gpt3-6.7b": 6_660_000_000,
    "gpt3-13b": 12_850_000_000,
    "gpt3-175b": 174_600_000_000,
}
# Vaswani et al. 2017, Table 3
TRANSFORMER_TABLE_3 = {"transformer-base": 65_000_000, "transformer-big": 213_000_000}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_published_counts(name):
    r = report(get_preset(name))
    assert r.params == EXACT[name]
    assert r.closed_form == EXACT[name]


def test_bert_mlm_head_is_reported_apart():
    base, large = report(get_preset("bert-base")), report(get_preset("bert-large"))
    assert base.mlm_head == 768 * 768 + 768 + 2 * 768 + 30522 == 622_650  # transform, LayerNorm, output bias
    assert large.mlm_head == 1024 * 1024 + 1024 + 2 * 1024 + 30522 == 1_082_170
    assert base.breakdown["output_head"] == base.mlm_head
    assert sum(base.breakdown.values()) == 109_482_240 + 622_650
    assert base.breakdown["pooler"] == 768 * 768 + 768


@pytest.mark.parametrize("name", sorted(GPT3_TABLE_D1))
def test_gpt3_within_half_a_percent_of_table_d1(name):
    params = tree_total(get_preset(name).model)
    assert abs(params - GPT3_TABLE_D1[name]) / GPT3_TABLE_D1[name] < 0.005, params


def test_gpt3_175b_is_counted_without_allocating():
    cfg = get_preset("gpt3-175b").model
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(abstract_variables(cfg)["params"]))
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert tree_total(cfg) == 174_604_259_328
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 1024 * 1024, f"peak RSS grew by {grown / 1024:.0f} MiB: parameters were allocated"


@pytest.mark.parametrize("name", sorted(TRANSFORMER_TABLE_3))
def test_transformer_within_five_percent_of_table_3(name):
    params = tree_total(get_preset(name).model)
    assert abs(params - TRANSFORMER_TABLE_3[name]) / TRANSFORMER_TABLE_3[name] < 0.05, params


# ---------------------------------------------------------------- tree == closed form

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_tree_count_equals_closed_form_for_every_preset(name):
    cfg = get_preset(name).model
    model, head = expected_params(cfg)
    assert tree_total(cfg) == model + head
    closed = closed_form_params(cfg)
    assert (closed["model"], closed["mlm_head"]) == (model, head)
    r = report(get_preset(name))
    assert r.params == model and r.mlm_head == head


VARIANTS = {
    "untied": dict(tie_embeddings=False),
    "sinusoidal": dict(positional="sinusoidal"),
    "learned": dict(positional="learned"),
    "no_bias": dict(use_bias=False),
    "pre_ln": dict(norm_position="pre"),
    "post_ln": dict(norm_position="post"),
    "no_token_types": dict(type_vocab_size=0),
    "untied_no_bias_pre_ln": dict(tie_embeddings=False, use_bias=False, norm_position="pre"),
    "rope": dict(positional="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(activation="swiglu"),
    "multi_query": dict(num_kv_heads=1),
    "llama_options": dict(positional="rope", norm="rmsnorm", activation="swiglu", num_kv_heads=1, use_bias=False,
                          tie_embeddings=False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny", "transformer-tiny"])
def test_tree_count_equals_closed_form_for_variants(preset, variant):
    cfg = get_preset(preset).model.replace(**VARIANTS[variant])
    model, head = expected_params(cfg)
    assert tree_total(cfg) == model + head
    closed = closed_form_params(cfg)
    assert (closed["model"], closed["mlm_head"]) == (model, head)
    counts = tree_counts(cfg)
    d, vocab = cfg.d_model, cfg.vocab_size
    if not cfg.tie_embeddings and cfg.family != "encoder":  # the unembedding is its own matrix
        assert counts["output_head"] == d * vocab
    if cfg.family == "decoder" and cfg.tie_embeddings:
        assert counts["output_head"] == 0


def test_variants_change_the_count_by_the_expected_amount():
    """Deltas between variants, each one term of the formula, on gpt-tiny (d 128, V 384, L 4, d_ff 512)."""
    cfg = get_preset("gpt-tiny").model
    d, vocab, layers, d_ff, max_len = 128, 384, 4, 512, 128
    assert (cfg.d_model, cfg.vocab_size, cfg.num_layers, cfg.d_ff, cfg.max_len) == (d, vocab, layers, d_ff, max_len)
    base = tree_total(cfg)
    assert tree_total(cfg.replace(tie_embeddings=False)) - base == vocab * d
    assert base - tree_total(cfg.replace(positional="sinusoidal")) == max_len * d
    assert base - tree_total(cfg.replace(use_bias=False)) == layers * (4 * d + d_ff + d)
    assert base - tree_total(cfg.replace(norm_position="post")) == 2 * d  # the final LayerNorm
    # gpt-tiny has 2 heads of 64: one K/V head halves W_k and W_v (and their biases)
    assert base - tree_total(cfg.replace(num_kv_heads=1)) == layers * 2 * (d * 64 + 64)
    assert tree_total(cfg.replace(activation="swiglu")) - base == layers * (d * d_ff + d_ff)  # W_gate and its bias
    assert base - tree_total(cfg.replace(norm="rmsnorm")) == (2 * layers + 1) * d  # every norm loses its bias
    assert base - tree_total(cfg.replace(positional="rope")) == max_len * d  # no table


# ---------------------------------------------------------------- breakdown

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_breakdown_sums_to_the_total(name):
    r = report(get_preset(name))
    assert set(r.breakdown) == set(CATEGORIES)
    assert all(v >= 0 for v in r.breakdown.values())
    assert sum(r.breakdown.values()) == r.params + r.mlm_head


def test_gpt2_breakdown_by_hand():
    counts = tree_counts(get_preset("gpt2").model)
    assert counts == {
        "embeddings": 50257 * 768 + 1024 * 768,  # 39,383,808
        "attention": 12 * (4 * 768 * 768 + 4 * 768),  # 28,348,416
        "mlp": 12 * (2 * 768 * 3072 + 3072 + 768),  # 56,669,184
        "norms": 12 * 2 * 2 * 768 + 2 * 768,  # 38,400 (two per layer + final)
        "pooler": 0,
        "output_head": 0,  # tied to the token embedding
    }
    assert sum(counts.values()) == 124_439_808


def test_categorize_rejects_an_unknown_parameter():
    assert categorize(("decoder", "layers", "self_attention", "query", "kernel")) == "attention"
    assert categorize(("decoder", "layers", "self_attention_norm", "scale")) == "norms"
    with pytest.raises(ValueError, match="rotary/kernel"):
        categorize(("rotary", "kernel"))


# ---------------------------------------------------------------- FLOPs and memory

def test_gpt2_training_flops_per_token_by_hand():
    # PaLM appendix B: 6 N + 12 L T d. N = weights used in matmuls: the learned positions
    # (1024 x 768 = 786,432) are a lookup; the tied token table is counted once, as the output layer.
    n_matmul = 124_439_808 - 786_432  # 123,653,376
    six_n = 6 * n_matmul  # 741,920,256
    attention = 12 * 12 * 1024 * 768  # 12 L T d = 113,246,208
    assert six_n + attention == 855_166_464
    r = report(get_preset("gpt2"))
    assert r.flops_per_token == 855_166_464
    assert r.seq_len == 1024
    cfg = get_preset("gpt2").model
    assert training_flops_per_token(cfg, 124_439_808, seq_len=512) == 741_920_256 + 12 * 12 * 512 * 768 == 798_543_360
    # untied: the input table becomes a lookup too; the output matrix stays
    untied = cfg.replace(tie_embeddings=False)
    total = 124_439_808 + 50257 * 768
    assert training_flops_per_token(untied, total) == 855_166_464


def test_encoder_decoder_flops_count_three_attention_sublayers_per_layer():
    cfg = get_preset("transformer-base").model  # 6 + 6 layers, d 512, sinusoidal (no lookup table but tokens)
    total = tree_total(cfg)
    expected = 6 * total + 12 * (3 * 6) * 1024 * 512  # encoder self + decoder self + cross
    assert training_flops_per_token(cfg, total) == expected


def test_training_state_memory_bytes():
    n = 124_439_808
    mem = training_state_bytes(n)
    assert mem["float32"] == {"params": 497_759_232, "grads": 497_759_232, "adam": 995_518_464,
                              "total": 1_991_036_928}  # 16 bytes a parameter
    assert mem["bfloat16"] == {"params": 248_879_616, "grads": 248_879_616, "adam": 497_759_232,
                               "total": 995_518_464}
    assert report(get_preset("gpt2")).memory_bytes == mem
    bert = report(get_preset("bert-base"))  # training state holds the MLM head too
    assert bert.memory_bytes["float32"]["total"] == 16 * (109_482_240 + 622_650)


# ---------------------------------------------------------------- magic params

def test_cli_params_json_has_the_exact_count(capsys):
    assert main(["params", "gpt2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out] == ["gpt2"]
    assert out[0]["params"] == 124_439_808 and out[0]["closed_form"] == 124_439_808
    assert out[0]["flops_per_token"] == 855_166_464
    assert sum(out[0]["breakdown"].values()) == 124_439_808


def test_cli_unknown_preset_exits_2_with_a_suggestion(capsys):
    assert main(["params", "gpt2", "gpt-2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # fails before counting anything
    assert "preset='gpt-2' is unknown" in captured.err and "Did you mean 'gpt2'?" in captured.err
    assert captured.err.startswith("magic params: error:")


def test_cli_all_presets_by_default(capsys):
    assert main(["params", "--json"]) == 0
    out = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(out) == list(PRESETS)
    for name, expected in EXACT.items():
        assert out[name]["params"] == expected
    for name, r in out.items():
        model, head = expected_params(get_preset(name).model)
        assert (r["params"], r["mlm_head"], r["closed_form"]) == (model, head, model), name
    assert main(["params"]) == 0  # the human-readable table, same presets
    text = capsys.readouterr().out
    assert all(name in text for name in PRESETS)
    assert "124,439,808" in text and "622,650" in text
