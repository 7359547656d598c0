"""Opening a model to read (generate, explain, eval): a trained run directory, the run that
`magic train` made with the same flags, or a preset with random weights. Nothing is loaded
until asked, so a request is checked against the model's shapes (lengths, memory) first.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import jax

from matrixmagic.configs import get_preset
from matrixmagic.model.build import init_params

from . import storage
from .checkpoint import saved_run_records
from .data.tokenizers import ByteTokenizer
from .run import load_run, reading_model, resolve_config, run_tokenizer


@contextlib.contextmanager
def quiet_orbax():
    """Reading a run without orbax's absl warnings about opening the checkpoints read-only ("Given
    directory is read only", "setting save_interval_steps=0"): reading is all we meant to do."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def trained_run(preset: str | None, sets: Sequence[str], workdir: str | None) -> tuple[str | None, str]:
    """(the run directory to load or None, its default name): --workdir, else the directory
    `magic train` with the same --preset and --set flags made (runs/<preset>-<hash>), if it
    has a checkpoint."""
    if workdir:
        return storage.normalize(workdir, "--workdir"), workdir
    default = resolve_config(preset, list(sets)).workdir
    return (default if storage.is_dir(storage.join(default, "checkpoints")) else None), default


def read_run(run: str):
    """(model config, tokenizer) of a run directory, no array read. An imported checkpoint not
    trained here starts prompts as `transformers` does (data/tokenizers.py prompt_prefix)."""
    with quiet_orbax():
        config, data = saved_run_records(run)  # the latest good checkpoint's records
    tokenizer = run_tokenizer(config)
    if data.get("imported_from") and hasattr(tokenizer, "as_imported"):
        tokenizer.as_imported()
    return reading_model(config.model), tokenizer


def open_model(preset: str | None, workdir: str | None, sets: Sequence[str] = ()):
    """--workdir, else the run `magic train` made with the same flags (trained weights), else
    --preset (random weights, byte tokenizer) -> (model config, tokenizer, load(seed) -> params,
    a line saying which). Nothing is loaded or allocated yet, so the request is checked against
    the model (lengths, memory) first."""
    run, default = trained_run(preset, sets, workdir)
    if run:
        model, tokenizer = read_run(run)

        def load_trained(seed):
            with quiet_orbax():
                return load_run(run)[1]

        return model, tokenizer, load_trained, f"trained run {run}"
    if not preset:
        raise ValueError(f"no trained run at {default} (where `magic train` with these flags puts one): train it "
                         f"first, give --workdir RUN, or --preset NAME for random weights, e.g. --preset gpt-tiny.")
    tokenizer = ByteTokenizer()
    config = get_preset(preset).model
    config = config.replace(num_valid_tokens=min(config.vocab_size, tokenizer.vocab_size))  # never sample table padding

    def load(seed):
        return jax.jit(init_params, static_argnums=0)(config, jax.random.key(seed))

    return config, tokenizer, load, f"preset {preset} with RANDOM weights (no trained run at {default})"
