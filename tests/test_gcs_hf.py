"""Every other path a run reads or writes, as a gs:// URL, against a real GCS server on 127.0.0.1
(tests/gcs_server.py): `magic hf import` from and into a bucket, `generate` and `hf export` from
the imported run, `magic compile --serialize` / `train --compiled`, and the `--plot` pictures.

Each result is compared with the same command on local disk: the generated text equal, the
exported files byte for byte. Every `magic` is a subprocess with only STORAGE_EMULATOR_HOST
set, as a user runs it; no test leaves a local folder whose name starts with `gs:`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from gcs_helpers import GcsServer, gs_dirs, read_object
from hf_helpers import FIXTURES
from run_helpers import REPO, magic_env, write_code_corpus

from matrixmagic.train.cli import main

pytestmark = pytest.mark.slow

NO_GOOGLE = {"NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}
GENERATE = ("--prompt", "hello world", "--max-new-tokens", "12", "--temperature", "0")
# The compile tests' micro GPT (tests/test_compile.py): compiles in about a second.
MICRO = ("model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.num_layers=2", "model.vocab_size=384",
         "model.max_len=16", "data.seq_len=16", "steps=3", "eval_batches=1", "sample_tokens=0")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    log = tmp_path_factory.mktemp("gcs") / "gcs.log"
    with GcsServer(log=str(log)) as server:
        for name in ("gpt2", "bert"):
            upload_tree(server, os.path.join(FIXTURES, name), f"hf/{name}")
        yield server
    assert not gs_dirs(REPO, tmp_path_factory.getbasetemp()), "a gs:// URL was taken for a local folder"


@pytest.fixture(autouse=True)
def no_gs_folders(tmp_path):
    yield
    assert not gs_dirs(REPO, tmp_path, os.getcwd()), "a gs:// URL was taken for a local folder"


def upload_tree(server: GcsServer, local: str, prefix: str) -> None:
    """Every file below `local` as an object under `prefix` (the JSON API's media upload)."""
    for root, _, files in os.walk(local):
        for name in files:
            path = os.path.join(root, name)
            upload(server, f"{prefix}/{os.path.relpath(path, local)}", Path(path).read_bytes())


def upload(server: GcsServer, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    request = urllib.request.Request(f"{server.url}/upload/storage/v1/b/{server.bucket}/o?{query}", data=data,
                                     method="POST")
    urllib.request.urlopen(request, timeout=30).read()


def magic(server, *args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matrixmagic.train.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, check=False, cwd=cwd, env=magic_env(**server.env, **NO_GOOGLE))


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    return result.stdout


def generated(stdout: str) -> str:
    """The generated text: stdout without the line naming the run (its path differs)."""
    return "\n".join(line for line in stdout.splitlines() if not line.startswith("[")).strip()


def local_files(directory) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = Path(path).read_bytes()
    return out


def bucket_files(server: GcsServer, prefix: str) -> dict[str, bytes]:
    return {name[len(prefix) + 1:]: read_object(server, name) for name in server.objects(prefix + "/")}


# ----------------------------------------------------------------------------- hf import / generate / export


@pytest.fixture(scope="module")
def local_gpt2(gcs, tmp_path_factory) -> dict:
    """The local reference: the fixture imported, generated from and exported on local disk."""
    root = tmp_path_factory.mktemp("local")
    ok(magic(gcs, "hf", "import", os.path.join(FIXTURES, "gpt2"), "--workdir", root / "run"))
    ok(magic(gcs, "hf", "export", "--workdir", root / "run", "--out", root / "export"))
    text = generated(ok(magic(gcs, "generate", "--workdir", root / "run", *GENERATE)))
    return {"run": root / "run", "export": root / "export", "text": text}


@pytest.fixture(scope="module")
def gs_gpt2(gcs) -> str:
    stdout = ok(magic(gcs, "hf", "import", "gs://bkt/hf/gpt2", "--workdir", "gs://bkt/imported/gpt2"))
    assert "-> gs://bkt/imported/gpt2" in stdout
    return "gs://bkt/imported/gpt2"


def test_import_from_and_into_a_bucket_generates_what_a_local_import_does(gcs, gs_gpt2, local_gpt2):
    names = gcs.objects("imported/gpt2/")
    assert "imported/gpt2/checkpoints/0/commit_success.txt" in names, names  # orbax committed step 0
    assert "imported/gpt2/tokenizer.json" in names and not [n for n in names if "importing" in n]
    assert bucket_files(gcs, "imported/gpt2")["tokenizer.json"] == (local_gpt2["run"] / "tokenizer.json").read_bytes()
    text = generated(ok(magic(gcs, "generate", "--workdir", gs_gpt2, *GENERATE)))
    assert text == local_gpt2["text"] and text.startswith("hello world")


def test_export_from_a_bucket_into_a_bucket_is_byte_identical_to_a_local_export(gcs, gs_gpt2, local_gpt2):
    stdout = ok(magic(gcs, "hf", "export", "--workdir", gs_gpt2, "--out", "gs://bkt/exported/gpt2"))
    assert "-> gs://bkt/exported/gpt2" in stdout
    want = local_files(local_gpt2["export"])
    assert sorted(want) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert bucket_files(gcs, "exported/gpt2") == want, "same files, same bytes, no marker left"


def test_sharded_export_to_a_bucket_reimports_from_it(gcs, gs_gpt2, local_gpt2):
    """A model split in shards + index, read back from the bucket shard by shard."""
    ok(magic(gcs, "hf", "export", "--workdir", gs_gpt2, "--out", "gs://bkt/sharded", "--max-shard-size", "40KB"))
    names = gcs.objects("sharded/")
    assert "sharded/model.safetensors.index.json" in names and len([n for n in names if "-of-" in n]) > 1, names
    ok(magic(gcs, "hf", "import", "gs://bkt/sharded", "--workdir", "gs://bkt/reimported"))
    assert generated(ok(magic(gcs, "generate", "--workdir", "gs://bkt/reimported", *GENERATE))) == local_gpt2["text"]


def test_legacy_tokenizer_files_in_a_bucket(gcs, local_gpt2, tmp_path):
    """vocab.json + merges.txt (read by the tokenizers library from local files) from a gs:// folder."""
    ok(magic(gcs, "hf", "import", "gs://bkt/hf/gpt2", "--tokenizer", "gs://bkt/hf/gpt2/legacy",
             "--workdir", tmp_path / "run"))
    assert generated(ok(magic(gcs, "generate", "--workdir", tmp_path / "run", *GENERATE))) == local_gpt2["text"]


def test_a_bucket_target_is_never_overwritten_and_an_interrupted_import_is_cleared(gcs):
    upload(gcs, "taken/keep.txt", b"mine")
    result = magic(gcs, "hf", "import", "gs://bkt/hf/bert", "--workdir", "gs://bkt/taken")
    assert result.returncode == 2 and "already exists and is not empty" in result.stderr, result.stderr
    assert gcs.objects("taken/") == ["taken/keep.txt"]

    # a process killed mid-import: its marker (this host, a pid that is gone) and a part of the run
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    marker = f'{{"host": "{socket.gethostname()}", "pid": {int(gone.stdout)}, "started": "then"}}'
    upload(gcs, "killed/.importing", marker.encode())
    upload(gcs, "killed/tokenizer.json", b"half")
    ok(magic(gcs, "hf", "import", "gs://bkt/hf/bert", "--workdir", "gs://bkt/killed"))
    names = gcs.objects("killed/")
    assert "killed/checkpoints/0/commit_success.txt" in names and "killed/.importing" not in names

    # an import that may still be running (a live pid) is refused, naming how to remove it
    upload(gcs, "running/.importing", f'{{"host": "{socket.gethostname()}", "pid": {os.getpid()}, '
                                      f'"started": "now"}}'.encode())
    result = magic(gcs, "hf", "import", "gs://bkt/hf/bert", "--workdir", "gs://bkt/running")
    assert result.returncode == 2 and "unfinished import" in result.stderr and "gcloud storage rm -r" in result.stderr
    assert gcs.objects("running/") == ["running/.importing"]


def test_a_missing_source_in_a_bucket_is_one_line(gcs):
    result = magic(gcs, "hf", "import", "gs://bkt/nothing/here", "--workdir", "gs://bkt/never")
    assert result.returncode == 2 and "is not a directory" in result.stderr and "Traceback" not in result.stderr
    assert gcs.objects("never/") == []


# ----------------------------------------------------------------------------- compile, plots


def test_compile_serialize_to_a_bucket_then_train_compiled_from_it(gcs, tmp_path):
    corpus = write_code_corpus(tmp_path / "corpus")
    flags = ["--preset", "gpt-tiny", "--batch", "4", "--set", f"data.source={corpus}",
             "--set", f"data.data_dir={tmp_path / 'tfds'}", *[f"--set={a}" for a in MICRO]]
    stdout = ok(magic(gcs, "compile", "--topology", "cpu-1", "--no-calibrate", "--serialize", "gs://bkt/aot/step.bin",
                      *flags))
    assert "serialized the executable to gs://bkt/aot/step.bin" in stdout
    assert gcs.objects("aot/") == ["aot/step.bin"], "the probe object is gone"
    stdout = ok(magic(gcs, "train", "--workdir", tmp_path / "run", "--compiled", "gs://bkt/aot/step.bin", *flags))
    assert "using the serialized train step (no compile)" in stdout and "not used" not in stdout


def test_schedule_and_explain_plots_to_a_bucket(gcs):
    stdout = ok(magic(gcs, "schedule", "--preset", "gpt-tiny", "--plot", "gs://bkt/plots/lr.svg"))
    assert "wrote gs://bkt/plots/lr.svg" in stdout and read_object(gcs, "plots/lr.svg").lstrip().startswith(b"<?xml")
    stdout = ok(magic(gcs, "explain", "--preset", "gpt-tiny", "--text", "hi there", "--plot", "gs://bkt/plots/walk"))
    names = gcs.objects("plots/walk/")
    assert names == ["plots/walk/attention_layer0.png", "plots/walk/causal_mask.png",
                     "plots/walk/positional_encoding.png"], names
    assert all(read_object(gcs, n)[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    assert "wrote gs://bkt/plots/walk/causal_mask.png" in stdout


@pytest.mark.parametrize("argv, flag", [
    (["hf", "import", "s3://b/model", "--workdir", "{tmp}/run"], "source"),
    (["hf", "import", "{fixture}", "--workdir", "s3://b/run"], "--workdir"),
    (["hf", "export", "--workdir", "{tmp}/run", "--out", "s3://b/out"], "--out"),
    (["compile", "--preset", "gpt-tiny", "--topology", "cpu-1", "--serialize", "s3://b/step.bin"], "--serialize"),
    (["schedule", "--preset", "gpt-tiny", "--plot", "s3://b/lr.png"], "--plot"),
    (["explain", "--preset", "gpt-tiny", "--plot", "gcs://b/plots"], "--plot"),
])
def test_another_scheme_is_refused_naming_the_flag(argv, flag, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, fixture=os.path.join(FIXTURES, "gpt2")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flag}=" in err and "scheme is not supported" in err and "Traceback" not in err, err
    assert not os.listdir(tmp_path)
