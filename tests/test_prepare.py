"""`magic data prepare`: shards that do not depend on workers or interruptions, every source
format, the errors a user meets, and mixtures that are a pure function of (seed, position)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from run_helpers import REPO, TINY, assert_same_log, magic, magic_env, train_rows, wait_for, write_corpus

from matrixmagic.configs import ConfigError
from matrixmagic.configs.train_config import DataConfig, parse_mixture
from matrixmagic.train.data import pipeline as P
from matrixmagic.train.data import prepare as prep
from matrixmagic.train.data import records
from matrixmagic.train.data import shards as S
from matrixmagic.train.data.corpus import assign_splits
from matrixmagic.train.data.mixture import Mixture
from matrixmagic.train.data.sources import CorpusError
from matrixmagic.train.data.tokenizers import ByteTokenizer

BYTES = ByteTokenizer()


def files_of(out) -> dict[str, bytes]:
    """Every visible file's bytes: shards, .json records, plan and index."""
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if not n.startswith(".")}


def stream_of(out, split) -> np.ndarray:
    stream = S.open_prepared(str(out)).stream(split)
    return stream.read_rows(np.array([0]), stream.total, BYTES.pad_id)[0].astype(np.int64)


def expected_stream(docs) -> np.ndarray:
    """The packing rule, written out: [eot, *utf-8 bytes] per document, in order."""
    parts = [np.concatenate([[BYTES.eot_id], BYTES.encode(d)]) for d in docs]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """60 text files of 0.5-4 kB in nested folders: 4 kB shards make ~15 tasks."""
    root = tmp_path_factory.mktemp("texts")
    rng = np.random.default_rng(0)
    for i in range(60):
        folder = root / f"part{i % 3}"
        folder.mkdir(exist_ok=True)
        (folder / f"doc{i:02d}.txt").write_text("".join(rng.choice(list("abcdefgh ij\né"), int(rng.integers(500, 4000)))))
    return root


def run_prepare(source, out, workers=0, **kw):
    return prep.prepare(str(source), str(out), BYTES, workers=workers, progress=False, **kw)


# ----------------------------------------------------------------------------- shards


def test_text_stream_is_the_documents_in_path_order_split_by_path_hash(texts, tmp_path):
    run_prepare(texts, tmp_path / "out", shard_mb=0.004)
    relpaths = sorted(str(p.relative_to(texts)) for p in texts.rglob("*.txt"))
    splits = assign_splits(relpaths, 0.015)
    for split in ("train", "validation"):
        docs = [(texts / p).read_text() for p in splits[split]]
        np.testing.assert_array_equal(stream_of(tmp_path / "out", split), expected_stream(docs))
    index = json.loads((tmp_path / "out" / S.INDEX).read_text())
    assert len(index["splits"]["train"]["shards"]) > 10 and index["dtype"] == "uint16"


def test_shards_do_not_depend_on_the_worker_count(texts, tmp_path):
    run_prepare(texts, tmp_path / "w0", workers=0, shard_mb=0.004)
    run_prepare(texts, tmp_path / "w2", workers=2, shard_mb=0.004)
    assert files_of(tmp_path / "w0") == files_of(tmp_path / "w2")


def test_interrupted_prepare_resumes_to_identical_shards(texts, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    run_prepare(texts, clean, shard_mb=0.004)
    out, ran, real = tmp_path / "out", [], prep.run_task

    def dies_at_the_fifth(source, task, *args, **kw):
        if len(ran) == 4:  # a shard half written, as a kill leaves it
            writer = S.ShardWriter(str(out), "train", task.index, BYTES.eot_id, np.uint16)
            writer.add(np.arange(10))
            raise KeyboardInterrupt
        ran.append(task.index)
        return real(source, task, *args, **kw)

    monkeypatch.setattr(prep, "run_task", dies_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(texts, out, shard_mb=0.004)
    assert not (out / S.INDEX).exists() and any(n.endswith(".tmp") for n in os.listdir(out))
    # A record a killed process was writing through storage.write_text (NAME.tmp-PID): a SIGKILL
    # can land there too; the rerun removes it once that process is gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f"train-00004.json.tmp-{dead.pid}").write_text("")
    monkeypatch.setattr(prep, "run_task", real)
    result = run_prepare(texts, out, shard_mb=0.004)
    assert result.ran == len(result.index["splits"]["train"]["shards"]) - 4  # only the unfinished tasks
    assert files_of(out) == files_of(clean)
    assert not any(n.endswith(".tmp") for n in os.listdir(out))
    assert run_prepare(texts, out, shard_mb=0.004).ran == 0  # finished: nothing to do


def test_killed_prepare_command_then_rerun_gives_identical_shards(texts, tmp_path):
    """SIGKILL the real command (2 worker processes) once shards exist, rerun it, compare bytes."""
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert magic("data", "prepare", texts, "--out", clean, "--workers", "1", "--shard-mb", "0.002",
                 "--quiet").returncode == 0
    argv = [sys.executable, "-m", "matrixmagic.train.cli", "data", "prepare", str(texts), "--out", str(out),
            "--workers", "2", "--shard-mb", "0.002", "--quiet"]
    proc = subprocess.Popen(argv, env=magic_env(), cwd=REPO, start_new_session=True)
    started = wait_for(lambda: out.is_dir() and any(n.endswith(".json") and n[0] == "t" for n in os.listdir(out)),
                       proc, timeout=120, poll=0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert started and not (out / S.INDEX).exists(), "the prepare ended before the kill"
    done = magic("data", "prepare", texts, "--out", out, "--workers", "2", "--shard-mb", "0.002", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert files_of(out) == files_of(clean)


def test_truncated_shard_is_named_and_rewritten_by_a_rerun(texts, tmp_path):
    out = tmp_path / "out"
    run_prepare(texts, out, shard_mb=0.004)
    good = files_of(out)
    shard = out / "train-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(CorpusError, match=r"train-00002\.bin has [\d,]+ bytes, its index says"):
        S.open_prepared(str(out))
    (out / S.INDEX).unlink()  # what a rerun after a cut-short copy does: only that shard is redone
    assert run_prepare(texts, out, shard_mb=0.004).ran == 1 and files_of(out) == good


def test_a_changed_source_never_mixes_with_old_shards(texts, tmp_path):
    out = tmp_path / "out"
    run_prepare(texts, out, shard_mb=0.004)
    before = files_of(out)
    with pytest.raises(CorpusError, match="holds prepared data of another source"):
        run_prepare(texts, out, shard_mb=0.008)  # another plan
    assert files_of(out) == before


# ----------------------------------------------------------------------------- formats


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_jsonl_lines_in_order_whatever_the_byte_ranges(tmp_path):
    rng = np.random.default_rng(1)
    texts = ["".join(rng.choice(list("xyz é\n\"{}"), int(rng.integers(0, 300)))) for _ in range(400)]
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"text": t, "n": i} for i, t in enumerate(texts[:250])])
    write_jsonl(src / "b.jsonl", [{"text": t} for t in texts[250:]])
    (src / "b.jsonl").write_text((src / "b.jsonl").read_text() + "\n")  # a blank line is skipped
    streams = {}
    for mb in (0.0005, 0.003, 10):  # ranges that cut lines everywhere, and one task per file
        out = tmp_path / f"out{mb}"
        run_prepare(src, out, shard_mb=mb, validation_fraction=0.1)
        streams[mb] = {s: stream_of(out, s) for s in ("train", "validation")}
        index = json.loads((out / S.INDEX).read_text())
        assert sum(index["splits"][s]["documents"] for s in ("train", "validation")) == 400
    for s in ("train", "validation"):
        assert all(np.array_equal(streams[0.0005][s], other[s]) for other in streams.values())
    both = np.concatenate([streams[10]["train"], streams[10]["validation"]])
    assert len(both) == len(expected_stream(texts))  # every line once, in one split
    assert 0 < len(streams[10]["validation"]) < len(streams[10]["train"])


def test_parquet_row_groups_in_order(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"row {i} " + "ab" * (i % 17) for i in range(300)]
    pq.write_table(pa.table({"body": texts, "id": list(range(300))}), tmp_path / "t.parquet", row_group_size=40)
    out = tmp_path / "out"
    run_prepare(tmp_path / "t.parquet", out, text_field="body", shard_mb=0.001, validation_fraction=0.2)
    train, validation = stream_of(out, "train"), stream_of(out, "validation")
    assert len(train) + len(validation) == len(expected_stream(texts))
    held = [t for g in range(8) for r, t in enumerate(texts[g * 40:(g + 1) * 40])
            if records.is_validation(f"t.parquet#{g}:{r}", 0.2)]
    np.testing.assert_array_equal(validation, expected_stream(held))
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: \['body', 'id'\]\): pass --text-field"):
        run_prepare(tmp_path / "t.parquet", tmp_path / "o2")
    with pytest.raises(CorpusError, match="--out .* lies inside the source"):
        run_prepare(tmp_path, tmp_path / "o3", pattern="*.parquet", text_field="body")


def test_bad_sources_fail_before_any_work(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="has no readable files"):
        run_prepare(tmp_path / "empty", tmp_path / "o")
    (tmp_path / "blank").mkdir()
    for n in "ab":
        (tmp_path / "blank" / f"{n}.txt").write_text("")
    with pytest.raises(CorpusError, match="are all empty"):
        run_prepare(tmp_path / "blank", tmp_path / "o")
    (tmp_path / "j").mkdir()
    write_jsonl(tmp_path / "j" / "a.jsonl", [{"content": "x"}])
    with pytest.raises(CorpusError, match=r"a\.jsonl at byte 0: no field 'text' \(the line has \['content'\]\)"):
        run_prepare(tmp_path / "j", tmp_path / "o")
    (tmp_path / "j" / "a.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"a\.jsonl at byte 17: not a JSON line"):
        run_prepare(tmp_path / "j", tmp_path / "o")
    (tmp_path / "j" / "a.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "j" / "README.md").write_text("about")
    with pytest.raises(CorpusError, match=r"mixes 1 \.jsonl file\(s\) with 1 other\(s\) \(e\.g\. README\.md\)"):
        run_prepare(tmp_path / "j", tmp_path / "o")
    (tmp_path / "j" / "b.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(CorpusError, match=r"1 compressed file\(s\) \(b\.jsonl\.gz, \.\.\.\): decompress"):
        run_prepare(tmp_path / "j", tmp_path / "o", pattern="*.jsonl*")
    assert not (tmp_path / "o" / S.INDEX).exists()
    (tmp_path / "j" / "old").mkdir()  # a single file is that file, not same-named files below its folder
    write_jsonl(tmp_path / "j" / "old" / "a.jsonl", [{"text": "old"}])
    with pytest.warns(UserWarning, match="no document fell in the validation split"):  # 1 line, 40%: none held out
        single = run_prepare(tmp_path / "j" / "a.jsonl", tmp_path / "o2", validation_fraction=0.4)
    assert single.index["source"]["files"].startswith("1 files")


def test_training_checks_the_tokenizer_and_reads_any_row_length(texts, tmp_path):
    out = tmp_path / "out"
    run_prepare(texts, out, shard_mb=0.004)
    index = json.loads((out / S.INDEX).read_text())
    index["tokenizer"] = "sp-0123456789ab"
    (out / S.INDEX).write_text(json.dumps(index))
    with pytest.raises(CorpusError, match="prepared with tokenizer 'sp-0123456789ab'.*--set data.tokenizer=bytes"):
        P.make_pipeline("decoder", str(out), "bytes", 16, 8, process_index=0, process_count=1)


# ----------------------------------------------------------------------------- mixtures


def test_mixture_weights_hold_within_sampling_error():
    mix = Mixture(["a", "b", "c"], [0.7, 0.2, 0.1], seed=3)
    n = 10_000
    counts = np.bincount(mix.source_of(np.arange(n)), minlength=3)
    p = np.array([0.7, 0.2, 0.1])
    assert (np.abs(counts - n * p) < 4 * np.sqrt(n * p * (1 - p))).all(), counts  # 4 binomial sigmas
    assert mix.rows_before(n).tolist() == counts.tolist()
    assert mix.rows_before(n // 2).tolist() == np.bincount(mix.source_of(np.arange(n // 2)), minlength=3).tolist()
    other = Mixture(["a", "b", "c"], [0.7, 0.2, 0.1], seed=4).source_of(np.arange(n))
    assert (other != mix.source_of(np.arange(n))).mean() > 0.3  # the seed matters


def test_mixture_config_errors_name_the_field():
    assert parse_mixture("code:0.7, prose:0.3") == (("code", 0.7), ("prose", 0.3))
    for bad, words in [("code", "NAME:WEIGHT pairs"), ("code:x", "NAME:WEIGHT pairs"), ("a:0,b:0", "sum to 0"),
                       ("a:1,a:2", "name each source once"), ("a:-1", ">= 0"), ("a:nan", "finite")]:
        with pytest.raises(ConfigError, match=f"data.mixture={bad!r}.*{words}"):
            DataConfig(mixture=bad)
    with pytest.raises(ConfigError, match="drop data.source"):
        DataConfig(mixture="a:1", source="/x")
    with pytest.raises(ConfigError, match="data.tokenizer='sentencepiece'.*give the .model path"):
        DataConfig(mixture="a:1", tokenizer="sentencepiece")


@pytest.fixture(scope="module")
def named(tmp_path_factory, texts):
    """Two sources prepared by name in one data dir: 'code' (text files), 'prose' (JSONL)."""
    data = tmp_path_factory.mktemp("data")
    jsonl = tmp_path_factory.mktemp("jsonl")
    write_jsonl(jsonl / "p.jsonl", [{"text": f"line {i} " + "qrs " * (i % 40)} for i in range(600)])
    run_prepare(texts, P.prepared_root("code", str(data)), shard_mb=0.004)
    run_prepare(jsonl, P.prepared_root("prose", str(data)), shard_mb=0.004, validation_fraction=0.05)
    return str(data)


def mix_pipe(data, process_index=0, process_count=1, seed=5, mixture="code:0.7,prose:0.3"):
    return P.make_pipeline("decoder", "stdlib", "bytes", 32, 8, seed, data, process_index, process_count,
                           mixture=mixture)


def test_mixture_batches_are_a_function_of_seed_and_step_on_any_host_count(named):
    one = mix_pipe(named)
    halves = [mix_pipe(named, p, 2) for p in range(2)]
    for step in (0, 1, 7, 123):
        whole = one.batch(step)
        split = [h.batch(step) for h in halves]
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([s[key] for s in split]), err_msg=key)
    again = mix_pipe(named)  # a resumed run's pipeline: no state carried
    assert all(np.array_equal(again.batch(9)[k], one.batch(9)[k]) for k in one.batch(9))
    assert not np.array_equal(mix_pipe(named, seed=6).batch(9)["inputs"], one.batch(9)["inputs"])


def test_mixture_rows_come_from_their_sources(named):
    pipe = mix_pipe(named)
    code, prose = (S.open_prepared(P.prepared_root(n, named)).rows("train", 33) for n in ("code", "prose"))
    code_rows = {tuple(r) for r in code[np.arange(len(code))]}
    prose_rows = {tuple(r) for r in prose[np.arange(len(prose))]}
    positions = np.arange(40 * 8)
    source = pipe.mixture.source_of(positions)
    rows = np.concatenate([np.concatenate([pipe.batch(s)["inputs"][:, :1], pipe.batch(s)["targets"]], 1)
                           for s in range(40)])
    for row, j in zip(rows, source):
        assert tuple(row) in (code_rows if j == 0 else prose_rows)
    counts = pipe.rows_by_source(40)
    assert counts == {"code": int((source == 0).sum()), "prose": int((source == 1).sum())}


def test_each_mixture_source_is_read_without_repeats_within_its_epoch(named):
    pipe = mix_pipe(named, mixture="code:0.5,prose:0.5")
    n, seen, step = len(pipe.sources["prose"]), [], 0
    while len(seen) < n:
        source, index = pipe.source_positions(step, pipe.positions(step))
        seen += index[source == 1].tolist()
        step += 1
    assert sorted(seen[:n]) == list(range(n))  # positions 0..n-1 of prose's own permutation: every row once


def test_mixture_eval_is_per_source_and_unknown_names_are_listed(named):
    sets = P.make_eval_sets("decoder", "stdlib", "bytes", 32, 8, 0, named, 0, 1, num_eval_batches=2,
                            mixture="code:1,prose:1")
    assert sorted(sets) == ["code", "prose"] and all(len(b) >= 1 for b in sets.values())
    with pytest.raises(CorpusError, match=r"names \['poetry'\], not prepared .*prepared there: \['code', 'prose'\]"):
        mix_pipe(named, mixture="code:1,poetry:1")


def test_mixture_run_resumes_bit_exactly_with_tokens_per_source(named, tmp_path):
    """A killed mixture run, rerun, logs what an uninterrupted one logs, per-source counts included."""
    def argv(workdir, mixture="code:0.6,prose:0.4"):
        sets = [*TINY, f"data.mixture={mixture}", f"data.data_dir={named}", "steps=12", "checkpoint_every=3"]
        return [sys.executable, "-m", "matrixmagic.train.cli", "train", "--workdir", str(workdir),
                *[a for s in sets for a in ("--set", s)]]

    clean = tmp_path / "clean"
    assert subprocess.run(argv(clean), env=magic_env(), cwd=REPO, capture_output=True).returncode == 0
    workdir = tmp_path / "run"
    proc = subprocess.Popen(argv(workdir), env=magic_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed = wait_for(lambda: (workdir / "metrics.jsonl").exists() and len(train_rows(workdir)) >= 7, proc)
    proc.kill()
    proc.wait(30)
    assert killed, "the run ended before the kill"
    assert subprocess.run(argv(workdir), env=magic_env(), cwd=REPO, capture_output=True).returncode == 0
    keys = ("loss", "grad_norm", "tokens_seen", "tokens_seen/code", "tokens_seen/prose")
    assert_same_log(train_rows(workdir), train_rows(clean), 12, keys=keys)
    last = train_rows(clean)[-1]
    assert last["tokens_seen/code"] + last["tokens_seen/prose"] == last["tokens_seen"]
    changed = subprocess.run(argv(workdir, "code:0.5,prose:0.5"), env=magic_env(), cwd=REPO, capture_output=True,
                             text=True)
    assert changed.returncode == 2 and "data.mixture" in changed.stderr, changed.stderr[-2000:]


def test_prepare_command_then_train_on_the_prepared_name(tmp_path):
    corpus = write_corpus(tmp_path / "src", n=40)
    data = tmp_path / "data"
    done = magic("data", "prepare", corpus, "--name", "mine", "--data-dir", data, "--workers", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train on it: magic train --set data.source=prepared:mine" in done.stdout
    assert "MB/s" in done.stdout and "preparing" in done.stderr  # the progress bar
    run = subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", "train", "--workdir", str(tmp_path / "w"),
                          *[a for s in [*TINY, "data.source=prepared:mine", f"data.data_dir={data}", "steps=2"]
                            for a in ("--set", s)]], env=magic_env(), cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    bad = magic("data", "prepare", corpus, "--name", "a/b")
    assert bad.returncode == 2 and "--name 'a/b' is invalid" in bad.stderr and "Traceback" not in bad.stderr
