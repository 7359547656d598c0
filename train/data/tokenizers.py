"""Tokenizers: text <-> int32 ids, with the four special ids the three model families need.

Three kinds: UTF-8 bytes (no files), a SentencePiece model trained on the corpus, and a
Hugging Face tokenizer.json (GPT-2's BPE, BERT's WordPiece: what `magic hf import` brings).

Every tokenizer exposes the same small surface (`Tokenizer` below), so the packing
and batching code never asks which one it has:

* `eot_id`  end of text. Prefixes every document in the packed stream (GPT style), so
            it also marks where one document stops and the next begins.
* `pad_id`  fills the tail of the last packed row; never a prediction target.
* `mask_id` BERT's [MASK] for the masked-LM family.
* `bos_id`  the decoder's start token for the encoder-decoder family.
* `prompt_prefix`  the ids put before a prompt (generate, explain, eval): what the
            model saw before the first token of a document, `(eot_id,)` for every run
            trained here (it starts every packed document). A checkpoint imported from
            Hugging Face and not trained here follows `transformers` instead
            (`HFTokenizer.as_imported`): what the tokenizer's post-processor adds (GPT-2:
            nothing; Llama: <s>; BERT: [CLS]). `prompt_start` applies --bos/--no-bos.

Specials are never produced by `encode(text)`: the byte tokenizer keeps them above 255
and SentencePiece declares them as *control* symbols. The packer relies on this: an
`eot_id` in the stream always means "a document starts here".

Model files are run paths (train/storage.py): a local path or a `gs://` URL, read and
written through epath, so a pod reads one tokenizer from the bucket instead of a copy per host.

`padded_vocab_size(multiple)` is the embedding-table size. It rounds `vocab_size` up
so the vocab matmul has friendly shapes; rows >= `vocab_size` are never real tokens
and the model masks their logits (ModelConfig.num_valid_tokens = vocab_size).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from matrixmagic.configs import ConfigError
from matrixmagic.configs.train_config import TOKENIZER_NAMES

from .. import storage

SPECIAL_PIECES = ("<|endoftext|>", "<|pad|>", "<|mask|>", "<|bos|>")
SENTENCEPIECE_FILE = "sentencepiece.model"


class TokenizerError(ConfigError):
    """A tokenizer argument is bad or its model file is missing. The message says the fix."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline and the model need from a tokenizer."""

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def eot_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def mask_id(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def special_ids(self) -> tuple[int, ...]: ...
    @property
    def prompt_prefix(self) -> tuple[int, ...]: ...
    @property
    def cache_key(self) -> str: ...  # names cached token files; changes if ids would
    def padded_vocab_size(self, multiple: int = 128) -> int: ...


def round_up(n: int, multiple: int) -> int:
    if multiple <= 0:
        raise TokenizerError(f"multiple={multiple} is invalid: use a positive integer (e.g. 128).")
    return -(-n // multiple) * multiple


def prompt_start(tokenizer: Tokenizer, bos: bool | None = None) -> tuple[int, ...]:
    """The ids before every prompt: the tokenizer's `prompt_prefix` (bos=None), none
    (bos=False), or one start token (bos=True: the tokenizer's own prefix if it has one,
    else its beginning-of-text token; GPT-2's is <|endoftext|>)."""
    if bos is None:
        return tuple(tokenizer.prompt_prefix)
    if not bos:
        return ()
    own = isinstance(tokenizer, (ByteTokenizer, SentencePieceTokenizer))
    return tuple(tokenizer.prompt_prefix) or ((tokenizer.eot_id if own else tokenizer.bos_id),)


def text_start(tokenizer: Tokenizer, bos: bool | None = None) -> tuple[int, ...]:
    """The ids before a text whose every token is scored (perplexity, rolling likelihood): the
    prompt start, or the beginning-of-text token where that is empty (the first token needs
    something before it; lm-eval's `hf` backend does the same)."""
    return prompt_start(tokenizer, bos) or prompt_start(tokenizer, True)


def describe_prompt_start(tokenizer: Tokenizer, ids: Sequence[int], bos: bool | None = None) -> str:
    """One line for a run header: which ids start a prompt, and why."""
    if bos is None:
        why = ("as transformers starts this imported checkpoint's prompts" if getattr(tokenizer, "imported", False)
               else "every training document starts so")
    else:
        why = "--bos" if bos else "--no-bos"
    if not ids:
        return f"prompts start with no added token ({why})"
    return f"prompts start with {tokenizer.decode(list(ids))!s} (id {', '.join(map(str, ids))}; {why})"


def _decode_runs(ids, is_text, decode_text, marker) -> str:
    """Decode runs of ordinary ids with `decode_text`; render every other id with `marker`."""
    out, run = [], []
    for i in (int(x) for x in np.asarray(ids).reshape(-1)):
        if is_text(i):
            run.append(i)
            continue
        if run:
            out.append(decode_text(run))
            run = []
        out.append(marker(i))
    if run:
        out.append(decode_text(run))
    return "".join(out)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; 256 eot, 257 pad, 258 mask, 259 bos. Needs no files."""

    vocab_size = 260
    eot_id, pad_id, mask_id, bos_id = 256, 257, 258, 259
    special_ids = (256, 257, 258, 259)
    prompt_prefix = (256,)  # eot: every training document starts with it
    cache_key = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return _decode_runs(
            ids,
            is_text=lambda i: 0 <= i < 256,
            decode_text=lambda run: bytes(run).decode("utf-8", errors="replace"),
            marker=self._marker,
        )

    def _marker(self, i: int) -> str:
        if i in self.special_ids:
            return SPECIAL_PIECES[i - 256]
        return f"<|invalid:{i}|>"  # a padding row of the embedding table

    def padded_vocab_size(self, multiple: int = 128) -> int:
        return round_up(self.vocab_size, multiple)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A trained SentencePiece model loaded from its `.model` file.

    Id 0 is <unk> (rare: byte fallback covers any character); ids 1..4 are the specials
    in SPECIAL_PIECES order, declared as control symbols so `encode` never emits them.
    """

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        path = _model_path(model_path)
        if not _is_file(path):
            raise TokenizerError(
                f"model_path={str(path)!r} does not exist: train one with "
                "`train_sentencepiece(...)` or run `magic data --tokenizer sentencepiece` first."
            )
        proto = _read(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError:  # sentencepiece's C++ parse error: a truncated, corrupt or foreign file
            raise TokenizerError(
                f"tokenizer={str(path)!r} is not a readable SentencePiece model (corrupt, truncated, or another "
                "kind of file): rebuild it with `magic data --tokenizer sentencepiece --force`, or point "
                "data.tokenizer at a good .model file."
            ) from None
        self.path = path
        self.cache_key = "sp-" + hashlib.sha256(proto).hexdigest()[:12]
        ids = [self._sp.piece_to_id(p) for p in SPECIAL_PIECES]
        if any(not self._sp.is_control(i) for i in ids):
            raise TokenizerError(
                f"model_path={str(path)!r} lacks the control symbols {SPECIAL_PIECES}: "
                "retrain it with `train_sentencepiece(...)`."
            )
        self.eot_id, self.pad_id, self.mask_id, self.bos_id = ids
        self.prompt_prefix = (self.eot_id,)  # every training document starts with it

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self._sp.unk_id(), self.eot_id, self.pad_id, self.mask_id, self.bos_id)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[np.ndarray]:
        out = self._sp.encode(texts, num_threads=num_threads)
        return [np.asarray(ids, dtype=np.int32) for ids in out]

    def decode(self, ids) -> str:
        controls = set(self.special_ids[1:])
        n = self.vocab_size
        return _decode_runs(
            ids,
            is_text=lambda i: 0 <= i < n and i not in controls,
            decode_text=self._sp.decode,
            marker=lambda i: self._sp.id_to_piece(i) if i in controls else f"<|invalid:{i}|>",
        )

    def padded_vocab_size(self, multiple: int = 128) -> int:
        return round_up(self.vocab_size, multiple)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r})"


# A tokenizer.json without a tokenizer_config.json beside it: the roles by their usual names.
HF_FALLBACK_ROLES = {"eos_token": ("<|endoftext|>", "</s>"), "cls_token": ("[CLS]", "<s>"),
                     "pad_token": ("[PAD]", "<pad>"), "mask_token": ("[MASK]", "<mask>")}


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (GPT-2's byte-level BPE, BERT's WordPiece, ...) through
    the `tokenizers` library. `magic hf import` writes one into the run directory; any
    tokenizer.json can be given as data.tokenizer to train on a text corpus with it.

    The roles come from `tokenizer_config.json` beside it (transformers writes it; so does
    `magic hf import`): end-of-text is `eos_token`, or `cls_token` when there is none (BERT:
    every document then starts with [CLS], as BERT's inputs do); bos is `bos_token`, else
    `cls_token`, else end-of-text. A role the vocabulary lacks (GPT-2 has no pad and no mask)
    gets the next id past it: a padding row of the embedding table, never predicted.
    `encode` treats special tokens' text as plain text, so documents never contain
    specials (the packer relies on that).
    """

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tokenizer

        json_path = storage.path(path)  # a gs:// run's tokenizer.json (`magic hf import --workdir gs://...`)
        if not json_path.is_file():
            raise TokenizerError(f"tokenizer={str(json_path)!r} does not exist: give the tokenizer.json of a Hugging "
                                 f"Face model (`magic hf import` puts one in the run directory).")
        raw = json_path.read_bytes()
        try:
            self._tok = _Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as err:  # noqa: BLE001 - the Rust library's own exception type
            raise TokenizerError(f"tokenizer={str(json_path)!r} is not a Hugging Face tokenizer.json ({err}).") from None
        self._tok.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not the special
        self.path = json_path
        self.cache_key = "hf-" + hashlib.sha256(raw).hexdigest()[:12]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        roles = self._roles(json_path.with_name("tokenizer_config.json"))
        extra = iter(range(self.vocab_size, self.vocab_size + 2))
        eot_id = roles.get("eos_token", roles.get("cls_token"))
        if eot_id is None:
            raise TokenizerError(f"tokenizer={str(json_path)!r} has neither an eos_token nor a cls_token to mark where "
                                 f"documents start; name one in tokenizer_config.json beside it.")
        self.eot_id = eot_id
        self.bos_id = roles.get("bos_token", roles.get("cls_token", self.eot_id))
        pad = roles.get("pad_token")
        self.pad_id = pad if pad is not None and pad != self.eot_id else next(extra)
        self.mask_id = roles["mask_token"] if "mask_token" in roles else next(extra)
        self._extra_names = {i: name for i, name in ((self.pad_id, "<|pad|>"), (self.mask_id, "<|mask|>"))
                             if i >= self.vocab_size}
        specials = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.special_ids = tuple(sorted(specials | {self.eot_id, self.bos_id, self.pad_id, self.mask_id}))
        self.prompt_prefix: tuple[int, ...] = (self.eot_id,)  # every document trained on here starts with it
        self.transformers_prefix = self._leading_specials(specials)
        self.imported = False

    def as_imported(self) -> "HFTokenizer":
        """Prompts as `transformers` starts them (a checkpoint imported and not trained here)."""
        self.prompt_prefix, self.imported = self.transformers_prefix, True
        return self

    def _leading_specials(self, specials: set[int]) -> tuple[int, ...]:
        """The special ids the tokenizer's post-processor puts before a text (what
        `transformers`' tokenizer(text) starts with): GPT-2's ByteLevel adds none, Llama's
        template adds <s>, BERT's adds [CLS]."""
        ids = self._tok.encode("a", add_special_tokens=True).ids
        n = next((k for k, i in enumerate(ids) if i not in specials), len(ids))
        return tuple(ids[:n])

    def _roles(self, config_path: Path) -> dict[str, int]:
        """{role: id} from tokenizer_config.json (missing file: the conventional names)."""
        import json

        names = {}
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            for role in (*HF_FALLBACK_ROLES, "bos_token"):
                value = config.get(role)
                value = value.get("content") if isinstance(value, dict) else value  # AddedToken as a dict
                if value is not None:
                    names[role] = value
        else:
            for role, candidates in HF_FALLBACK_ROLES.items():
                found = [c for c in candidates if self._tok.token_to_id(c) is not None]
                if found:
                    names[role] = found[0]
        ids = {role: self._tok.token_to_id(token) for role, token in names.items()}
        missing = [f"{role}={names[role]!r}" for role, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"{config_path} names {', '.join(missing)}, which the tokenizer's vocabulary lacks.")
        return {role: i for role, i in ids.items() if i is not None}  # all of them: a None raised above

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[np.ndarray]:
        out = self._tok.encode_batch(texts, add_special_tokens=False)  # parallel in Rust
        return [np.asarray(e.ids, dtype=np.int32) for e in out]

    def decode(self, ids) -> str:
        specials, n = set(self.special_ids), self.vocab_size
        return _decode_runs(
            ids,
            is_text=lambda i: 0 <= i < n and i not in specials,
            decode_text=lambda run: self._tok.decode(run, skip_special_tokens=False),
            marker=lambda i: self._tok.id_to_token(i) if 0 <= i < n else self._extra_names.get(i, f"<|invalid:{i}|>"),
        )

    def padded_vocab_size(self, multiple: int = 128) -> int:
        """Rows the table needs, roles past the vocabulary included, rounded up to `multiple`."""
        return round_up(max(self.vocab_size, *self.special_ids) + 1, multiple)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r})"


def _training_chunks(texts: Iterable[str], lines_per_chunk: int = 32):
    """SentencePiece trains on "sentences"; give it blocks of lines, newlines kept."""
    for text in texts:
        lines = text.splitlines(keepends=True)
        for i in range(0, len(lines), lines_per_chunk):
            chunk = "".join(lines[i : i + lines_per_chunk])
            if chunk.strip():
                yield chunk


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str | os.PathLike,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    max_chunks: int = 200_000,
) -> SentencePieceTokenizer:
    """Train on `texts` and write `model_path` atomically; returns the loaded tokenizer.

    Identity normalization, no whitespace collapsing and byte fallback make
    decode(encode(text)) == text for any text, code indentation included.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type={model_type!r} is invalid: use 'bpe' or 'unigram'.")
    if vocab_size < 256 + len(SPECIAL_PIECES) + 8:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: byte fallback alone needs 261 ids; use >= 512."
        )
    model = io.BytesIO()
    try:
        _train(spm, texts, model, vocab_size, model_type, max_chunks)
    except RuntimeError as err:  # the trainer's C++ check, e.g. more distinct characters than vocab_size
        reason = ". ".join(str(err).split("] ", 1)[-1].split(". ")[:2])  # its fix names options we do not expose
        raise TokenizerError(
            f"vocab_size={vocab_size}: SentencePiece could not train on this corpus ({reason}): use a larger "
            "--vocab-size."
        ) from None
    path = str(model_path)
    storage.retrying(lambda: storage.write_bytes(path, model.getvalue()), f"writing {path}")  # whole or not at all
    return SentencePieceTokenizer(path)


def _model_path(path):
    """An epath.Path for a model file (local or gs://), a URL's bucket and credentials checked first."""
    text = str(path)
    if storage.is_url(text):
        text = storage.normalize(text, "data.tokenizer")
        storage.check_bucket(text, "data.tokenizer")
    return storage.path(text)


def _is_file(path) -> bool:
    try:
        return storage.retrying(path.is_file, f"data.tokenizer={str(path)!r}")
    except storage.StorageUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - gcsfs raises OSError, HttpError or ValueError
        raise storage.classify(err, str(path), "data.tokenizer") from None


def _read(path) -> bytes:
    return storage.retrying(path.read_bytes, f"data.tokenizer={str(path)!r}")


def _train(spm, texts, model, vocab_size, model_type, max_chunks) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_chunks(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        control_symbols=list(SPECIAL_PIECES),
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        max_sentence_length=1 << 16,
        input_sentence_size=max_chunks,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,
        num_threads=2,
        minloglevel=2,
    )


def load_tokenizer(name_or_path: str | Tokenizer, data_dir: str | os.PathLike | None = None) -> Tokenizer:
    """'bytes', 'sentencepiece' (the model beside a prepared dataset: `data_dir`), a .model path,
    or a Hugging Face tokenizer.json path.

    `data_dir` is the prepared dataset's directory (`Corpus.directory`), where
    `magic data --tokenizer sentencepiece` writes `sentencepiece.model`.
    """
    if isinstance(name_or_path, Tokenizer):
        return name_or_path
    name = str(name_or_path)
    if name == "bytes":
        return ByteTokenizer()
    if name == "sentencepiece":
        if data_dir is None:
            raise TokenizerError(
                "tokenizer='sentencepiece' needs data_dir= (the prepared dataset's directory) "
                "to find its model."
            )
        path = storage.path(str(data_dir)) / SENTENCEPIECE_FILE
        if not _is_file(path):
            raise TokenizerError(
                f"tokenizer='sentencepiece': no model at {path}. "
                "Run `magic data --tokenizer sentencepiece` first (or call "
                "matrixmagic.train.data.pipeline.prepare_tokenizer(corpus, 'sentencepiece'))."
            )
        return SentencePieceTokenizer(path)
    if name.endswith(".model"):
        return SentencePieceTokenizer(name)
    if name.endswith(".json"):
        return HFTokenizer(name)
    raise TokenizerError(
        f"tokenizer={name!r} is unknown: use one of {TOKENIZER_NAMES}, a path to a "
        "SentencePiece .model file or to a Hugging Face tokenizer.json."
    )
