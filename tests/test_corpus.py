"""Corpus: local directories and catalog datasets as array_record TFDS datasets."""

import os
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds

from matrixmagic.train.data import corpus as C
from matrixmagic.train.data import pipeline as P


def write_corpus(root, count=30):
    for i in range(count):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"# module {i} é\n" + f"x{i} = {i}\n" * (i + 1), encoding="utf-8")
    return root


@pytest.fixture
def corpus_dir(tmp_path):
    return write_corpus(tmp_path / "src")


def dataset_files(directory):
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir() if p.is_file()}


def test_builds_splits_and_records_paths(corpus_dir, tmp_path):
    corpus = C.open_corpus(corpus_dir, tmp_path / "data")
    assert corpus.directory.is_relative_to(tmp_path / "data")
    n_train, n_val = corpus.num_documents("train"), corpus.num_documents("validation")
    assert n_val >= 1 and n_train >= 1 and n_train + n_val == 30
    texts = sorted(corpus.documents("train")) + sorted(corpus.documents("validation"))
    expected = sorted(p.read_text(encoding="utf-8") for p in corpus_dir.rglob("*.py"))
    assert sorted(texts) == expected
    record = corpus.sources["validation"][0]
    assert (corpus_dir / record["path"].decode()).read_bytes() == record["text"]
    with pytest.raises(C.CorpusError, match="split='test'"):
        list(corpus.documents("test"))


def test_split_is_a_pure_function_of_the_path():
    paths = [f"d/f{i}.txt" for i in range(2000)]
    splits = C.assign_splits(paths, 0.015)
    assert splits == C.assign_splits(list(reversed(paths)), 0.015)
    assert 10 <= len(splits["validation"]) <= 60
    more = C.assign_splits(paths + ["new.txt"], 0.015)  # adding a file moves no other file
    assert set(splits["validation"]) <= set(more["validation"]) | {"new.txt"}
    assert set(splits["validation"]) == set(more["validation"]) - {"new.txt"}
    tiny = C.assign_splits(["a", "b"], 0.015)
    assert len(tiny["validation"]) == 1 and len(tiny["train"]) == 1
    with pytest.raises(C.CorpusError, match="at least 2"):
        C.assign_splits(["a"], 0.015)


def test_second_open_uses_the_cache(corpus_dir, tmp_path, monkeypatch):
    first = C.open_corpus(corpus_dir, tmp_path / "data")
    before = dataset_files(first.directory)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a prepared dataset")

    monkeypatch.setattr(C.TextFiles, "download_and_prepare", no_rebuild)
    second = C.open_corpus(corpus_dir, tmp_path / "data")
    assert second.directory == first.directory
    assert dataset_files(second.directory) == before


def test_sources_do_not_collide_and_edits_rebuild(tmp_path):
    a = C.open_corpus(write_corpus(tmp_path / "a" / "src"), tmp_path / "data")
    b = C.open_corpus(write_corpus(tmp_path / "b" / "src"), tmp_path / "data")
    assert a.directory != b.directory
    (tmp_path / "a" / "src" / "pkg0" / "mod0.py").write_text("changed contents\n")
    edited = C.open_corpus(tmp_path / "a" / "src", tmp_path / "data")
    assert edited.directory != a.directory and a.directory.is_dir()
    assert "changed contents\n" in set(edited.documents("train")) | set(edited.documents("validation"))


def test_failed_build_leaves_prepared_dataset_alone(corpus_dir, tmp_path, monkeypatch):
    good = C.open_corpus(corpus_dir, tmp_path / "data")
    before = dataset_files(good.directory)
    (corpus_dir / "late.py").write_text("y = 1\n")

    def broken(self, paths):
        raise OSError("disk on fire")
        yield

    monkeypatch.setattr(C.TextFiles, "_generate_examples", broken)
    with pytest.raises(C.CorpusError, match="building the dataset .* failed: disk on fire"):
        C.open_corpus(corpus_dir, tmp_path / "data")
    monkeypatch.undo()
    assert dataset_files(good.directory) == before
    (corpus_dir / "late.py").unlink()
    assert C.open_corpus(corpus_dir, tmp_path / "data").directory == good.directory


def test_missing_or_empty_source_fails_fast(tmp_path):
    with pytest.raises(C.CorpusError, match="source=.*is not a directory.*'stdlib'"):
        C.open_corpus(tmp_path / "nope", tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.CorpusError, match="holds no files to read .*any name or extension"):
        C.open_corpus(tmp_path / "empty", tmp_path / "data")
    write_corpus(tmp_path / "src", 3)
    with pytest.raises(C.CorpusError, match="pattern='\\*.txt'"):
        C.open_corpus(tmp_path / "src", tmp_path / "data", pattern="*.txt")
    with pytest.raises(C.CorpusError, match="pattern='a/\\*.py'"):
        C.open_corpus(tmp_path / "src", tmp_path / "data", pattern="a/*.py")
    with pytest.raises(C.CorpusError, match="validation_fraction=0.7"):
        C.open_corpus(tmp_path / "src", tmp_path / "data", validation_fraction=0.7)
    assert not (tmp_path / "data").exists()  # nothing was built


def test_hidden_and_cache_dirs_are_skipped(corpus_dir):
    (corpus_dir / ".git").mkdir()
    (corpus_dir / ".git" / "objects.py").write_bytes(b"\x00\x01")
    (corpus_dir / "__pycache__").mkdir()
    (corpus_dir / "__pycache__" / "mod.py").write_text("stale")
    (corpus_dir / ".hidden.py").write_text("h")
    files = C.list_files(corpus_dir, "**/*.py")
    assert len(files) == 30 and not any(f.startswith((".", "__pycache__")) for f in files)


def test_unreadable_files_are_skipped_with_a_warning(corpus_dir, tmp_path):
    os.symlink(tmp_path / "gone.py", corpus_dir / "dangling.py")
    with pytest.warns(C.CorpusWarning, match="unreadable file.*dangling.py"):
        corpus = C.open_corpus(corpus_dir, tmp_path / "data")
    assert corpus.num_documents("train") + corpus.num_documents("validation") == 30


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_permission_denied_file_is_skipped(corpus_dir, tmp_path):
    locked = corpus_dir / "locked.py"
    locked.write_text("secret")
    locked.chmod(0)
    with pytest.warns(C.CorpusWarning, match="locked.py"):
        C.open_corpus(corpus_dir, tmp_path / "data")


def test_all_unreadable_is_an_error(tmp_path):
    (tmp_path / "src").mkdir()
    os.symlink(tmp_path / "gone.py", tmp_path / "src" / "a.py")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", C.CorpusWarning)
        with pytest.raises(C.CorpusError, match="none of its files is readable"):
            C.open_corpus(tmp_path / "src", tmp_path / "data")


def test_non_utf8_bytes_are_replaced_and_counted(corpus_dir, tmp_path):
    (corpus_dir / "latin1.py").write_bytes("café = 1\n".encode("latin-1"))
    with pytest.warns(C.CorpusWarning, match="1 file.*not valid UTF-8.*latin1.py"):
        corpus = C.open_corpus(corpus_dir, tmp_path / "data")
    texts = list(corpus.documents("train")) + list(corpus.documents("validation"))
    assert "caf\ufffd = 1\n" in texts


def test_default_corpus_is_the_stdlib():
    root = C.default_corpus_dir()
    files = C.list_files(root, "*.py")
    assert "os.py" in files and len(files) > 500
    assert not any("site-packages" in f for f in files)


# ----------------------------------------------------------------------------- catalog


class FakeLm1b(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """lm1b's name, version and features, with a few sentences instead of 30M."""

    name = "lm1b"
    VERSION = tfds.core.Version("1.1.0")
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            supervised_keys=("text", "text"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(40), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"text": f"sentence number {i} of the fake billion words ."}


class FakeWmt(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "wmt14_translate"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="de-en")]  # noqa: RUF012 - TFDS reads it off the class
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.Translation(languages=("de", "en")),
            supervised_keys=("de", "en"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(5), "validation": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"de": f"hallo welt {i}", "en": f"hello world {i}"}


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    FakeLm1b(data_dir=str(root)).download_and_prepare(file_format="array_record")
    FakeWmt(config="de-en", data_dir=str(root)).download_and_prepare(file_format="array_record")
    return root


def test_catalog_dataset_by_name(catalog_dir):
    corpus = C.open_corpus("tfds:lm1b", catalog_dir)
    assert corpus.name == "tfds:lm1b" and corpus.text_field == "text"
    assert corpus.num_documents("train") == 40 and corpus.num_documents("validation") == 3  # 'test'
    assert next(corpus.documents("train")).startswith("sentence number")
    limited = C.open_corpus("tfds:lm1b", catalog_dir, max_documents=5)
    assert len(list(limited.documents("train"))) == 5


def test_translation_dataset_reads_the_target_language(catalog_dir):
    corpus = C.open_corpus("tfds:wmt14_translate/de-en", catalog_dir)
    assert corpus.text_field == "en"
    assert next(corpus.documents("train")).startswith("hello world")
    assert C.open_corpus("tfds:wmt14_translate/de-en", catalog_dir, text_field="de").text_field == "de"
    with pytest.raises(C.CorpusError, match="text_field='fr'"):
        C.open_corpus("tfds:wmt14_translate/de-en", catalog_dir, text_field="fr")


def test_catalog_dataset_feeds_the_same_pipeline(catalog_dir):
    pipe = P.make_pipeline("decoder", "tfds:lm1b", "bytes", seq_len=16, batch_size=4, data_dir=catalog_dir,
                           process_index=0, process_count=1)
    batch = pipe.batch(0)
    assert batch["inputs"].shape == (4, 16)
    text = "".join(pipe.tokenizer.decode(row) for row in batch["inputs"])
    assert "sentence" in text or "number" in text or "fake" in text
    evals = P.make_eval_batches("decoder", "tfds:lm1b", "bytes", seq_len=16, batch_size=4, data_dir=catalog_dir,
                                process_index=0, process_count=1)
    assert len(evals) >= 1


def test_catalog_dataset_prepares_into_shards_in_its_own_splits(catalog_dir, tmp_path):
    from matrixmagic.train.data import prepare, shards
    from matrixmagic.train.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    corpus = C.open_corpus("tfds:lm1b", catalog_dir)
    for workers in (0, 2):
        prepare.prepare_corpus(corpus, str(tmp_path / f"w{workers}"), tok, C.open_corpus, workers=workers,
                               data_dir=catalog_dir, progress=False)
    for split in ("train", "validation"):
        names = sorted(p.name for p in (tmp_path / "w0").iterdir())
        assert all((tmp_path / "w0" / n).read_bytes() == (tmp_path / "w2" / n).read_bytes() for n in names)
        stream = shards.open_prepared(str(tmp_path / "w2")).stream(split)
        got = stream.read_rows(np.array([0]), stream.total, tok.pad_id)[0]
        want = np.concatenate([np.concatenate([[tok.eot_id], tok.encode(t)]) for t in corpus.documents(split)])
        np.testing.assert_array_equal(got, want)


def test_missing_catalog_dataset_says_where_and_how(tmp_path):
    for name in ("lm1b", "c4/en", "no_such_dataset"):
        with pytest.raises(C.CorpusError) as error:
            C.open_corpus(f"tfds:{name}", tmp_path / "empty")
        message = str(error.value)
        assert f"source='tfds:{name}'" in message
        assert str(tmp_path / "empty") in message and "tfds build" in message
        assert len(message) < 800  # not TFDS's list of every dataset


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::matrixmagic.train.data.corpus.CorpusWarning")  # the stdlib has a few latin-1 tests
def test_real_stdlib_dataset_builds_and_packs(tmp_path):
    pipe = P.make_pipeline("decoder", "stdlib", "bytes", seq_len=256, batch_size=16, data_dir=tmp_path,
                           process_index=0, process_count=1)
    assert len(pipe.rows) > 10_000
    assert pipe.rows.dtype == np.uint16
    evals = P.make_eval_batches("decoder", "stdlib", "bytes", seq_len=256, batch_size=16, data_dir=tmp_path,
                                process_index=0, process_count=1, num_eval_batches=4)
    assert len(evals) == 4 and all(b["loss_mask"].sum() > 0 for b in evals)
