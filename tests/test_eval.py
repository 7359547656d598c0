"""Evaluation (train/evals/): the lm-eval backend against lm-eval's own `hf` backend, scoring
against log-probabilities computed directly, perplexity against its formulas, and the one
prompt convention against `transformers`.

The references are stored, never computed with torch here: tests/fixtures/evals/hf_reference.json
holds what lm-eval 0.4.13's `hf` backend and transformers' `generate` gave on the tiny random
GPT-2 of tests/fixtures/hf/gpt2 (tests/fixtures/make_eval_fixtures.py says how it was made);
the tiny tasks are tests/fixtures/evals/tasks/*.yaml over local JSONL.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from run_helpers import TINY

from matrixmagic.configs import get_preset
from matrixmagic.model.build import build_model, init_params
from matrixmagic.model.generate import generate_text
from matrixmagic.train.data.tokenizers import ByteTokenizer, HFTokenizer, prompt_start
from matrixmagic.train.evals.harness import MatrixMagicLM
from matrixmagic.train.evals.perplexity import perplexity
from matrixmagic.train.evals.scoring import Scorer, bucket_length, rolling_windows
from matrixmagic.train.evals.tasks import check_names, evaluate, task_manager
from matrixmagic.train.hf.api import import_hf
from matrixmagic.train.reading import read_run
from matrixmagic.train.run import load_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
TASKS = os.path.join(FIXTURES, "evals", "tasks")
with open(os.path.join(FIXTURES, "evals", "hf_reference.json")) as _f:
    REFERENCE = json.load(_f)
TOL = 1e-4  # float32 logits from two libraries: the bound


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """The tiny GPT-2 fixture imported by `magic hf import`: (run dir, config, params, tokenizer)."""
    run = import_hf(os.path.join(FIXTURES, "hf", "gpt2"), str(tmp_path_factory.mktemp("gpt2") / "run")).path
    config, tokenizer = read_run(run)  # imported, not trained here: prompts start as transformers starts them
    return run, config, load_run(run)[1], tokenizer


@pytest.fixture(scope="module")
def lm(gpt2):
    _, config, params, tokenizer = gpt2
    return MatrixMagicLM.from_loaded(config, params, tokenizer, batch_size=4)


@pytest.fixture(scope="module")
def tiny():
    """gpt-tiny shrunk, random weights, byte tokenizer: (config, params)."""
    config = get_preset("gpt-tiny").model.replace(num_layers=2, d_model=32, num_heads=2, d_ff=64, max_len=32,
                                                  num_valid_tokens=260)
    return config, init_params(config, jax.random.key(3))


def direct_logprobs(config, params, ids: list[int]) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1, from one forward pass and numpy's log-softmax."""
    logits = np.asarray(build_model(config).apply({"params": params}, np.asarray([ids[:-1]], np.int32)),
                        np.float64)[0]
    logits = logits - logits.max(-1, keepdims=True)
    logsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return logsm[np.arange(len(ids) - 1), ids[1:]]


def instances(kind: str, rows: list) -> list[Instance]:
    return [Instance(kind, {}, tuple(args), k) for k, args in enumerate(rows)]


# ----------------------------------------------------------------------------- parity with lm-eval's hf backend

@pytest.mark.parametrize("task", ["tiny_choice", "tiny_choice_2shot"])
def test_loglikelihoods_equal_the_hf_backend_request_by_request(lm, task):
    rows = REFERENCE["tasks"][task]["requests"]
    got = lm.loglikelihood(instances("loglikelihood", [r[2] for r in rows]), disable_tqdm=True)
    want = [r[3] for r in rows]
    assert len(got) == len(want) > 20
    for (logprob, greedy), (ref_logprob, ref_greedy), row in zip(got, want, rows):
        assert abs(logprob - ref_logprob) <= TOL * max(1.0, abs(ref_logprob)), row[2]
        assert greedy == ref_greedy, row[2]


def test_rolling_loglikelihoods_equal_the_hf_backend(lm):
    rows = REFERENCE["tasks"]["tiny_rolling"]["requests"]
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [r[2] for r in rows]), disable_tqdm=True)
    assert any(r[4][1] > 1 for r in rows), "a text longer than the context (several windows) is covered"
    for value, row in zip(got, rows):
        assert abs(value - row[3]) <= TOL * max(1.0, abs(row[3])), row[2]


def test_greedy_generations_equal_the_hf_backend(lm):
    rows = REFERENCE["tasks"]["tiny_generate"]["requests"]
    got = lm.generate_until(instances("generate_until", [r[2] for r in rows]), disable_tqdm=True)
    assert got == [r[3] for r in rows]


def test_task_accuracy_through_the_harness_equals_the_hf_backend(lm):
    """simple_evaluate on our backend: the shipped tasks' metrics are the hf backend's, exactly
    (0- and 2-shot: the harness picks the same few-shot examples for both backends)."""
    manager = task_manager(TASKS)
    for key in ("tiny_choice", "tiny_choice_2shot", "tiny_rolling"):
        ref = REFERENCE["tasks"][key]
        results = evaluate(lm, [ref["task"]], manager, num_fewshot=int(ref["num_fewshot"]))["results"][ref["task"]]
        for metric, value in ref["metrics"].items():
            got = results[f"{metric},none"]
            if metric.startswith("acc"):
                assert got == value, (key, metric)
            else:
                assert math.isclose(got, value, rel_tol=1e-4), (key, metric)


def test_greedy_generate_on_imported_gpt2_equals_transformers_with_nothing_prepended(gpt2):
    """The issue's bug: we used to put <|endoftext|> before every prompt, transformers puts nothing
    before a GPT-2 prompt. The run's tokenizer now decides, and GPT-2's post-processor adds none."""
    run, config, params, tokenizer = gpt2
    ref = REFERENCE["generate_plain"]
    assert prompt_start(tokenizer) == ()
    assert [int(i) for i in tokenizer.encode(ref["prompt"])] == ref["prompt_ids"]
    text = generate_text(config, params, tokenizer, ref["prompt"], prefix=prompt_start(tokenizer),
                         max_new_tokens=len(ref["new_ids"]), temperature=0.0)
    assert text == ref["prompt"] + tokenizer.decode(ref["new_ids"])
    done = subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", "generate", "--workdir", run, "--prompt",
                           ref["prompt"], "--max-new-tokens", str(len(ref["new_ids"])), "--temperature", "0"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip("\n") == text
    assert "prompts start with no added token (as transformers starts this imported checkpoint's prompts)" \
        in done.stderr
    with_bos = subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", "generate", "--workdir", run, "--prompt",
                               ref["prompt"], "--max-new-tokens", "4", "--temperature", "0", "--bos"],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
    assert with_bos.returncode == 0 and "prompts start with <|endoftext|> (id 319; --bos)" in with_bos.stderr


def test_the_prompt_start_is_what_training_documents_start_with_or_transformers_for_an_import():
    assert prompt_start(ByteTokenizer()) == (256,), "ours: end-of-text, which starts every training document"
    assert prompt_start(ByteTokenizer(), False) == ()
    gpt2 = HFTokenizer(os.path.join(FIXTURES, "hf", "gpt2", "tokenizer.json"))
    assert prompt_start(gpt2) == (319,), "a run trained here on GPT-2's tokenizer: its documents start with eot"
    gpt2.as_imported()
    assert prompt_start(gpt2) == () and prompt_start(gpt2, True) == (319,), "imported GPT-2: nothing, as transformers"
    bert = HFTokenizer(os.path.join(FIXTURES, "hf", "bert", "tokenizer.json")).as_imported()
    assert prompt_start(bert) == (bert.eot_id,) and bert.decode([bert.eot_id]) == "[CLS]", "BERT: [CLS]"


# ----------------------------------------------------------------------------- scoring against direct log-probs

def test_scores_equal_log_probs_computed_directly_across_buckets_and_truncation(tiny):
    config, params = tiny
    rng = np.random.default_rng(0)
    requests = []
    for n_ctx, n_cont in [(1, 1), (3, 5), (10, 6), (20, 12), (31, 1), (50, 7)]:  # the last is cut on the left
        requests.append(([256, *rng.integers(0, 256, n_ctx - 1)], list(rng.integers(0, 256, n_cont))))
    scorer = Scorer(config, params, batch_size=4)
    got = scorer.token_scores(requests)
    for (ctx, cont), (logprobs, greedy) in zip(requests, got):
        whole = [*ctx, *cont][-(config.max_len + 1):]
        want = direct_logprobs(config, params, whole)[-len(cont):]
        np.testing.assert_allclose(logprobs, want, atol=2e-5)
    assert {shape[1] for shape in scorer.shapes} == {16, 32}, "two buckets, each compiled once"
    assert bucket_length(17, 2048) == 32 and bucket_length(3, 2048) == 16 and bucket_length(900, 512) == 512
    assert bucket_length(129, 2048) == 256 and bucket_length(300, 2048) == 384 and bucket_length(300, 310) == 310


def test_rolling_windows_are_the_harness_windows_and_score_every_token_once():
    tokens = list(range(1, 40))
    ours = rolling_windows(tokens, [0], 8)
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, 8, 1)]
    assert [(list(c)[-1:], list(x)) for c, x in ours] == [(list(c)[-1:], list(x)) for c, x in theirs]
    for stride in (1, 3, 8):
        windows = rolling_windows(tokens, [0], 8, stride)
        assert [t for _, cont in windows for t in cont] == tokens
        for context, cont in windows[1:]:
            assert len(context) + len(cont) == 9, "every later window reads a full context"
    with pytest.raises(ValueError, match="stride=9 is invalid"):
        rolling_windows(tokens, [0], 8, 9)


def test_rolling_loglikelihood_equals_the_sum_of_token_log_probs(tiny):
    """A text inside one context: the backend's rolling value is the sum over its tokens of
    log p(token | start, tokens before), from one direct forward pass."""
    config, params = tiny
    lm = MatrixMagicLM.from_loaded(config, params, ByteTokenizer(), batch_size=2)
    text = "Flat is better than nested."
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)[0]
    ids = [256, *ByteTokenizer().encode(text)]
    assert len(ids) <= config.max_len + 1
    assert got == pytest.approx(direct_logprobs(config, params, ids).sum(), abs=1e-4)


def test_perplexity_on_text_is_its_formulas(tiny, tmp_path):
    config, params = tiny
    texts = ["Readability counts. " * 5, "Special cases aren't special enough to break the rules. ü"]
    scorer = Scorer(config, params, batch_size=4)
    tok = ByteTokenizer()
    result = perplexity(scorer, tok, texts, (256,), stride=16)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert result.tokens == result.bytes == n_bytes  # bytes: one token per byte
    nll = -sum(lp.sum() for lp, _ in scorer.token_scores(
        [w for t in texts for w in rolling_windows(list(tok.encode(t)), [256], config.max_len, 16)]))
    assert result.nll == pytest.approx(nll)
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / n_bytes)
    assert result.perplexity == pytest.approx(math.exp(nll / n_bytes))
    short = perplexity(scorer, tok, texts, (256,), stride=4)
    assert short.tokens == result.tokens and short.nll != result.nll, "more context changes the score"


# ----------------------------------------------------------------------------- the commands

def magic(*argv: str, cwd=REPO, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "HF_DATASETS_OFFLINE": "1",
                                                          "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_magic_eval_tasks_and_text_write_their_json_into_the_run(gpt2, tmp_path):
    run = gpt2[0]
    done = magic("eval", "--workdir", run, "--tasks", "tiny_choice", "--include-path", TASKS, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|tiny_choice|" in done.stdout.replace(" ", "") and "acc" in done.stdout
    [name] = os.listdir(os.path.join(run, "evals"))
    with open(os.path.join(run, "evals", name)) as f:
        saved = json.load(f)
    assert saved["results"]["tiny_choice"]["acc,none"] == REFERENCE["tasks"]["tiny_choice"]["metrics"]["acc"]

    text = tmp_path / "zen.txt"
    text.write_text("Now is better than never. Although never is often better than right now. " * 3)
    out = tmp_path / "ppl.json"
    done = magic("eval", "--workdir", run, "--text", str(text), "--stride", "32", "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["bytes"] == len(text.read_bytes()) and record["stride"] == 32 and record["prompt_start"] == [319]
    assert "bits/byte" in done.stdout and f"{record['bits_per_byte']:.4f}" in done.stdout


@pytest.mark.slow
def test_magic_lm_eval_is_the_harness_command_line_with_our_backend(gpt2, tmp_path):
    done = magic("lm-eval", "--model", "matrixmagic", "--model_args", f"workdir={gpt2[0]}", "--tasks", "tiny_choice",
                 "--include_path", TASKS, "--limit", "4", "--batch_size", "4", cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny_choice" in done.stdout and "acc" in done.stdout


def test_an_unknown_task_gets_the_nearest_names():
    with pytest.raises(ValueError, match=r"'tiny_choise' is not an lm-eval task\. Did you mean tiny_choice"):
        check_names(["tiny_choise"], task_manager(TASKS))


@pytest.mark.slow
def test_evals_during_training_are_logged_and_equal_magic_eval_on_the_saved_run(tmp_path):
    """eval.text and eval.tasks at eval steps, into metrics.jsonl; the last step's figures are
    what `magic eval` gives on the checkpoint the run saved at that step."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(6):
        (corpus / f"doc{k}.py").write_text(f"def f{k}(x):\n    return x * {k} + {k}\n" * 40)
    text = tmp_path / "held_out.txt"
    text.write_text("def g(y):\n    return y - 1\n" * 10)
    run = tmp_path / "run"
    sets = [*TINY, "steps=6", "eval_every=3", "eval_batches=1", "log_every=3",
            f"data.source={corpus}", f"data.data_dir={tmp_path / 'data'}", f"eval.text={text}",
            "eval.tasks=tiny_choice", f"eval.include_path={TASKS}", "eval.limit=3", "eval.num_fewshot=0"]
    done = magic("train", "--workdir", str(run), *[a for s in sets for a in ("--set", s)], cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("split") == "evals"]
    assert [r["step"] for r in evals] == [3, 6]
    assert {"text/bits_per_byte", "text/nats_per_token", "tiny_choice/acc", "tiny_choice/acc_norm"} <= set(evals[-1])

    out = tmp_path / "after.json"
    after = magic("eval", "--workdir", str(run), "--text", str(text), "--output", str(out), cwd=str(tmp_path))
    assert after.returncode == 0, after.stderr[-3000:]
    assert json.loads(out.read_text())["bits_per_byte"] == pytest.approx(evals[-1]["text/bits_per_byte"], rel=1e-6)


def test_the_eval_section_neither_names_a_new_run_nor_blocks_a_resume():
    from matrixmagic.configs.train_config import EvalConfig, TrainConfig
    from matrixmagic.train.rundir import config_digest
    from matrixmagic.train.samerun import harmless

    plain, with_evals = TrainConfig(), TrainConfig(eval=EvalConfig(tasks="hellaswag", text="notes/", every=100))
    assert config_digest(plain) == config_digest(with_evals)
    assert all(harmless(f"eval.{name}") for name in ("tasks", "text", "every", "limit", "num_fewshot"))


def test_each_filtered_metric_keeps_its_own_name_in_the_training_log():
    from matrixmagic.train.evals.tasks import scores

    got = scores({"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.1,
                                        "exact_match_stderr,strict-match": 0.01, "exact_match,flexible-extract": 0.3},
                              "piqa": {"acc,none": 0.6, "sample_len": 10}}})
    assert got == {"gsm8k/exact_match/strict-match": 0.1, "gsm8k/exact_match/flexible-extract": 0.3, "piqa/acc": 0.6}


def test_an_encoder_decoder_is_scored_as_it_trains_encoder_reads_the_context(tmp_path):
    """The harness's seq2seq split: the encoder reads the context, the decoder starts from bos and
    is scored on the continuation; against log-probs from one direct forward pass per request."""
    config = get_preset("transformer-tiny").model.replace(num_layers=1, d_model=32, num_heads=2, d_ff=64,
                                                          max_len=32, num_valid_tokens=260)
    params = init_params(config, jax.random.key(5))
    tok = ByteTokenizer()
    lm = MatrixMagicLM.from_loaded(config, params, tok, batch_size=2)
    assert lm.backend == "seq2seq"
    rows = [("Errors should never", " pass silently."),
            ("In the face of ambiguity, refuse the temptation to guess. There should be one obvious way", " to do it.")]
    got = lm.loglikelihood(instances("loglikelihood", rows), disable_tqdm=True)
    model = build_model(config)
    for (context, continuation), (logprob, _) in zip(rows, got):
        source = [256, *tok.encode(context)][-config.max_len:]
        target = list(tok.encode(continuation))
        logits = np.asarray(model.apply({"params": params}, np.asarray([source], np.int32),
                                        np.asarray([[tok.bos_id, *target[:-1]]], np.int32)), np.float64)[0]
        logsm = logits - logits.max(-1, keepdims=True)
        logsm = logsm - np.log(np.exp(logsm).sum(-1, keepdims=True))
        assert logprob == pytest.approx(logsm[np.arange(len(target)), target].sum(), abs=1e-4)
    text = lm.generate_until(instances("generate_until", [("Beautiful is", {"until": ["."], "max_gen_toks": 8})]),
                             disable_tqdm=True)
    assert isinstance(text[0], str)
    with pytest.raises(ValueError, match=r"this run.s family \(encoder, BERT-style\) gives none"):
        MatrixMagicLM.from_loaded(get_preset("bert-tiny").model, None, tok)
