"""Perplexity of a model on text files: `magic eval --text FILE_OR_DIR [--stride S]`.

Each file is one document, read as UTF-8 and tokenized whole; the prompt's start ids go
before it (data/tokenizers.prompt_start), and every token after them is scored once, by
the sliding windows of scoring.rolling_windows. Three numbers:

* nats/token: the summed negative log-likelihood over the scored tokens;
* perplexity: exp(nats/token), per token of *this* tokenizer;
* bits/byte: the same sum in bits over the UTF-8 bytes of the text, which does not
  depend on the tokenizer, so a byte-level run and a BPE run compare (the measure of
  Gao et al. 2020, "The Pile", section 5, used by the harness's `bits_per_byte`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

from matrixmagic.configs import ConfigError

from .scoring import Scorer, window_spans


@dataclasses.dataclass(frozen=True)
class Perplexity:
    files: int
    tokens: int
    bytes: int
    nll: float  # nats, summed over the scored tokens
    stride: int
    max_len: int

    @property
    def nats_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.nats_per_token, 700.0))

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "nats_per_token": self.nats_per_token, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}


def text_files(path: str) -> list[str]:
    """A file, or every file under a directory (sorted; hidden files and folders, and
    __pycache__, skipped)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ConfigError(f"--text {path!r} does not exist: give a text file or a directory of them.")
    found = []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        found += [os.path.join(root, name) for name in names if not name.startswith(".")]
    found.sort()
    if not found:
        raise ConfigError(f"--text {path!r} holds no files: give a text file or a directory with some.")
    return found


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise ConfigError(f"--text: {path} is not UTF-8 text ({err.reason} at byte {err.start}): convert it, or "
                          f"leave it out of the directory.") from None


CHUNK = 256  # windows scored at a time: memory stays flat whatever the text's length


def perplexity(scorer: Scorer, tokenizer, texts: Sequence[str], start: Sequence[int],
               stride: int | None = None) -> Perplexity:
    """Perplexity of `texts` (each a document) under the scorer's model."""
    stride = scorer.max_len if stride is None else stride
    nll, n_tokens, n_bytes, pending = 0.0, 0, 0, []

    def score(requests) -> float:
        return -float(sum(lp.sum() for lp, _ in scorer.token_scores(requests)))

    for text in texts:
        ids = np.asarray(tokenizer.encode(text), np.int32)
        if not len(ids):
            continue
        whole = np.concatenate([np.asarray(start, np.int32), ids])
        for a, b, c in window_spans(len(ids), len(start), scorer.max_len, stride):
            pending.append((whole[a:b].tolist(), whole[b:c].tolist()))
            n_tokens += c - b
            if len(pending) == CHUNK:
                nll, pending = nll + score(pending), []
        n_bytes += len(text.encode("utf-8"))
    if pending:
        nll += score(pending)
    if not n_tokens:
        raise ConfigError("--text: the files hold no text to score (all empty).")
    return Perplexity(files=len(texts), tokens=n_tokens, bytes=n_bytes, nll=nll, stride=stride,
                      max_len=scorer.max_len)
