"""`magic generate` and `magic explain`: load a trained run (or a preset with random
weights), then sample from it or walk its forward pass.

The model-side work lives in model/generate.py and model/explain.py; this is the
glue that knows about run directories, checkpoints and tokenizers.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

import jax
import numpy as np

from matrixmagic.configs import get_preset
from matrixmagic.model.build import build_model, init_params
from matrixmagic.model.explain import explain, format_explanation
from matrixmagic.model.generate import MASK_MARKER, fill_masks, generate_text, translate

from ..data.tokenizers import ByteTokenizer
from ..run import load_run, resolve_config


def load_quietly(workdir: str):
    """load_run without orbax's absl warnings about opening the checkpoints read-only ("Given
    directory is read only", "setting save_interval_steps=0"): reading is all we meant to do."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        return load_run(workdir)
    finally:
        absl.setLevel(level)


def trained_run(preset: Optional[str], sets: Sequence[str], workdir: Optional[str]) -> tuple[Optional[str], str]:
    """(the run directory to load or None, its default name): --workdir, else the directory
    `magic train` with the same --preset and --set flags made (runs/<preset>-<hash>), if it
    has a checkpoint."""
    if workdir:
        return workdir, workdir
    default = resolve_config(preset, list(sets)).workdir
    return (default if os.path.isdir(os.path.join(default, "checkpoints")) else None), default


def resolve_model(preset: Optional[str], workdir: Optional[str], seed: int = 0, sets: Sequence[str] = ()):
    """--workdir, or the run `magic train` made with the same flags (trained weights); else
    --preset (random weights, byte tokenizer) -> (config, params, tokenizer, a line saying which)."""
    run, default = trained_run(preset, sets, workdir)
    if run:
        return (*load_quietly(run), f"trained run {run}")
    if not preset:
        raise ValueError(f"no trained run at {default} (where `magic train` with these flags puts one): train it "
                         f"first, give --workdir RUN, or --preset NAME for random weights, e.g. --preset gpt-tiny.")
    tokenizer = ByteTokenizer()
    config = get_preset(preset).model
    config = config.replace(num_valid_tokens=min(config.vocab_size, tokenizer.vocab_size))  # never sample table padding
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(seed))
    return config, params, tokenizer, f"preset {preset} with RANDOM weights (no trained run at {default})"


def cli_generate(args) -> int:
    """`magic generate`: the family decides the task (continue, translate, fill masks)."""
    config, params, tokenizer, origin = resolve_model(args.preset, args.workdir, args.seed, args.set or ())
    print(f"[{config.family} model: {origin}]", file=sys.stderr)
    model = build_model(config)
    if config.family == "decoder":
        if args.prompt is None:
            raise ValueError("decoder-only models need --prompt TEXT to continue.")
        print(generate_text(config, params, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed))
    elif config.family == "encoder_decoder":
        source = args.source if args.source is not None else args.prompt
        if not source:
            raise ValueError("encoder-decoder models need --source TEXT (the sequence to translate).")
        out = translate(model, params, [tokenizer.encode(source)], bos_id=tokenizer.bos_id, eot_id=tokenizer.eot_id,
                        max_new_tokens=min(args.max_new_tokens, config.max_len), beam_size=args.beam_size,
                        length_penalty=args.length_penalty)
        print(tokenizer.decode(out.rows()[0]))
    else:
        if not args.prompt or MASK_MARKER not in args.prompt:
            raise ValueError(f"encoder-only models fill masks: give --prompt with {MASK_MARKER} where tokens are "
                             f"missing, e.g. --prompt 'The cat {MASK_MARKER}{MASK_MARKER}t on the mat.'")
        parts = [tokenizer.encode(p) for p in args.prompt.split(MASK_MARKER)]
        # End-of-text first, as it starts every training document (for a Hugging Face BERT it is [CLS]).
        pieces = [np.array([tokenizer.eot_id], np.int32), parts[0]]
        pieces += [x for p in parts[1:] for x in (np.array([tokenizer.mask_id], np.int32), p)]
        ids = np.concatenate(pieces).astype(np.int32)[None]
        filled = fill_masks(model, params, ids, tokenizer.mask_id, banned_ids=tuple(tokenizer.special_ids))
        print(tokenizer.decode(filled[0, 1:]))
    return 0


def cli_explain(args) -> int:
    """`magic explain`: print the walk, and write the pictures with --plot DIR."""
    run, default = trained_run(args.preset, args.set or (), args.workdir)
    if run:
        config, params, tokenizer = load_quietly(run)
        print(f"[trained run {run}]")
    elif args.preset:
        config, params, tokenizer = get_preset(args.preset).model, None, ByteTokenizer()
        text = (f"; --text read as UTF-8 bytes, ids 0..{tokenizer.vocab_size - 1} of its {config.vocab_size:,}-row "
                f"table (no trained tokenizer)") if args.text is not None else ""
        print(f"[preset {args.preset}: no trained run at {default}; random weights, or shapes only when large{text}]")
    else:
        raise ValueError(f"no trained run at {default} (where `magic train` with these flags puts one): train it "
                         f"first, give --workdir RUN, or --preset NAME (random weights, or shapes only when large).")
    ids = None
    if args.text is not None:
        ids = np.tile(np.asarray(tokenizer.encode(args.text), np.int32), (args.batch, 1))
        if not 0 < ids.shape[1] <= config.max_len:
            raise ValueError(f"--text is {ids.shape[1]} tokens: use 1..max_len={config.max_len}.")
    e = explain(config, params, ids, layer=args.layer, batch=args.batch,
                shapes_only=True if args.shapes_only else None, tokenizer=tokenizer)
    print(format_explanation(e))
    if args.plot:
        from matrixmagic.model.plots import plot_explanation  # matplotlib: start-up `magic generate` never needs

        for path in plot_explanation(e, args.plot):
            print(f"wrote {path}")
        if e.shapes_only:
            drawn = "only the sinusoidal table was drawn" if config.positional == "sinusoidal" else \
                "nothing was drawn (learned positions too)"
            print(f"(shape-only run: the pictures need the model's values; {drawn})")
    return 0
