"""GPT-3 as the paper trained it: the schedule in tokens, the batch-size ramp, --print-config
and `magic schedule`. References are independent: the ramp's defining formula stepped by
hand, the papers' numbers, numpy cosines. End-to-end ramp runs: tests/test_ramp_resume.py."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matrixmagic.configs import PRESETS, ConfigError, get_preset
from matrixmagic.configs.presets import gpt3_ramp_tokens
from matrixmagic.configs.ramp import BatchRamp
from matrixmagic.configs.train_config import apply_overrides, train_config_for
from matrixmagic.train.cli import main
from matrixmagic.train.data import corpus as C
from matrixmagic.train.data import pipeline as P
from matrixmagic.train.ramp import active_microbatches, ramp_at
from matrixmagic.train.run import resolve_config
from matrixmagic.train.step import make_learning_rate


def simulate(full_rows, tokens_per_row, start_rows, ramp_tokens, steps):
    """The ramp's definition, stepped one step at a time: level = min(n, 1 + floor(tokens seen
    * (n - 1) / ramp tokens)), batch = level * start rows."""
    n, seen, out = full_rows // start_rows, 0, []
    for _ in range(steps):
        rows = min(n, 1 + seen * (n - 1) // ramp_tokens) * start_rows
        out.append((rows, seen))
        seen += rows * tokens_per_row
    return out


# ----------------------------------------------------------------------------- schedules in tokens


@pytest.mark.parametrize("devices,mesh", [(1, []), (256, ["mesh.data=256"])])
def test_gpt3_175b_warmup_and_decay_come_from_the_papers_tokens(devices, mesh):
    config = resolve_config("gpt3-175b", mesh, devices=devices, platform="cpu")
    per_step = config.tokens_per_step
    assert config.warmup_steps == round(375e6 / per_step)  # Brown et al. 2020, Appendix B
    assert abs(config.decay_steps * per_step - 260e9) <= per_step / 2  # the decay covers 260B tokens
    assert "optimizer.warmup_tokens=375,000,000" in config.schedule_source("warmup")
    if devices == 256:
        assert config.batch_size == 1536 and (config.warmup_steps, config.decay_steps) == (119, 82652)


def test_paper_presets_take_their_recipe_demo_presets_keep_their_defaults():
    for name, preset in PRESETS.items():
        config = train_config_for(name)
        opt = config.optimizer
        if preset.paper_params is None:  # the demo: its run must stay what it was
            assert (opt.warmup_tokens, opt.decay_tokens, config.ramp.tokens) == (None, None, 0), name
            assert (config.warmup_steps, config.decay_steps) == (100, 1300)
        else:
            assert opt.warmup_tokens == preset.recipe.warmup_tokens, name
            assert config.warmup_steps == round(preset.recipe.warmup_tokens / config.tokens_per_step), name
        assert (config.ramp.tokens > 0) == name.startswith("gpt3-"), name
    assert train_config_for("bert-base").warmup_steps == 10_000  # BERT Appendix A.2: 10k steps of 256 x 512
    assert train_config_for("bert-base").decay_steps == 1_000_000


def test_explicit_warmup_steps_win_and_are_reported_as_an_override():
    config = resolve_config("gpt3-175b", ["optimizer.warmup_steps=50"], devices=1, platform="cpu")
    assert config.warmup_steps == 50
    assert "override" in config.schedule_source("warmup") and "375,000,000" in config.schedule_source("warmup")


def test_gpt3_ramp_lengths_span_the_papers_4_to_12_billion_tokens():
    lengths = [get_preset(n).recipe.ramp_tokens for n in PRESETS if n.startswith("gpt3-")]
    assert lengths[0] == 4_000_000_000 and lengths[-1] == 12_000_000_000  # Appendix B's range, its ends
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)
    # our rule: linear in log(params) between those ends (gpt3-2.7b: 2,650M params in Table D.1)
    f = math.log(2650e6 / 125e6) / math.log(174600e6 / 125e6)
    assert gpt3_ramp_tokens(2_650_000_000) == round((4e9 + f * 8e9) / 1e8) * 100_000_000
    assert get_preset("gpt3-175b").recipe.ramp_start_tokens == 32768  # "32k tokens": 16 x 2048


@pytest.mark.parametrize("devices,assignments,batch", [
    (256, ["mesh.data=256"], 1536),  # the paper's batch: a multiple of 256 and of the ramp's 16 rows
    (256, ["mesh.data=256", "microbatches=6"], 1536),
    (1, [], 1552),  # 3.2M / 2048 = 1562 sequences, down to a multiple of 16
    (1, ["ramp.tokens=0"], 1562),  # no ramp: no ramp rounding
    (1, ["data.seq_len=1024"], 3104),  # the same tokens per step; 32 start rows
])
def test_ramp_batch_rounding(devices, assignments, batch):
    config = resolve_config("gpt3-175b", assignments, devices=devices, platform="cpu")
    assert config.batch_size == batch


# ----------------------------------------------------------------------------- the ramp table


@pytest.mark.parametrize("full,per_row,start,ramp_tokens", [
    (1536, 2048, 16, 12_000_000_000), (8, 32, 2, 1536), (12, 7, 3, 100), (12, 7, 3, 1), (10, 5, 1, 37),
    (64, 3, 4, 10**6)])
def test_ramp_table_is_the_definition(full, per_row, start, ramp_tokens):
    ramp = BatchRamp.build(full, per_row, start, ramp_tokens)
    steps = ramp.ramp_steps + 20
    reference = simulate(full, per_row, start, ramp_tokens, steps)
    assert [(ramp.rows(s), ramp.tokens_before(s)) for s in range(steps)] == reference
    assert ramp.rows(ramp.ramp_steps) == full and ramp.rows(ramp.ramp_steps - 1) < full
    assert ramp.tokens_before(ramp.ramp_steps - 1) < ramp_tokens <= ramp.tokens_before(ramp.ramp_steps)
    for tokens in (0, 1, ramp_tokens // 3, ramp_tokens, reference[-1][1]):  # the first step past a token count
        assert ramp.first_step_with(tokens) == next(s for s, (_, seen) in enumerate(reference) if seen >= tokens)
    assert ramp.summary()["compiled_step_shapes"] == 1


def test_gpt3_175b_ramp_at_pod_scale():
    ramp = resolve_config("gpt3-175b", ["mesh.data=256"], devices=256, platform="cpu").batch_ramp
    assert (ramp.start_rows, ramp.full_rows, ramp.levels) == (16, 1536, 96)
    assert ramp.tokens_before(ramp.ramp_steps) >= 12e9 > ramp.tokens_before(ramp.ramp_steps - 1)
    useful, computed = ramp.computed_rows(1)  # one microbatch computes every row of every step
    assert computed == ramp.ramp_steps * 1536 and useful == ramp.rows_before(ramp.ramp_steps)
    assert ramp.computed_rows(96)[0] == ramp.computed_rows(96)[1]  # 16-row microbatches: nothing wasted


def test_no_ramp_is_one_level_of_the_full_batch():
    ramp = train_config_for("gpt-tiny").batch_ramp
    assert not ramp.on and ramp.ramp_steps == 0
    assert [ramp.rows(s) for s in (0, 5, 10**6)] == [32] * 3 and ramp.tokens_before(7) == 7 * 32 * 128
    assert ramp.clock(7) == 7


def test_the_step_reads_the_same_table():
    ramp = BatchRamp.build(24, 16, 3, 3000)
    steps = jnp.arange(ramp.ramp_steps + 5, dtype=jnp.int32)
    rows, clock = jax.jit(jax.vmap(lambda s: ramp_at(ramp, s)))(steps)
    assert rows.tolist() == [ramp.rows(int(s)) for s in steps]
    np.testing.assert_allclose(clock, [ramp.rows_before(int(s)) / 24 for s in steps], rtol=1e-6)
    flags = jax.vmap(lambda r: active_microbatches(r, 24, 4))(rows)  # 6-row microbatches
    assert flags.sum(axis=1).tolist() == [math.ceil(ramp.rows(int(s)) / 6) for s in steps]


def test_during_the_ramp_the_learning_rate_follows_tokens():
    config = apply_overrides(train_config_for("gpt-tiny"), [
        "batch_size=8", "data.seq_len=32", "ramp.start_tokens=64", "ramp.tokens=4096", "optimizer.warmup_steps=4",
        "steps=60", "optimizer.learning_rate=1e-3"])
    ramp, lr = config.batch_ramp, jax.jit(make_learning_rate(config))
    assert ramp.ramp_steps > 10
    for step in range(0, 60, 3):
        t = ramp.rows_before(step) / 8  # tokens seen, in full 8 x 32 steps
        if t < 4:
            want = 1e-3 * t / 4
        else:
            want = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - 4) / 56)))
        np.testing.assert_allclose(float(lr(step)), want, rtol=2e-5, err_msg=f"step {step}")
    plain = apply_overrides(config, ["ramp.tokens=0"])
    assert make_learning_rate(plain)(jnp.int32(4)) == pytest.approx(1e-3)  # steps again: peak at step 4


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("assignments,field,words", [
    (["ramp.start_tokens=40960000"], "ramp.start_tokens", "larger than the full batch"),
    (["ramp.start_tokens=3000"], "ramp.start_tokens", "whole sequences"),
    (["ramp.start_tokens=0"], "ramp.start_tokens", "whole sequences"),
    (["batch_size=1000"], "batch_size", "multiple of 16"),
    (["optimizer.warmup_tokens=300000000000"], "optimizer.warmup_tokens", "warmup must end before the decay"),
    (["optimizer.warmup_steps=90000"], "optimizer.warmup_steps", "warmup must end before the decay"),
    (["ramp.tokens=-5"], "ramp.tokens", ">= 0"),
])
def test_bad_ramp_and_schedule_name_the_field(assignments, field, words, capsys):
    with pytest.raises(ConfigError) as info:
        resolve_config("gpt3-175b", assignments, devices=1, platform="cpu")
    assert field in str(info.value) and words in str(info.value), str(info.value)
    flags = [a for s in assignments for a in ("--set", s)]
    assert main(["train", "--preset", "gpt3-175b", *flags]) == 2  # the CLI: a clean error, no traceback
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root, data = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text("".join(rng.choice(list("abcdefgh \n"), int(rng.integers(20, 200)))))
    return C.open_corpus(root, data, validation_fraction=0.2)


RAMP = BatchRamp.build(8, 16, 2, 16 * 40)  # 2, 4, 6 then 8 rows of 16 tokens


def ramp_pipe(corpus, family="decoder", microbatches=2, process_index=0, process_count=1, ramp=RAMP):
    return P.make_pipeline(family, corpus, "bytes", seq_len=16, batch_size=8, seed=2, ramp=ramp,
                           microbatches=microbatches, process_index=process_index, process_count=process_count)


@pytest.mark.parametrize("family", P.FAMILIES)
def test_a_ramp_step_reads_its_rows_of_the_stream_into_the_first_microbatches(corpus, family):
    pipe, plain = ramp_pipe(corpus, family), P.make_pipeline(family, corpus, "bytes", seq_len=16, batch_size=1, seed=2)
    ranks = P.ramp_slots(8, 2)
    assert ranks.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # slot r: row r // 2 of microbatch r % 2
    for step in range(RAMP.ramp_steps + 2):
        rows, start = RAMP.rows(step), RAMP.rows_before(step)
        positions = pipe.positions(step)
        assert sorted(positions[positions >= 0].tolist()) == list(range(start, start + rows))
        assert ((positions >= 0) == (ranks < rows)).all(), "active slots fill microbatch 0 first"
        batch = pipe.batch(step)
        assert not batch["loss_mask"][positions < 0].any(), "padding rows predict nothing"
        for slot in np.flatnonzero(positions >= 0):  # the same row as a 1-row pipeline's stream position
            one = plain.batch(int(positions[slot]))
            for key, value in one.items():
                np.testing.assert_array_equal(batch[key][slot], value[0], err_msg=f"{family} {step} {key}")


def test_ramp_processes_together_give_the_global_batch(corpus):
    whole = ramp_pipe(corpus)
    halves = [ramp_pipe(corpus, process_index=p, process_count=2) for p in (0, 1)]
    for step in (0, 5, RAMP.ramp_steps, 50):
        parts = [h.batch(step) for h in halves]
        for key, value in whole.batch(step).items():
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value, err_msg=key)


def test_resuming_with_another_ramp_is_refused(corpus):
    state = json.loads(json.dumps(ramp_pipe(corpus).iterator(4).get_state()))
    assert (state["ramp.start_tokens"], state["ramp.tokens"]) == (32, 640)
    ramp_pipe(corpus).iterator().set_state(state)  # the same ramp resumes
    with pytest.raises(P.PipelineError, match=r"ramp.tokens=640 differs.*restart with ramp.tokens=640"):
        ramp_pipe(corpus, ramp=BatchRamp.build(8, 16, 2, 16 * 80)).iterator().set_state(state)
    with pytest.raises(P.PipelineError, match=r"ramp.start_tokens=32 differs"):  # no ramp at all
        P.make_pipeline("decoder", corpus, "bytes", seq_len=16, batch_size=8, seed=2).iterator().set_state(state)


# ----------------------------------------------------------------------------- print-config and the plot


def test_print_config_resolves_without_data_or_compiling(tmp_path, capsys, monkeypatch):
    from matrixmagic.train import loop

    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("print-config must not train"))
    monkeypatch.setattr("matrixmagic.train.run.train_run", lambda *a, **k: pytest.fail("nor build the step"))
    missing = tmp_path / "no-such-corpus"
    assert main(["train", "--preset", "gpt3-175b", "--print-config", "--set", f"data.source={missing}",
                 "--set", f"data.data_dir={tmp_path / 'tfds'}", "--workdir", str(tmp_path / "run")]) == 0
    out = json.loads(capsys.readouterr().out)
    config, resolved = out["config"], out["resolved"]
    per_step = config["batch_size"] * config["data"]["seq_len"]
    assert resolved["batch"]["tokens_per_step"] == per_step
    assert resolved["schedule"]["warmup_steps"] == round(375e6 / per_step)
    assert resolved["schedule"]["decay_steps"] == round(260e9 / per_step)
    assert resolved["schedule"]["warmup_ends_at_step"] > resolved["schedule"]["warmup_steps"]  # small steps first
    assert resolved["ramp"]["on"] and resolved["ramp"]["start_rows"] == 16
    assert resolved["ramp"]["compiled_step_shapes"] == 1
    assert resolved["mesh"] == {"data": 1, "stage": 1, "fsdp": 1, "context": 1, "tensor": 1}
    assert resolved["dtype"] == "float32" and resolved["attention_impl"] == "matrices"
    assert config["model"]["vocab_size"] == 50304  # sized for the byte tokenizer, as train would
    assert not missing.exists() and not (tmp_path / "tfds").exists() and not (tmp_path / "run").exists()


def test_schedule_command_prints_and_draws(tmp_path, capsys):
    path = tmp_path / "gpt3.png"
    assert main(["schedule", "--preset", "gpt3-175b", "--devices", "256", "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1536 x 2048" in out and "warmup 119 steps" in out and "batch ramp 16 -> 1536 rows" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


@pytest.mark.parametrize("where,words", [("dir", "is a directory"), ("missing/x.png", "does not exist"),
                                         ("x.notaformat", "formats")])
def test_schedule_plot_path_errors_name_the_flag(where, words, tmp_path, capsys):
    target = tmp_path if where == "dir" else tmp_path / where
    assert main(["schedule", "--preset", "gpt-tiny", "--plot", str(target)]) == 2
    err = capsys.readouterr().err
    assert "--plot" in err and words in err and "Traceback" not in err


def test_the_run_header_says_when_a_papers_warmup_outlasts_the_run():
    from matrixmagic.train.loop import schedule_line

    short = schedule_line(resolve_config("bert-base", [], devices=1, platform="cpu"))  # 10k warmup, 1300 steps
    assert "warmup ends at step 10,000, after this run's 1,300 steps" in short
    assert "never reaches" not in schedule_line(resolve_config("gpt-tiny", [], devices=1, platform="cpu"))
    assert "override" in schedule_line(resolve_config("bert-base", ["optimizer.warmup_steps=10"], devices=1,
                                                      platform="cpu"))
