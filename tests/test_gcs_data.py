"""A run's data in Cloud Storage, against a real GCS server on 127.0.0.1 (tests/gcs_server.py):
`data.source` a gs:// prefix of text files, `data.data_dir` (and $MATRIXMAGIC_DATA_DIR) a bucket,
`data.tokenizer` a SentencePiece model in it (train/data/sources.py, remote.py).

Each result is compared with the same files on local disk: the same documents in the same
splits, the same batches, the same losses. The pipeline tests run in this process against one
server (STORAGE_EMULATOR_HOST, plus the variable array_record's reader reads, set by the
fixture); `magic train` and the error cases run as subprocesses with only STORAGE_EMULATOR_HOST,
as a user runs them. No test leaves a local folder whose name starts with `gs:`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gcs_helpers import GcsServer, gs_dirs
from run_helpers import REPO, TINY, magic_env, metrics_rows, write_corpus

from matrixmagic.configs import ConfigError
from matrixmagic.train import storage
from matrixmagic.train.data import corpus as C
from matrixmagic.train.data import pipeline as P
from matrixmagic.train.data import shards as S
from matrixmagic.train.data.tokenizers import TokenizerError, load_tokenizer

NO_GOOGLE = {"NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}
STORAGE_VARS = (storage.EMULATOR_ENV, "CLOUD_STORAGE_EMULATOR_ENDPOINT", "TENSORSTORE_GCS_HTTP_URL",
                "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_APPLICATION_CREDENTIALS", C.DATA_DIR_ENV)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """One server for the module; this process's storage variables point at it."""
    mp = pytest.MonkeyPatch()
    with GcsServer(log=str(tmp_path_factory.mktemp("gcs") / "gcs.log")) as server:
        for key in STORAGE_VARS:
            mp.delenv(key, raising=False)
        mp.setenv(storage.EMULATOR_ENV, server.url)
        storage.use_emulator()  # what importing train/storage.py does in a fresh process
        yield server
        mp.undo()
    assert not gs_dirs(REPO, tmp_path_factory.getbasetemp(), os.getcwd()), "a gs:// URL was taken for a local folder"


@pytest.fixture(scope="module")
def texts(gcs, tmp_path_factory) -> str:
    """The local corpus, also uploaded under gs://bkt/texts, with what a listing must skip."""
    local = write_corpus(tmp_path_factory.mktemp("texts"), n=24)
    os.makedirs(os.path.join(local, "sub"))
    os.makedirs(os.path.join(local, ".hidden"))
    os.makedirs(os.path.join(local, "__pycache__"))
    for rel, text in (("sub/nested.txt", "a nested document\n" * 9), (".hidden/skipped.txt", "hidden"),
                      ("__pycache__/skipped.txt", "cache"), (".dotfile", "dot")):
        with open(os.path.join(local, rel), "w") as f:
            f.write(text)
    upload_dir(local, "gs://bkt/texts")
    return local


def upload_dir(local: str, url: str) -> None:
    for root, _, files in os.walk(local):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(url, os.path.relpath(path, local)), f.read())


@pytest.fixture(autouse=True)
def no_gs_folders(tmp_path):
    yield
    assert not gs_dirs(REPO, tmp_path, os.getcwd()), "a gs:// URL was taken for a local folder"


def generations(server: GcsServer, prefix: str) -> dict:
    """{object: generation} below prefix: equal snapshots mean nothing was written."""
    import urllib.parse
    import urllib.request

    url = f"{server.url}/storage/v1/b/{server.bucket}/o?{urllib.parse.urlencode({'prefix': prefix})}"
    return {o["name"]: o["generation"] for o in json.load(urllib.request.urlopen(url, timeout=10)).get("items", [])}


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def batches(source, data_dir, process_index=0, process_count=1, **kw) -> tuple[list, list]:
    args = dict(source=source, data_dir=data_dir, seq_len=16, batch_size=4, process_index=process_index,
                process_count=process_count, **kw)
    train = P.make_pipeline(**args)
    return [train.batch(s) for s in range(6)], P.make_eval_batches(num_eval_batches=3, **args)


# ----------------------------------------------------------------------------- in this process


def test_gs_prefix_gives_the_local_directorys_documents_splits_and_batches(gcs, texts, tmp_path):
    local = C.open_corpus(texts, tmp_path / "local")
    remote_ = C.open_corpus("gs://bkt/texts/", tmp_path / "remote")  # a trailing slash is the same prefix
    assert remote_.name == "gs://bkt/texts"
    assert remote_.fingerprint["files"] == local.fingerprint["files"]  # same names and sizes
    assert "25 files" in local.fingerprint["files"]  # 24 + sub/nested.txt; hidden, cache and dot files skipped
    for split in ("train", "validation"):
        assert list(remote_.documents(split)) == list(local.documents(split))
    assert same_batches(batches(texts, tmp_path / "local")[0], batches("gs://bkt/texts", tmp_path / "remote")[0])
    assert same_batches(batches(texts, tmp_path / "local")[1], batches("gs://bkt/texts", tmp_path / "remote")[1])


def test_an_edited_object_gets_a_new_dataset(gcs, texts, tmp_path):
    upload_dir(texts, "gs://bkt/edited")
    before = C.open_corpus("gs://bkt/edited", tmp_path)
    storage.write_bytes("gs://bkt/edited/doc00.txt", b"rewritten with another generation")
    after = C.open_corpus("gs://bkt/edited", tmp_path)
    assert before.directory != after.directory  # the fingerprint holds each object's generation
    assert "rewritten with another generation" in [*after.documents("train"), *after.documents("validation")]


def test_gs_data_dir_is_built_once_then_only_read(gcs, texts, tmp_path, capsys):
    local_train, local_eval = batches(texts, tmp_path / "local")
    capsys.readouterr()
    first = batches("gs://bkt/texts", "gs://bkt/tfds")
    assert "building the texts dataset" in capsys.readouterr().out
    objects = generations(gcs, "tfds/")
    version = [n for n in objects if n.endswith("/dataset_info.json")]
    assert len(version) == 1, objects
    folder = version[0].rsplit("/", 1)[0]
    assert {f"{folder}/features.json", f"{folder}/prepared/bytes/matrixmagic-shards.json",
            f"{folder}/prepared/bytes/train-00000.bin", f"{folder}/prepared/bytes/validation-00001.bin"} <= set(objects)
    assert same_batches(first[0], local_train) and same_batches(first[1], local_eval)

    # A second run (and a pod's other hosts) read the bucket: nothing built, written or staged locally.
    again = batches("gs://bkt/texts", "gs://bkt/tfds")
    other_host = batches("gs://bkt/texts", "gs://bkt/tfds", process_index=1, process_count=2)
    assert "building" not in capsys.readouterr().out
    assert generations(gcs, "tfds/") == objects
    assert same_batches(again[0], local_train) and same_batches(again[1], local_eval)
    for mine, whole in zip(other_host[0], local_train):  # process 1 of 2: the second half of each batch
        assert all(np.array_equal(mine[k], whole[k][2:]) for k in mine)


def test_matrixmagic_data_dir_may_be_a_bucket(gcs, texts, monkeypatch, capsys):
    monkeypatch.setenv(C.DATA_DIR_ENV, "gs://bkt/env-tfds/")
    corpus = C.open_corpus("gs://bkt/texts")
    assert str(corpus.directory).startswith("gs://bkt/env-tfds/text_files/texts_")
    assert "into gs://bkt/env-tfds/" in capsys.readouterr().out
    assert any(n.endswith("/dataset_info.json") for n in gcs.objects("env-tfds/"))


def test_gs_sentencepiece_model_beside_the_dataset_and_as_data_tokenizer(gcs, texts, tmp_path):
    corpus = C.open_corpus("gs://bkt/texts", "gs://bkt/tfds")
    trained = P.prepare_tokenizer(corpus, "sentencepiece", vocab_size=300, model_type="unigram")
    model = f"{corpus.directory}/sentencepiece.model"
    assert storage.exists(model)
    beside = P.open_tokenizer("sentencepiece", "gs://bkt/texts", "gs://bkt/tfds")  # data.tokenizer=sentencepiece
    storage.write_bytes("gs://bkt/sp.model", storage.read_bytes(model))
    local_copy = tmp_path / "sp.model"
    local_copy.write_bytes(storage.read_bytes(model))
    named, local = load_tokenizer("gs://bkt/sp.model"), load_tokenizer(str(local_copy))
    text = "abc def\nghij"
    assert trained.cache_key == beside.cache_key == named.cache_key == local.cache_key
    assert np.array_equal(named.encode(text), local.encode(text)) and named.decode(named.encode(text)) == text
    rows = P.make_pipeline(source="gs://bkt/texts", data_dir="gs://bkt/tfds", tokenizer="gs://bkt/sp.model",
                           seq_len=16, batch_size=4, process_index=0, process_count=1)
    assert rows.fingerprint["tokenizer"] == local.cache_key
    assert any(f"prepared/{local.cache_key}/{S.INDEX}" in n for n in gcs.objects("tfds/"))


def test_bad_gs_inputs_name_the_field(gcs, texts, tmp_path, monkeypatch):
    with pytest.raises(C.CorpusError, match=r"data.source='gs://bkt/nothing' has no files matching pattern='\*'"):
        C.open_corpus("gs://bkt/nothing", tmp_path)
    with pytest.raises(C.CorpusError, match=r"data.source='gs://bkt/texts' has no files matching pattern='\*.md'"):
        C.open_corpus("gs://bkt/texts", tmp_path, pattern="*.md")
    with pytest.raises(ConfigError, match=r"data.source='gs://no-such-bucket/texts': the bucket gs://no-such-bucket "
                                          r"does not exist"):
        C.open_corpus("gs://no-such-bucket/texts", tmp_path)
    with pytest.raises(ConfigError, match=r"data.data_dir='gs://no-such-bucket/tfds': the bucket"):
        C.open_corpus(texts, "gs://no-such-bucket/tfds")
    with pytest.raises(ConfigError, match=r"data.source='s3://bkt/texts': the s3:// scheme is not supported"):
        C.open_corpus("s3://bkt/texts", tmp_path)
    with pytest.raises(ConfigError, match=r"data.tokenizer='gs://no-such-bucket/sp.model': the bucket"):
        load_tokenizer("gs://no-such-bucket/sp.model")
    with pytest.raises(TokenizerError, match=r"model_path='gs://bkt/missing.model' does not exist"):
        load_tokenizer("gs://bkt/missing.model")
    monkeypatch.setenv(C.DATA_DIR_ENV, "gs://no-such-bucket/tfds")
    with pytest.raises(ConfigError, match=rf"{C.DATA_DIR_ENV}='gs://no-such-bucket/tfds': the bucket"):
        C.open_corpus(texts)
    assert issubclass(C.CorpusError, ConfigError)  # every corpus error is a config error: exit 2, one line


# ----------------------------------------------------------------------------- `magic` as a user runs it


def magic(*args, env: dict, cwd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", *map(str, args)], env=env, check=False,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def train_args(workdir, *sets: str) -> list[str]:
    assignments = [*TINY, "steps=2", "eval_every=2", "eval_batches=2", *sets]
    return ["train", "--workdir", str(workdir), *[a for s in assignments for a in ("--set", s)]]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in magic_env().items() if k not in STORAGE_VARS}
    return {**env, **NO_GOOGLE, **extra}


@pytest.mark.slow
def test_magic_train_on_gs_data_equals_local(gcs, texts, tmp_path):
    """Three runs: local files; the bucket's copy built through $MATRIXMAGIC_DATA_DIR=gs://...; and the
    same dataset named by data.data_dir, found prepared. Same per-step and eval losses, to the bit."""
    env = clean_env(**gcs.env)
    runs = {
        "local": (train_args(tmp_path / "local", f"data.source={texts}", f"data.data_dir={tmp_path / 'tfds'}"), {}),
        "bucket": (train_args(tmp_path / "bucket", "data.source=gs://bkt/texts"),
                   {C.DATA_DIR_ENV: "gs://bkt/train-tfds"}),
        "again": (train_args(tmp_path / "again", "data.source=gs://bkt/texts", "data.data_dir=gs://bkt/train-tfds"),
                  {}),
    }
    losses = {}
    for name, (args, extra) in runs.items():
        done = magic(*args, env={**env, **extra}, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("building the texts dataset" in done.stdout) == (name == "bucket"), done.stdout
        losses[name] = [(r["split"], r["step"], r["loss"]) for r in metrics_rows(tmp_path / name)]
    assert any(split == "eval" for split, _, _ in losses["local"])
    assert losses["bucket"] == losses["local"] == losses["again"]
    assert sorted(os.listdir(tmp_path)) == ["again", "bucket", "local", "tfds"]  # nothing else written here


def test_magic_refuses_a_missing_bucket_or_missing_credentials_in_one_line(gcs, texts, tmp_path):
    cases = {
        "missing bucket": (gcs.env, "data.source=gs://no-such-bucket/texts",
                           "data.source='gs://no-such-bucket/texts': the bucket gs://no-such-bucket does not exist"),
        "no credentials": ({"HOME": str(tmp_path)}, "data.source=gs://bkt/texts",
                           "data.source='gs://bkt/texts' needs Google Cloud credentials (none found)"),
    }  # an empty prefix: test_bad_gs_inputs_name_the_field (the same CorpusError, a ConfigError)
    for name, (extra, source, message) in cases.items():
        done = magic(*train_args(tmp_path / name.replace(" ", "-"), source, f"data.data_dir={tmp_path / 'tfds'}"),
                     env=clean_env(**extra), cwd=tmp_path, timeout=120)
        assert done.returncode == 2, (name, done.stderr[-3000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("magic train: error: ") and message in lines[0], (name, lines)
        assert "building" not in done.stdout


def test_prepare_from_and_into_a_bucket_matches_local_and_trains_the_same(gcs, texts, tmp_path):
    """`magic data prepare gs://... --out gs://...` with 2 worker processes writes the shards a local
    prepare of the same files writes, and a pipeline reads the same batches from either."""
    from matrixmagic.train.data import prepare, shards
    from matrixmagic.train.data.tokenizers import ByteTokenizer

    local = str(tmp_path / "local")
    prepare.prepare(texts, local, ByteTokenizer(), workers=0, shard_mb=0.002, progress=False)
    prepare.prepare("gs://bkt/texts", "gs://bkt/prepared/t", ByteTokenizer(), workers=2, shard_mb=0.002,
                    progress=False)
    names = [n for n in sorted(os.listdir(local)) if n.endswith(".bin") or n[-10:-5].isdigit()]
    assert len(names) > 4 and all(storage.read_bytes(f"gs://bkt/prepared/t/{n}") == Path(local, n).read_bytes()
                                  for n in names)
    assert not [n for n in gcs.objects("prepared/") if n.endswith(".tmp")]
    kwargs = dict(seq_len=16, batch_size=4, seed=3, process_index=0, process_count=1)
    here, there = (P.make_pipeline("decoder", s, "bytes", **kwargs) for s in (local, "gs://bkt/prepared/t"))
    for step in (0, 5):
        assert all(np.array_equal(here.batch(step)[k], there.batch(step)[k]) for k in here.batch(step))
    gone = "prepared/t/train-00001.bin"
    storage.write_bytes(f"gs://bkt/{gone}", b"\0\0")  # a copy cut short
    with pytest.raises(C.CorpusError, match=r"train-00001\.bin has 2 bytes, its index says"):
        shards.open_prepared("gs://bkt/prepared/t")
