"""`magic eval`: score a run on lm-evaluation-harness tasks (--tasks) or on text files (--text),
and `magic lm-eval`: the harness's own command line with our backend registered.

    magic eval --workdir RUN --tasks lambada_openai,hellaswag --limit 100 --num-fewshot 0
    magic eval --workdir RUN --text my_texts/ --stride 512
    magic lm-eval --model matrixmagic --model_args workdir=RUN --tasks hellaswag

Results go to RUN/evals/<name>.json (or --output) and a table to the console. Every flag is
checked, the task names against the harness's registry and the tasks' data read, before
the model's weights are loaded. The scoring lives in train/evals/.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys

from matrixmagic.configs import ConfigError

from .flags import add_bos_argument, add_memory_check_argument
from .paths import check_output_file, expanded_path_flags

LM_EVAL_PATH_FLAGS = ("--output_path", "-o")  # the harness's flags that write: a quoted '~' is the home folder


def add_eval_arguments(p) -> None:
    p.add_argument("--workdir", help="a trained or imported run (default: the one `magic train` with the same "
                                     "--preset/--set made)")
    p.add_argument("--preset", help="the run `magic train --preset P` made; without one, random weights")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="the --set flags of the `magic train` "
                   "run to load when no --workdir is given")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--tasks", help="lm-eval task names, comma-separated, e.g. lambada_openai,hellaswag")
    what.add_argument("--text", metavar="FILE_OR_DIR", help="perplexity on a text file or a directory of them "
                                                            "(each file one document)")
    what.add_argument("--list-tasks", action="store_true", help="print the task names the harness knows")
    p.add_argument("--limit", type=float, help="at most this many documents per task (a fraction below 1: that "
                                               "share); default all")
    p.add_argument("--num-fewshot", type=int, help="examples before each question (default: the task's own)")
    p.add_argument("--include-path", metavar="DIR", help="a folder of task YAML files of your own")
    p.add_argument("--batch-size", type=int, default=16, help="rows per scoring batch (default 16)")
    p.add_argument("--stride", type=int, help="--text: tokens each window moves on (default model.max_len: "
                                              "disjoint windows); smaller gives each token more context")
    p.add_argument("--output", metavar="FILE", help="where the JSON goes (default RUN/evals/<name>.json)")
    p.add_argument("--seed", type=int, default=0, help="random weights of a preset; sampling tasks")
    add_bos_argument(p)
    add_memory_check_argument(p)


def _check_flags(args) -> None:
    if not (args.tasks or args.text or args.list_tasks):
        raise ConfigError("nothing to evaluate: give --tasks NAME[,NAME] (lm-eval tasks) or --text FILE_OR_DIR "
                          "(perplexity), e.g. magic eval --workdir RUN --tasks lambada_openai.")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} is invalid: use 1 or more rows, e.g. 16.")
    if args.stride is not None and args.stride < 1:
        raise ConfigError(f"--stride {args.stride} is invalid: use a positive number of tokens, at most "
                          f"model.max_len.")
    if args.text and (args.limit is not None or args.num_fewshot is not None or args.include_path):
        raise ConfigError("--limit, --num-fewshot and --include-path apply to --tasks, not to --text: drop them.")
    if args.tasks and args.stride is not None:
        raise ConfigError("--stride applies to --text; lm-eval's rolling tasks use disjoint windows: drop it.")
    if args.output:
        args.output = check_output_file(args.output, "--output")  # before anything is scored


def _output_path(args, run: str | None, name: str) -> str | None:
    """--output, else RUN/evals/<name>-<time>.json (checked writable now, before any scoring), else
    None (random weights of a preset: the console only)."""
    if args.output:
        return args.output
    if run is None:
        return None
    from .. import storage

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = storage.join(run, "evals", f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:80]}-{stamp}.json")
    if not storage.is_url(path):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--workdir {run!r}: its evals/ folder cannot be made ({err.strerror}): give --output "
                              f"FILE somewhere you can write.") from None
    return check_output_file(path, "--output")


def _write(path: str | None, text: str) -> None:
    if path is None:
        return
    from .. import storage

    storage.write_text(path, text + "\n")
    print(f"wrote {path}")


def _harness():
    """train/evals/tasks.py, or a clear error when the optional `eval` extra is missing."""
    try:
        from matrixmagic.train.evals import tasks
    except ImportError as err:
        raise ConfigError(f"lm-eval tasks need the lm-evaluation-harness ({err.name} is not installed): pip install "
                          f"'matrixmagic[eval]' (or -e '.[eval]' in a checkout). --text needs no extra.") from None
    return tasks


def main(args) -> int:
    _check_flags(args)
    if args.list_tasks:
        print("\n".join(sorted(_harness().task_manager(args.include_path).all_tasks)))
        return 0
    from matrixmagic.train.planning.fit import forward_parts

    from ..data.tokenizers import describe_prompt_start, prompt_start
    from ..evals.scoring import check_scorable
    from ..reading import open_model, trained_run
    from .runs import check_memory

    run, _ = trained_run(args.preset, args.set or (), args.workdir)
    config, tokenizer, load, origin = open_model(args.preset, args.workdir, args.set or ())
    check_scorable(config, "magic eval")
    if args.text:
        return _text(args, config, tokenizer, load, origin, run)
    lm_tasks = _harness()
    names = lm_tasks.parse_tasks(args.tasks)
    lm_tasks.check_limit(args.limit)
    lm_tasks.check_fewshot(args.num_fewshot)
    manager = lm_tasks.task_manager(args.include_path)
    lm_tasks.check_names(names, manager)
    lm_tasks.check_data(names, manager)
    check_memory(args, f"evaluating {args.workdir or args.preset}", forward_parts(config, args.batch_size,
                                                                                    config.max_len))
    out = _output_path(args, run, ",".join(names))
    prefix = prompt_start(tokenizer, args.bos)
    print(f"[{config.family} model: {origin}; {describe_prompt_start(tokenizer, prefix, args.bos)}]", file=sys.stderr)
    lm = lm_tasks.harness.MatrixMagicLM.from_loaded(config, load(args.seed), tokenizer, batch_size=args.batch_size,
                                                    bos=args.bos, seed=args.seed, origin=origin)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = lm_tasks.evaluate(lm, names, manager, limit=limit, num_fewshot=args.num_fewshot)
    print(lm_tasks.table(results))
    _write(out, lm_tasks.to_json(results))
    return 0


def _text(args, config, tokenizer, load, origin, run) -> int:
    from matrixmagic.train.planning.fit import forward_parts

    from ..data.tokenizers import describe_prompt_start, prompt_start, text_start
    from ..evals.perplexity import perplexity, read_text, text_files
    from ..evals.scoring import Scorer
    from .runs import check_memory

    files = text_files(args.text)
    if args.stride is not None and args.stride > config.max_len:
        raise ConfigError(f"--stride {args.stride} is beyond the model's context: use 1..{config.max_len} "
                          f"(model.max_len).")
    texts = [read_text(f) for f in files]
    start = prompt_start(tokenizer, args.bos)
    line = describe_prompt_start(tokenizer, start, args.bos)
    if not start:  # the first token is scored too, so something must come before it (the harness does the same)
        start = text_start(tokenizer, args.bos)
        line = f"each text follows {tokenizer.decode(list(start))} (id {start[0]}), so its first token is scored too"
    check_memory(args, f"scoring {args.text}", forward_parts(config, args.batch_size, config.max_len))
    out = _output_path(args, run, "text-" + os.path.basename(os.path.normpath(args.text)))
    print(f"[{config.family} model: {origin}; {line}]", file=sys.stderr)
    scorer = Scorer(config, load(args.seed), args.batch_size, bos_id=tokenizer.bos_id)
    result = perplexity(scorer, tokenizer, texts, start, args.stride)
    print(f"{args.text}: {result.files} file(s), {result.tokens:,} tokens, {result.bytes:,} bytes, "
          f"window {result.max_len}, stride {result.stride}")
    print(f"  nats/token {result.nats_per_token:.4f}   perplexity {result.perplexity:.3f}   "
          f"bits/byte {result.bits_per_byte:.4f}")
    record = {"text": os.path.abspath(args.text), "origin": origin, "prompt_start": list(start), **result.as_dict()}
    _write(out, json.dumps(record, indent=2))
    return 0


def lm_eval_main(argv) -> int:
    """`magic lm-eval ARGS`: lm_eval's own command line, with `--model matrixmagic` known to it."""
    _harness()  # registers the backend
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *expanded_path_flags(argv, LM_EVAL_PATH_FLAGS)]
    try:
        cli_evaluate()
    except ValueError as err:  # the harness says "Tasks not found: ..." with a ValueError; any other is a bug
        if not str(err).startswith("Tasks not found"):
            raise
        raise ConfigError(str(err)) from None
    return 0
