"""`magic hf import` / `export` of a GPT-2-sized checkpoint: time and peak host memory.

The checkpoint is written here, in the Hugging Face layout (`transformer.h.N...`, float32
safetensors, a tokenizer of the right vocabulary size) with random values, one tensor at
a time, so no torch is needed. Then `magic hf import` and `magic hf export` each run in
a fresh process, and their peak resident memory (ru_maxrss) is set against the peer
figures of the same run:

* the weights' bytes (one copy of the model: what the import must hold in the end);
* a baseline process that imports jax and the importer and starts the CPU backend.

Each peak is printed as copies of the weights above that baseline. On CPU the "device"
arrays are host memory, so one copy is the floor of an import (the placed params) and of
an export (the restored params); everything above it is transient.

    python benchmarks/bench_hf.py [--preset gpt2-medium] [--workdir /tmp/x]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

BASELINE = ("import jax, jax.numpy as jnp; import matrixmagic.train.hf.api; "
            "jnp.zeros(1).block_until_ready()")


def write_random_checkpoint(directory: str, preset: str) -> int:
    """config.json + model.safetensors (GPT2LMHeadModel layout, random N(0, 0.02)) + a byte-level
    BPE tokenizer.json with the checkpoint's vocabulary size; returns the weights' bytes."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from matrixmagic.configs import get_preset
    from matrixmagic.train.hf import names
    from matrixmagic.train.hf.config import hf_config_from_model
    from matrixmagic.train.hf.tensorfile import Planned, write_checkpoint

    model = get_preset(preset).model
    vocab = model.vocab_size
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_from_model(model, "GPT2LMHeadModel", vocab, "float32",
                                       {"bos_token_id": vocab - 1, "eos_token_id": vocab - 1}), f)
    planned = [Planned(names.saved_name("gpt2", "GPT2LMHeadModel", t, i), t.shape, np.dtype("float32"))
               for t in names.hf_tensors("gpt2", model, vocab)
               for i in (range(model.num_layers) if t.layered else [None])]
    rng = np.random.default_rng(0)
    write_checkpoint(directory, planned, lambda t: rng.normal(0, 0.02, t.shape).astype(np.float32))
    # A BPE whose vocabulary is the 256 byte symbols plus filler merges, <|endoftext|> last (as GPT-2).
    symbols = [chr(0x100 + i) for i in range(vocab - 1)]
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(os.path.join(directory, "tokenizer.json"))
    return sum(math.prod(t.shape) * 4 for t in planned)


PEAK = ("import atexit, resource, sys; atexit.register(lambda: print('PEAK_KB', "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); ")


def measured(code: str) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of a fresh Python process running `code` (it reports its own
    ru_maxrss at exit: per process, unlike RUSAGE_CHILDREN's running maximum)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK + code], check=False, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "MAGIC_COMPILE_CACHE": "0"})
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{code} failed:\n{done.stderr[-3000:]}")
    kb = int(done.stderr.rsplit("PEAK_KB", 1)[1].split()[0])
    return seconds, kb / 2**20


def magic(*argv: str) -> str:
    return f"import sys, runpy; sys.argv = {['magic', *argv]!r}; runpy.run_module('matrixmagic.train.cli', " \
           f"run_name='__main__')"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-medium", help="a GPT-2 preset: gpt2, gpt2-medium, ...")
    parser.add_argument("--workdir", help="where the checkpoint and runs go (default: a temporary directory)")
    args = parser.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="bench_hf_")
    source, run, out = (os.path.join(root, n) for n in ("hf", "run", "export"))
    start = time.perf_counter()
    weights = write_random_checkpoint(source, args.preset)
    print(f"{args.preset}: wrote a random HF checkpoint, {weights / 2**30:.2f} GiB of float32 weights, in "
          f"{time.perf_counter() - start:.1f} s ({source})")
    rows = {"baseline (jax + importer)": measured(BASELINE),
            "magic hf import": measured(magic("hf", "import", source, "--workdir", run)),
            "magic hf export": measured(magic("hf", "export", "--workdir", run, "--out", out))}
    base = rows["baseline (jax + importer)"][1]
    print(f"{'':28s} {'seconds':>8s} {'peak RSS GiB':>13s} {'above baseline, in model copies':>32s}")
    for name, (seconds, peak) in rows.items():
        copies = (peak - base) * 2**30 / weights
        print(f"{name:28s} {seconds:8.1f} {peak:13.2f} {copies:32.2f}")
    print(f"one copy of the weights: {weights / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
