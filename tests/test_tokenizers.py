"""Tokenizers: exact round trips, the four specials, and the padded embedding size."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from matrixmagic.model.objectives import regular_ids
from matrixmagic.train.data.tokenizers import (
    SENTENCEPIECE_FILE,
    SPECIAL_PIECES,
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_sentencepiece,
)

SAMPLES = [
    "hello world",
    "naïve café — ünïcödé, 日本語, emoji 🤖\n",
    "def f(x):\n\tif x:\n        return  x  # two  spaces\n\n\n",
    "",
]


def test_byte_round_trip_including_non_ascii():
    tok = ByteTokenizer()
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        assert ids.size == len(text.encode("utf-8"))
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < 256)
        assert tok.decode(ids) == text


def test_byte_specials_and_sizes():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.eot_id, tok.pad_id, tok.mask_id, tok.bos_id) == (256, 257, 258, 259)
    assert tok.vocab_size == 260
    assert tok.padded_vocab_size() == 384
    assert tok.padded_vocab_size(64) == 320
    assert tok.decode([256, 104, 105, 257, 258, 259]) == "<|endoftext|>hi<|pad|><|mask|><|bos|>"
    assert len(regular_ids(tok)) == 256
    with pytest.raises(TokenizerError, match="multiple=0"):
        tok.padded_vocab_size(0)


def test_byte_decode_invalid_utf8_uses_replacement():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 104, 0xC3]) == "\ufffdh\ufffd"
    assert tok.decode(np.array([300])) == "<|invalid:300|>"  # a padding row id


def test_load_tokenizer_names_and_errors(tmp_path):
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    tok = ByteTokenizer()
    assert load_tokenizer(tok) is tok
    with pytest.raises(TokenizerError, match="tokenizer='bpe' is unknown"):
        load_tokenizer("bpe")
    with pytest.raises(TokenizerError, match="magic data --tokenizer sentencepiece"):
        load_tokenizer("sentencepiece", data_dir=tmp_path)
    with pytest.raises(TokenizerError, match="needs data_dir"):
        load_tokenizer("sentencepiece")
    with pytest.raises(TokenizerError, match="model_path="):
        load_tokenizer(str(tmp_path / "missing.model"))


def _small_corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py"]
    texts = [(stdlib / n).read_text(encoding="utf-8") for n in names if (stdlib / n).is_file()]
    return texts + ["naïve café — ünïcödé 日本語\n" * 20]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sp")
    train_sentencepiece(_small_corpus(), directory / SENTENCEPIECE_FILE, vocab_size=800)
    return directory


def test_sentencepiece_round_trip_and_specials(sp_dir):
    tok = load_tokenizer("sentencepiece", data_dir=sp_dir)
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    for text in SAMPLES + ["unseen chars: ζ∂ƒ ☃ \x00 \x7f"]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        assert tok.decode(ids) == text
    specials = [tok.eot_id, tok.pad_id, tok.mask_id, tok.bos_id]
    assert len(set(specials)) == 4 and max(specials) < tok.vocab_size
    for piece in SPECIAL_PIECES:  # typed specials are text, never the control ids
        assert not np.isin(tok.encode(piece), specials).any()
    assert tok.decode([tok.eot_id] + list(tok.encode("x = 1"))) == "<|endoftext|>x = 1"
    assert tok.padded_vocab_size() % 128 == 0 and tok.padded_vocab_size() >= tok.vocab_size
    assert not np.isin(regular_ids(tok), specials).any()


def test_sentencepiece_compresses_and_reloads_by_path(sp_dir):
    tok = SentencePieceTokenizer(sp_dir / SENTENCEPIECE_FILE)
    text = _small_corpus()[0]
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2  # it learned merges
    again = load_tokenizer(str(sp_dir / SENTENCEPIECE_FILE))
    assert again.cache_key == tok.cache_key and again.cache_key.startswith("sp-")
    np.testing.assert_array_equal(again.encode(text), tok.encode(text))
    json.dumps(tok.cache_key)


def test_sentencepiece_unigram_and_bad_arguments(tmp_path):
    tok = train_sentencepiece(_small_corpus(), tmp_path / "u.model", vocab_size=600, model_type="unigram")
    assert tok.decode(tok.encode(SAMPLES[2])) == SAMPLES[2]
    with pytest.raises(TokenizerError, match="model_type='wordpiece'"):
        train_sentencepiece(["x"], tmp_path / "w.model", model_type="wordpiece")
    with pytest.raises(TokenizerError, match="vocab_size=100"):
        train_sentencepiece(["x"], tmp_path / "w.model", vocab_size=100)
