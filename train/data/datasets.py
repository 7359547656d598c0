"""What data.source and data.mixture name, opened as token shards (shards.py).

A source is a Corpus, 'stdlib', a directory or gs:// prefix of text files, 'tfds:NAME' (each
tokenized into shards beside its dataset on first use: prepare.py `prepared_corpus`), a folder
written by `magic data prepare` (found by its index), or 'prepared:NAME' for
<data dir>/prepared/NAME. A mixture names prepared sources only: they must share the run's
tokenizer, which each index records.
"""

from __future__ import annotations

import dataclasses

from matrixmagic.configs.train_config import parse_mixture

from .. import storage
from .corpus import Corpus, checked_data_dir, open_corpus
from .prepare import prepared_corpus
from .shards import Prepared, is_prepared, open_prepared
from .sources import CorpusError
from .tokenizers import Tokenizer, load_tokenizer

PREPARED_DIR = "prepared"  # under data_dir: where `magic data prepare --name NAME` puts NAME


def resolve(source, tokenizer, data_dir, corpus_kwargs) -> tuple[Corpus, Tokenizer]:
    corpus = source if isinstance(source, Corpus) else open_corpus(source, data_dir, **corpus_kwargs)
    return corpus, load_tokenizer(tokenizer, data_dir=corpus.directory)


def is_prepared_source(source: str, field: str = "data.source") -> bool:
    """A folder written by `magic data prepare`. A gs:// one is asked only after its bucket and
    the credentials are checked, so their absence is the one-line error it always was."""
    if storage.is_url(source):
        source = storage.normalize(source, field)
        storage.use_emulator()
        storage.check_bucket(source, field)
    return is_prepared(source)


def prepared_root(name: str, data_dir=None) -> str:
    """Where `magic data prepare --name NAME` puts NAME: <data_dir>/prepared/NAME."""
    return storage.join(str(checked_data_dir(data_dir)), PREPARED_DIR, name)


def _prepared_names(data_dir) -> list[str]:
    root = prepared_root("", data_dir).rstrip("/")
    try:
        return sorted(n for n in storage.listdir(root) if is_prepared(storage.join(root, n)))
    except (OSError, ValueError):
        return []


@dataclasses.dataclass(frozen=True)
class Opened:
    """Train/validation rows of one or more named sources that share a tokenizer."""

    sources: dict[str, Prepared]
    tokenizer: Tokenizer
    weights: dict[str, float] | None  # a mixture's, else None
    fingerprint: dict
    label: str


def _check_tokenizer(prepared: Prepared, tokenizer: Tokenizer, field: str) -> None:
    if prepared.tokenizer_key != tokenizer.cache_key:
        ref = prepared.index.get("tokenizer_ref", prepared.tokenizer_key)
        raise CorpusError(
            f"{field}={prepared.root!r} was prepared with tokenizer {prepared.tokenizer_key!r}, but data.tokenizer "
            f"gives {tokenizer.cache_key!r}: train with --set data.tokenizer={ref} (or prepare the source again "
            f"with this tokenizer).")


def open_sources(source="stdlib", tokenizer="bytes", data_dir=None, mixture: str | None = None,
                 **corpus_kwargs) -> Opened:
    """A source (a Corpus, a corpus name or directory, a prepared folder, prepared:NAME) or a
    mixture of prepared names, opened: shards prepared on first use for a corpus."""
    if mixture is not None:
        pairs = parse_mixture(mixture)
        known = _prepared_names(data_dir)
        unknown = [n for n, _ in pairs if n not in known]
        if unknown:
            raise CorpusError(
                f"data.mixture={mixture!r} names {unknown}, not prepared under {prepared_root('', data_dir)} "
                f"(prepared there: {known or 'nothing'}): prepare each with `magic data prepare SOURCE --name NAME` "
                f"(same data.data_dir), or fix the name.")
        tok = load_tokenizer(tokenizer)
        opened = {n: open_prepared(prepared_root(n, data_dir), "data.mixture") for n, _ in pairs}
        for prep in opened.values():
            _check_tokenizer(prep, tok, "data.mixture")
        files = "; ".join(f"{n}: {p.fingerprint.get('files', '?')}" for n, p in opened.items())
        return Opened(opened, tok, dict(pairs), {"source": f"mixture {mixture}", "files": files}, mixture)
    text = None if isinstance(source, Corpus) else str(source)
    if text is not None and text.startswith("prepared:"):
        text = prepared_root(text[len("prepared:"):], data_dir)
        if not is_prepared(text):
            raise CorpusError(f"data.source={source!r}: nothing is prepared at {text} (prepared there: "
                              f"{_prepared_names(data_dir) or 'nothing'}): run `magic data prepare SOURCE --name "
                              f"{source[len('prepared:'):]}` first.")
    if text is not None and not text.startswith("tfds:") and text != "stdlib" and is_prepared_source(text):
        prep = open_prepared(text, "data.source")
        tok = load_tokenizer(tokenizer)
        _check_tokenizer(prep, tok, "data.source")
        return Opened({"": prep}, tok, None, dict(prep.fingerprint), text)
    corpus, tok = resolve(source, tokenizer, data_dir, corpus_kwargs)
    return Opened({"": prepared_corpus(corpus, tok)}, tok, None, dict(corpus.fingerprint), corpus.name)
