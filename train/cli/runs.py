"""`magic generate` and `magic explain`: load a trained run (or a preset with random
weights), then sample from it or walk its forward pass.

The model-side work lives in model/generate.py and model/explain.py; this is the
glue that knows about run directories, checkpoints and tokenizers.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from matrixmagic.configs import ConfigError, get_preset
from matrixmagic.configs.model_config import finite
from matrixmagic.configs.train_config import MAX_SEED, SEED_FIX
from matrixmagic.model.build import build_model
from matrixmagic.model.explain import DEFAULT_TEXT, explain, format_explanation, runs_on_shapes
from matrixmagic.model.families import family_of
from matrixmagic.model.generate import MASK_MARKER, Sampling, fill_masks, generate_text, translate
from matrixmagic.model.positional import positional_kind
from matrixmagic.train.planning.fit import check_fits, forward_parts, generation_parts

from ..data.tokenizers import ByteTokenizer, describe_prompt_start, prompt_start
from ..reading import open_model, quiet_orbax, read_run, trained_run
from ..run import load_run
from .paths import check_output_dir


def check_memory(args, what: str, parts: dict) -> None:
    """The analytic memory of the job against this machine's, unless --no-memory-check."""
    if args.no_memory_check:
        return
    check_fits(what, parts, jax.local_devices(),
               ["a smaller model (--preset) or run", "a shorter prompt or --max-new-tokens" if args.command == "generate"
                else "a shorter --text or a smaller --batch", "a machine with more memory"])


def fill_mask_ids(tokenizer, prompt: str, max_len: int) -> np.ndarray:
    """[1, T] ids of a BERT prompt: end-of-text first (it starts every training document; for a
    Hugging Face BERT it is [CLS]), then the text with one mask id per [MASK] marker."""
    parts = [tokenizer.encode(p) for p in prompt.split(MASK_MARKER)]
    pieces = [np.array([tokenizer.eot_id], np.int32), parts[0]]
    pieces += [x for p in parts[1:] for x in (np.array([tokenizer.mask_id], np.int32), p)]
    ids = np.concatenate(pieces).astype(np.int32)[None]
    if ids.shape[1] > max_len:
        raise ConfigError(f"--prompt is {ids.shape[1] - 1} tokens (with its [MASK]s); the model reads at most "
                          f"{max_len - 1} (model.max_len={max_len}, one position for the start token): shorten it.")
    return ids


def _check_generate_flags(args, family) -> None:
    try:
        Sampling(args.temperature, args.top_k, args.top_p)  # its own checks, before any weight is loaded
    except ValueError as err:  # the model's checks say which flag; to the CLI they are a user's mistake
        raise ConfigError(str(err)) from None
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} is invalid: use a positive count, e.g. 100.")
    if args.beam_size < 1:
        raise ConfigError(f"--beam-size {args.beam_size} is invalid: use 1 (greedy) or more (beam search).")
    if not finite(args.length_penalty):  # NaN would rank every beam equal, inf every finished one first
        raise ConfigError(f"--length-penalty {args.length_penalty} is invalid: use a finite number, 0 (no penalty) "
                          f"or GNMT's alpha, e.g. 0.6.")
    if not 0 <= args.seed <= MAX_SEED:  # as `magic train --set seed` is checked
        raise ConfigError(f"--seed {args.seed} is invalid: {SEED_FIX}")
    if args.beam_size > 1 and family.generation != "translate":
        raise ConfigError(f"--beam-size {args.beam_size} applies to encoder-decoder models only; this is a "
                          f"{family.name} "
                          f"model: drop --beam-size (use --temperature, --top-k or --top-p to shape sampling).")


def cli_generate(args) -> int:
    """`magic generate`: the family decides the task (continue, translate, fill masks)."""
    config, tokenizer, load, origin = open_model(args.preset, args.workdir, args.set or ())
    family = family_of(config)  # its task: continue a prompt, translate a source, fill masks
    _check_generate_flags(args, family)
    if family.generation == "continue":
        if args.prompt is None:
            raise ConfigError("decoder-only models need --prompt TEXT to continue.")
        prefix = prompt_start(tokenizer, args.bos)
        prompt_len = len(prefix) + len(tokenizer.encode(args.prompt))
        if prompt_len > config.max_len:  # no --max-new-tokens helps: the prompt itself does not fit
            start = "" if not prefix else " with the start token" if len(prefix) == 1 else " with its start tokens"
            raise ConfigError(f"--prompt is {prompt_len:,} tokens{start}, and the model's context holds at most "
                              f"{config.max_len:,} (model.max_len): shorten it.")
        room = config.max_len - prompt_len + 1  # the last new token is never fed back
        if args.max_new_tokens > room:
            raise ConfigError(f"--max-new-tokens {args.max_new_tokens} is beyond the context: the prompt takes "
                              f"{prompt_len} of the model's {config.max_len} positions (model.max_len), so at most "
                              f"{max(room, 0)} new tokens fit: use --max-new-tokens {max(room, 1)} or a shorter prompt.")
        parts = generation_parts(config, 1, prompt_len, prompt_len + args.max_new_tokens - 1)
    elif family.generation == "translate":
        source = args.source if args.source is not None else args.prompt
        if not source:
            raise ConfigError("encoder-decoder models need --source TEXT (the sequence to translate).")
        source_ids = tokenizer.encode(source)
        if len(source_ids) > config.max_len:
            raise ConfigError(f"--source is {len(source_ids)} tokens; the encoder reads at most {config.max_len} "
                              f"(model.max_len): shorten it.")
        if args.max_new_tokens > config.max_len:
            raise ConfigError(f"--max-new-tokens {args.max_new_tokens} is beyond the context: the decoder has "
                              f"{config.max_len} positions (model.max_len): use --max-new-tokens {config.max_len} "
                              f"or fewer.")
        parts = generation_parts(config, args.beam_size, len(source_ids), args.max_new_tokens)
    else:
        if not args.prompt or MASK_MARKER not in args.prompt:
            raise ConfigError(f"encoder-only models fill masks: give --prompt with {MASK_MARKER} where tokens are "
                              f"missing, e.g. --prompt 'The cat {MASK_MARKER}{MASK_MARKER}t on the mat.'")
        ids = fill_mask_ids(tokenizer, args.prompt, config.max_len)
        parts = forward_parts(config, 1, ids.shape[1])
    check_memory(args, f"generating with {args.workdir or args.preset} ({config.family})", parts)
    params = load(args.seed)
    start = f"; {describe_prompt_start(tokenizer, prefix, args.bos)}" if family.generation == "continue" else ""
    print(f"[{config.family} model: {origin}{start}]", file=sys.stderr)
    model = build_model(config)
    if family.generation == "continue":
        print(generate_text(config, params, tokenizer, args.prompt, prefix=prefix, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed))
    elif family.generation == "translate":
        out = translate(model, params, [source_ids], bos_id=tokenizer.bos_id, eot_id=tokenizer.eot_id,
                        max_new_tokens=args.max_new_tokens, beam_size=args.beam_size,
                        length_penalty=args.length_penalty)
        print(tokenizer.decode(out.rows()[0]))
    else:
        filled = fill_masks(model, params, ids, tokenizer.mask_id, banned_ids=tuple(tokenizer.special_ids))
        print(tokenizer.decode(filled[0, 1:]))
    return 0


def cli_explain(args) -> int:
    """`magic explain`: print the walk, and write the pictures with --plot DIR."""
    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch} is invalid: use 1 or more sequences (default 1).")
    if args.plot:
        args.plot = check_output_dir(args.plot, "--plot")
    run, default = trained_run(args.preset, args.set or (), args.workdir)
    if run:
        config, tokenizer = read_run(run)  # no array read yet: the request is checked first
        print(f"[trained run {run}]")
    elif args.preset:
        config, tokenizer = get_preset(args.preset).model, ByteTokenizer()  # the preset's own table
        text = (f"; --text read as UTF-8 bytes, ids 0..{tokenizer.vocab_size - 1} of its {config.vocab_size:,}-row "
                f"table (no trained tokenizer)") if args.text is not None else ""
        print(f"[preset {args.preset}: no trained run at {default}; random weights, or shapes only when large{text}]")
    else:
        raise ConfigError(f"no trained run at {default} (where `magic train` with these flags puts one): train it "
                          f"first, give --workdir RUN, or --preset NAME (random weights, or shapes only when large).")
    if not 0 <= args.layer < config.num_layers:
        raise ConfigError(f"--layer {args.layer} is invalid: this model has layers 0..{config.num_layers - 1}.")
    ids = None
    if args.text is not None:
        continues = family_of(config).generation == "continue"
        prefix = prompt_start(tokenizer, args.bos) if continues else ()  # as generate reads it
        if prefix:
            print(f"[{describe_prompt_start(tokenizer, prefix, args.bos)}]")
        ids = np.tile(np.asarray([*prefix, *tokenizer.encode(args.text)], np.int32), (args.batch, 1))
        if not 0 < ids.shape[1] <= config.max_len:
            raise ConfigError(f"--text is {ids.shape[1]} tokens: use 1..max_len={config.max_len}.")
    shapes_only = True if args.shapes_only else runs_on_shapes(config, params_given=bool(run))
    if not shapes_only:
        length = ids.shape[1] if ids is not None else len(tokenizer.encode(DEFAULT_TEXT))
        check_memory(args, f"explaining {run or args.preset} (batch {args.batch} x {length} tokens)",
                     forward_parts(config, args.batch, length))
    if run:
        with quiet_orbax():
            params = load_run(run)[1]
    else:
        params = None  # a preset: explain draws random weights (or runs on shapes)
    e = explain(config, params, ids, layer=args.layer, batch=args.batch, shapes_only=shapes_only, tokenizer=tokenizer)
    print(format_explanation(e))
    if args.plot:
        from matrixmagic.model.plots import plot_explanation  # matplotlib: start-up `magic generate` never needs

        for path in plot_explanation(e, args.plot):
            print(f"wrote {path}")
        if e.shapes_only:
            drawn = (f"only the {config.positional} table was drawn" if positional_kind(config).fixed_table
                     else f"nothing was drawn ({config.positional} positions too)")
            print(f"(shape-only run: the pictures need the model's values; {drawn})")
    return 0
