"""A checkpoint's tokenizer files -> one `tokenizer.json` (+ `tokenizer_config.json`) in the run.

Hugging Face model directories carry their tokenizer in one of three layouts:
`tokenizer.json` (the `tokenizers` library's own format, what transformers writes today),
or the older `vocab.json` + `merges.txt` (GPT-2's byte-level BPE) or `vocab.txt` (BERT's
WordPiece). The import turns any of them into a tokenizer.json beside the checkpoint, so
a run has exactly one tokenizer file to load (`HFTokenizer`, train/data/tokenizers.py),
and keeps `tokenizer_config.json`, which names the special tokens' roles.

Directories may be local or `gs://` (train/storage.py): files are read and written as
bytes through the storage layer, because the `tokenizers` library opens only local
paths. The legacy files of a `gs://` model are the one exception: they are copied into a
local temporary folder first, since their readers (`ByteLevelBPETokenizer`,
`BertWordPieceTokenizer`) take file names and parse them in Rust.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Optional

from .. import storage
from .errors import HFError

TOKENIZER_FILE, CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
# What transformers' GPT2Tokenizer and BertTokenizer default to when tokenizer_config.json is absent.
DEFAULT_CONFIG: dict[str, dict[str, Any]] = {
    "gpt2": {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>", "add_prefix_space": False},
    "bert": {"tokenizer_class": "BertTokenizer", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
             "mask_token": "[MASK]", "unk_token": "[UNK]", "do_lower_case": True},
    # Llama 3 ships a PreTrainedTokenizerFast; its roles are named by what the vocabulary has (LLAMA_ROLES)
    "llama": {"tokenizer_class": "PreTrainedTokenizerFast"},
}
DEFAULT_CONFIG["mistral"] = DEFAULT_CONFIG["llama"]
# A Llama-shaped tokenizer.json without a tokenizer_config.json: Llama 3's names, else Llama 2's and Mistral's.
LLAMA_ROLES = {"bos_token": ("<|begin_of_text|>", "<s>"), "eos_token": ("<|end_of_text|>", "</s>")}


def _read_config(directory: str, model_type: str) -> dict:
    path = storage.join(directory, CONFIG_FILE)
    if not storage.path(path).is_file():
        return dict(DEFAULT_CONFIG[model_type])
    try:
        return json.loads(storage.read_text(path))
    except ValueError as err:
        raise HFError(f"{path} is not valid JSON ({err}).") from None


LEGACY_FILES = ("vocab.json", "merges.txt", "vocab.txt")


@contextlib.contextmanager
def _local_legacy_files(directory: str):
    """`directory` itself when local; else a temporary local copy of its legacy tokenizer files."""
    if not storage.is_remote(directory):
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="matrixmagic-tokenizer-") as local:
        for name in LEGACY_FILES:
            remote = storage.join(directory, name)
            if storage.path(remote).is_file():
                storage.write_bytes(os.path.join(local, name), storage.read_bytes(remote))
        yield local


def _from_legacy(directory: str, model_type: str, config: dict):
    """A `tokenizers.Tokenizer` from vocab.json + merges.txt or vocab.txt, or None."""
    with _local_legacy_files(directory) as local:
        return _from_local_legacy(local, model_type, config)


def _from_local_legacy(directory: str, model_type: str, config: dict):
    from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer

    vocab_json, merges, vocab_txt = (os.path.join(directory, n) for n in LEGACY_FILES)
    if model_type == "gpt2" and os.path.isfile(vocab_json) and os.path.isfile(merges):
        tok = ByteLevelBPETokenizer(vocab_json, merges, add_prefix_space=bool(config.get("add_prefix_space", False)))
        specials = sorted({config[k] for k in ("bos_token", "eos_token", "unk_token") if isinstance(config.get(k), str)})
        tok.add_special_tokens([s for s in specials if tok.token_to_id(s) is not None])  # GPT-2: <|endoftext|>
        return tok._tokenizer
    if model_type == "bert" and os.path.isfile(vocab_txt):
        tok = BertWordPieceTokenizer(vocab_txt, lowercase=bool(config.get("do_lower_case", True)),
                                     strip_accents=config.get("strip_accents"),
                                     handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
                                     **{k: config[k] for k in ("unk_token", "sep_token", "cls_token", "pad_token",
                                                               "mask_token") if isinstance(config.get(k), str)})
        return tok._tokenizer
    return None


def find_tokenizer(directory: str, model_type: str):
    """(tokenizers.Tokenizer, tokenizer_config dict) of a model directory; HFError naming
    the files looked for when there is none."""
    from tokenizers import Tokenizer

    config = _read_config(directory, model_type)
    path = storage.join(directory, TOKENIZER_FILE)
    if storage.path(path).is_file():
        try:
            tok = Tokenizer.from_str(storage.read_text(path))
        except Exception as err:  # noqa: BLE001 - the Rust library's own exception type
            raise HFError(f"{path} cannot be read by the tokenizers library ({err}).") from None
        if model_type in ("llama", "mistral"):
            for role, candidates in LLAMA_ROLES.items():
                found = [c for c in candidates if tok.token_to_id(c) is not None]
                if role not in config and found:
                    config[role] = found[0]
        return tok, config
    tok = _from_legacy(directory, model_type, config)
    if tok is None:
        legacy = {"gpt2": " and vocab.json + merges.txt", "bert": " and vocab.txt"}.get(model_type, "")
        hint = ("" if legacy else " (tokenizer.model, SentencePiece, is not read here: transformers' "
                "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes the tokenizer.json of it)")
        raise HFError(f"{directory} has no tokenizer: looked for {TOKENIZER_FILE}{legacy}{hint}. Copy the tokenizer "
                      f"files from the model's repository into it, or pass --tokenizer DIR.")
    return tok, config


def check_vocabulary(tok, rows: int, where: str) -> Optional[str]:
    """An error when the tokenizer has ids past the embedding table; a note when it has fewer."""
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > rows:
        raise HFError(f"the tokenizer in {where} has {size:,} ids but the embedding table (config.json vocab_size) "
                      f"has {rows:,} rows: ids {rows:,} and up would have no embedding. The tokenizer belongs to "
                      f"another model; pass the right one with --tokenizer DIR.")
    if size < rows:
        return f"the tokenizer has {size:,} ids and the table {rows:,} rows; the rest are kept (and predictable)"
    return None


def _write_config(directory: str, config: dict) -> None:
    storage.write_text(storage.join(directory, CONFIG_FILE), json.dumps(config, indent=2, ensure_ascii=False))


def write_tokenizer(tok, config: dict, directory: str, max_len: int) -> str:
    """tokenizer.json + tokenizer_config.json into `directory`; returns the tokenizer.json path.
    `to_str(pretty=True)` is the text `Tokenizer.save` writes, so a local and a gs:// run hold
    the same bytes."""
    path = storage.join(directory, TOKENIZER_FILE)
    storage.write_text(path, tok.to_str(pretty=True))
    _write_config(directory, {**config, "model_max_length": max_len})  # transformers' default is "unbounded" (1e30)
    return path


def copy_tokenizer(source_json: str, directory: str, model_type: str, max_len: int) -> None:
    """A run's tokenizer.json (and its tokenizer_config.json) into an export directory."""
    storage.write_bytes(storage.join(directory, TOKENIZER_FILE), storage.read_bytes(source_json))
    config = _read_config(storage.parent(source_json), model_type)
    config.setdefault("tokenizer_class", DEFAULT_CONFIG[model_type]["tokenizer_class"])
    if config["tokenizer_class"] == "TokenizersBackend":  # transformers 5's name; 4.x knows the same class as
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # this one, which 5 still reads
    _write_config(directory, {**config, "model_max_length": max_len})
