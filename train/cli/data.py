"""`magic data` (build a dataset, train a tokenizer) and `magic data prepare` (token shards)."""

from __future__ import annotations

import os

from matrixmagic.configs import ConfigError
from matrixmagic.configs.train_config import TOKENIZER_NAMES


def cmd_data(args) -> int:
    from ..data.corpus import open_corpus
    from ..data.pipeline import prepare_tokenizer
    from ..run import VOCAB_MULTIPLE

    if args.vocab_size is not None and args.vocab_size < 1:
        raise ConfigError(f"--vocab-size {args.vocab_size} is invalid: use a positive size, e.g. 8000.")
    corpus = open_corpus(args.source, args.data_dir)
    tokenizer = prepare_tokenizer(corpus, args.tokenizer, vocab_size=args.vocab_size, force=args.force)
    print(f"dataset {corpus.name}: {corpus.num_documents('train'):,} train / "
          f"{corpus.num_documents('validation'):,} validation documents in {corpus.directory}")
    print(f"tokenizer {tokenizer!r}: {tokenizer.vocab_size:,} ids (a model's embedding table holds at least "
          f"{tokenizer.padded_vocab_size(VOCAB_MULTIPLE):,} rows: padded to a multiple of {VOCAB_MULTIPLE})")
    return 0


def _out(args) -> str:
    from .. import storage
    from ..data.pipeline import prepared_root

    if args.out and args.name:
        raise ConfigError("--out and --name both given: --name NAME writes <data dir>/prepared/NAME (what "
                          "data.mixture and data.source=prepared:NAME read); --out writes anywhere. Pass one.")
    if args.out:
        return storage.normalize(args.out, "--out")
    if not args.name or "/" in args.name or ":" in args.name or args.name.startswith("."):
        raise ConfigError(f"--name {args.name!r} is invalid: name the prepared source with letters, digits, '-' "
                          f"or '_' (e.g. --name code), or pass --out DIR.")
    return prepared_root(args.name, args.data_dir)


def cmd_prepare(args) -> int:
    from ..data.corpus import open_corpus
    from ..data.prepare import prepare, prepare_corpus
    from ..data.tokenizers import load_tokenizer

    out = _out(args)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.source.startswith("tfds:"):  # a catalog dataset keeps its own splits
        corpus = open_corpus(args.source, args.data_dir, text_field=None if args.text_field == "text" else
                             args.text_field)
        result = prepare_corpus(corpus, out, tokenizer, open_corpus, workers=args.workers, data_dir=args.data_dir,
                                progress=not args.quiet)
    else:
        result = prepare(args.source, out, tokenizer, workers=args.workers, fmt=args.format, pattern=args.pattern,
                         text_field=args.text_field, validation_fraction=args.validation_fraction,
                         shard_mb=args.shard_mb, progress=not args.quiet)
    splits = result.index["splits"]
    shards = len(splits["train"]["shards"])
    if result.ran == 0:
        print(f"{out} is already prepared (nothing to do).")
    elif result.input_bytes:
        print(f"prepared {result.input_bytes / 1e6:,.1f} MB in {result.seconds:.1f} s "
              f"({result.input_bytes / 1e6 / max(result.seconds, 1e-9):,.1f} MB/s) with {args.workers} worker(s).")
    for split in ("train", "validation"):
        print(f"  {split}: {splits[split]['tokens']:,} tokens in {splits[split]['documents']:,} documents")
    use = f"prepared:{args.name}" if args.name else out
    tok = "" if args.tokenizer == "bytes" else f" --set data.tokenizer={args.tokenizer}"
    print(f"{shards} shard(s) per split in {out}\ntrain on it: magic train --set data.source={use}{tok}")
    return 0


def add_parsers(sub) -> None:
    d = sub.add_parser("data", help="build a dataset and train a tokenizer; `magic data prepare` makes token shards",
                       description="Build a TFDS dataset from text files and optionally train a tokenizer. "
                                   "`magic data prepare SOURCE` instead tokenizes any corpus into shards.")
    d.add_argument("--source", default="stdlib", help="'stdlib', a directory of text files, or tfds:<name>")
    d.add_argument("--tokenizer", default="bytes", choices=TOKENIZER_NAMES)
    d.add_argument("--vocab-size", type=int, help="sentencepiece vocabulary size (default 8000 for a new model; "
                                                  "an existing model keeps its own)")
    d.add_argument("--force", action="store_true", help="retrain the sentencepiece model even if one exists")
    d.add_argument("--data-dir", help="TFDS data dir (default ~/.cache/matrixmagic/tfds)")
    d.set_defaults(func=cmd_data)
    actions = d.add_subparsers(dest="action")
    p = actions.add_parser(
        "prepare", help="tokenize a corpus of any size into shards, in parallel, in bounded memory",
        description="Tokenize SOURCE into fixed shards of one token stream per split (train, validation) plus an "
                    "index, with worker processes. Rerun the same command to resume a killed prepare; the "
                    "shards do not depend on --workers.")
    p.add_argument("source", help="a directory, file or gs://BUCKET/PREFIX of text files (one document each), "
                                  "JSONL or Parquet (one document per record); 'stdlib'; or tfds:NAME")
    p.add_argument("--out", help="output folder, local or gs:// (or use --name)")
    p.add_argument("--name", help="write <data dir>/prepared/NAME, for data.source=prepared:NAME and data.mixture")
    p.add_argument("--tokenizer", default="bytes", help="'bytes', or a sentencepiece .model / tokenizer.json path")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: the machine's cores; 0: tokenize in this process)")
    p.add_argument("--format", default="auto", choices=("auto", "text", "jsonl", "parquet"),
                   help="auto: JSONL or Parquet when every file ends so, else text")
    p.add_argument("--pattern", help="basename glob of the files to read (default '*', or '*.jsonl'/'*.parquet')")
    p.add_argument("--text-field", default="text", help="the JSONL/Parquet field holding the text (default 'text')")
    p.add_argument("--validation-fraction", type=float, default=0.015,
                   help="share of documents (by path or record hash) held out for validation")
    p.add_argument("--shard-mb", type=float, default=64, help="input MB per shard (default 64)")
    p.add_argument("--data-dir", help="TFDS data dir: tfds:NAME sources and --name outputs (default "
                                      "~/.cache/matrixmagic/tfds or $MATRIXMAGIC_DATA_DIR)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)


