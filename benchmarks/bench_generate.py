"""Per-token generation latency with and without the KV cache, early and late in a sequence.

With the cache a step feeds one token and attends over the fixed-size cache (masked
to the filled slots), so its cost does not depend on the position: tokens/s at
position 64 and 1024 should be about equal. Without it, every step recomputes the
whole prefix: the work grows linearly with the position (plus a quadratic attention
term), so tokens/s at 1024 should be roughly 1024/64 = 16x lower once the prefix
matmuls dominate (on small CPU models fixed overheads make the ratio smaller).

    python benchmarks/bench_generate.py [--positions 64 1024] [--steps 32] [--batch 1]
    python benchmarks/bench_generate.py --preset gpt-tiny     # ms per token through generate(), batch 1 and 8

Beside Hugging Face transformers (`pip install -e '.[bench]'`: torch and transformers, never
test dependencies), in one run on one machine:

    python benchmarks/bench_generate.py --vs-transformers [--presets gpt-tiny gpt2] [--batches 1 8]
                                        [--new-tokens 100] [--repeats 3]

For each preset and batch both sides continue the same 4-token prompt by the same number
of greedy tokens with a KV cache: ours through generate() (what `magic generate` runs),
theirs GPT2LMHeadModel of the same shape (layers, d_model, heads, d_ff, vocabulary,
positions, GELU-tanh, tied output layer) through generate(do_sample=False, use_cache=True,
min_new_tokens = max_new_tokens), torch threads = CPU cores; random weights on both sides.
"before" is our loop over the scanned layer stack, as generate() ran it until it unrolled
the layers; the run checks that both give the same tokens. A step is one new token in each
of the batch's rows; ms per step = one call's wall time / new tokens, prompt included, the
best of --repeats calls taken in turn from each side; the first call (ours: compile) is
reported apart. Beside them, what this machine
allows, measured in the same run: a step reads every weight once (weight bytes / the
best streaming read rate of a matrix-vector product) and does 2 FLOPs per weight per row
(at the f32 matmul peak); the larger of the two bounds the step.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from matrixmagic.configs import ModelConfig
from matrixmagic.model.build import build_model, init_params
from matrixmagic.model.generate import init_cache, set_cache_index

# A small GPT with a long context: the cache has max_len slots.
BENCH_CONFIG = ModelConfig(family="decoder", vocab_size=384, d_model=256, num_heads=4, num_layers=4, d_ff=1024,
                           max_len=1152, dropout_rate=0.0, attention_dropout_rate=0.0)


def _timed(fn, steps: int) -> float:
    """Seconds per call of fn() after one warm-up (compile) call."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def cached_tokens_per_second(model, params, position: int, batch: int, steps: int) -> float:
    """One decode step at `position` (cache filled up to it), repeated; tokens/s over the batch."""
    cache = set_cache_index(init_cache(model, batch, model.config.max_len), jnp.full((batch,), position, jnp.int32))
    tokens = jnp.zeros((batch, 1), jnp.int32)
    positions = jnp.full((batch, 1), position, jnp.int32)

    @functools.partial(jax.jit, donate_argnums=0)  # the cache is updated in place, as in generate's loop
    def step(cache):
        logits, state = model.apply({"params": params, "cache": cache}, tokens, positions, decode=True,
                                    mutable=["cache"])
        return jnp.argmax(logits[:, -1], -1), set_cache_index(state["cache"], positions[:, 0])  # stay at position

    def one_token():
        nonlocal cache
        token, cache = step(cache)
        return token

    return batch / _timed(one_token, steps)


def uncached_tokens_per_second(model, params, position: int, batch: int, steps: int) -> float:
    """The next token at `position` by a full forward pass over the position + 1 tokens so far."""
    ids = jnp.zeros((batch, position + 1), jnp.int32)
    forward = jax.jit(lambda ids: jnp.argmax(model.apply({"params": params}, ids)[:, -1], -1))
    return batch / _timed(lambda: forward(ids), steps)


def _timed_calls(run, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, best seconds of `repeats` more) of run()."""
    start = time.perf_counter()
    run()
    first, best = time.perf_counter() - start, float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return first, best


def preset_model(preset: str):
    """(config, model, params): a decoder preset with random weights, as `magic generate --preset`
    builds it (ids >= 260, past the byte tokenizer, are never sampled)."""
    from matrixmagic.configs import get_preset

    cfg = get_preset(preset).model.replace(num_valid_tokens=260)
    if cfg.family != "decoder":
        raise SystemExit(f"--preset {preset}: generate() continues text with a decoder-only model; "
                         f"pick a GPT preset such as gpt-tiny or gpt2.")
    return cfg, build_model(cfg), jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))


PROMPT = [256, 100, 101, 102]  # the same 4 ids for every row, on both sides


def generate_call(model, params, batch: int, new_tokens: int, sampling=None):
    """One generate() call of `new_tokens` for `batch` rows, as a function of nothing."""
    from matrixmagic.model.generate import Sampling, generate

    def run():  # eot is never produced (ids >= 260 are masked), so every call decodes new_tokens
        return generate(model, params, [PROMPT] * batch, max_new_tokens=new_tokens, eot_id=10**6,
                        sampling=sampling or Sampling(0.0))
    return run


def scanned_call(model, params, batch: int, new_tokens: int):
    """generate()'s loop as it ran before it unrolled the layers (model/generate.py, _unrolled):
    the same program over the scanned stack, for the before/after columns."""
    from matrixmagic.model.generate import Sampling, _decoder_loop, pad_prompts

    ids, lengths = pad_prompts([PROMPT] * batch)

    def run():
        return np.asarray(_decoder_loop(model, params, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(0),
                                        jnp.int32(10**6), max_new_tokens=new_tokens, sampling=Sampling(0.0),
                                        cache_len=ids.shape[1] + new_tokens - 1))
    return run


def generate_ms_per_token(preset: str, batch: int, sampling=None, new_tokens: int = 100, repeats: int = 5) -> float:
    """Milliseconds per decoded token (per step of the batch) through `generate()`, the loop
    `magic generate` runs, after its compile: the best of `repeats` runs; random weights."""
    _, model, params = preset_model(preset)
    return _timed_calls(generate_call(model, params, batch, new_tokens, sampling), repeats)[1] / new_tokens * 1e3


# ----------------------------------------------------------------------------- beside transformers

def _gpt2_shaped(preset: str, new_tokens: int):
    """The preset's config, if GPT2LMHeadModel can take its shape and the tokens fit; else a clear exit."""
    from matrixmagic.configs import ConfigError, get_preset

    try:
        cfg = get_preset(preset).model
    except ConfigError as err:
        raise SystemExit(f"--presets: {err}") from None
    if len(PROMPT) + new_tokens > cfg.max_len:
        raise SystemExit(f"--new-tokens {new_tokens}: {preset} holds {cfg.max_len} positions, the prompt takes "
                         f"{len(PROMPT)}; use at most {cfg.max_len - len(PROMPT)}.")
    shape = (cfg.family, cfg.norm_position, cfg.positional, cfg.activation, cfg.tie_embeddings, cfg.use_bias)
    if shape != ("decoder", "pre", "learned", "gelu_tanh", True, True):
        raise SystemExit(f"--presets {preset}: --vs-transformers compares GPT-2-shaped decoders (pre-LayerNorm, "
                         f"learned positions, GELU-tanh, tied output layer, biases), not {shape}: use gpt-tiny "
                         f"or gpt2.")
    return cfg


def transformers_gpt2(cfg):
    """Hugging Face GPT2LMHeadModel of our config's shape, random weights, eval mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model,
                        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
                        activation_function="gelu_new",  # their name for the tanh form of GELU
                        layer_norm_epsilon=cfg.layer_norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def transformers_call(model, batch: int, new_tokens: int):
    """One greedy, KV-cached model.generate() call of exactly `new_tokens` for `batch` rows."""
    import torch

    ids = torch.tensor([PROMPT] * batch)

    def run():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        assert out.shape == (batch, len(PROMPT) + new_tokens), out.shape
        return out
    return run


def streaming_read_rate(n: int = 8192, repeats: int = 5) -> float:
    """Bytes/s of the best jitted [1, n] x [n, n] float32 product (256 MiB of matrix, far past
    the caches): how fast this machine streams weights through a matmul, which is all a
    batch-1 decoding step does."""
    w, x = jnp.ones((n, n), jnp.float32), jnp.ones((1, n), jnp.float32)
    product = jax.jit(jnp.matmul)
    return w.nbytes / _timed_calls(lambda: product(x, w).block_until_ready(), repeats)[1]


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def vs_transformers(presets, batches, new_tokens: int, repeats: int) -> None:
    """Ours and transformers' ms per step, preset by preset and batch by batch, and the bound."""
    import os

    configs = [_gpt2_shaped(p, new_tokens) for p in presets]  # bad input fails before anything is built
    try:
        import torch
        import transformers
    except ImportError:
        raise SystemExit("--vs-transformers needs torch and transformers: pip install -e '.[bench]'") from None
    from matrixmagic.train.metrics import measure_cpu_matmul_peak

    torch.set_num_threads(os.cpu_count())
    print(f"{os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.devices()[0].device_kind}), torch "
          f"{torch.__version__} on {torch.get_num_threads()} threads, transformers {transformers.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    peak, stream = measure_cpu_matmul_peak(), streaming_read_rate()
    print(f"measured now: f32 matmul peak {peak / 1e9:.0f} GFLOP/s, matrix-vector streaming {stream / 1e9:.1f} GB/s")
    print(f"greedy with a KV cache, a {len(PROMPT)}-token prompt + {new_tokens} new tokens, random weights; "
          f"ms per step (a new token in every row), best of {repeats}; the first call apart")
    print(f"{'preset':<9} {'batch':>5} {'before ms':>9} {'ours ms':>8} {'theirs ms':>9} {'theirs/ours':>11} "
          f"{'bound ms':>8} {'bound/ours':>10} {'1st call s: before':>18} {'ours':>5} {'theirs':>6}")
    for preset, cfg in zip(presets, configs):
        _, model, params = preset_model(preset)
        theirs_model = transformers_gpt2(cfg)
        count = sum(x.size for x in jax.tree_util.tree_leaves(params))
        theirs_count = sum(p.numel() for p in theirs_model.parameters())
        if count != theirs_count:  # the same shape has the same parameters
            raise SystemExit(f"{preset}: {count:,} parameters here, {theirs_count:,} in GPT2LMHeadModel")
        # A step reads every weight once (of the position table one row: left out) and does
        # 2 FLOPs per weight per row; attention over <= 104 cached tokens adds under 2%.
        weights = count - params["position_embedding"]["embedding"].size
        for batch in batches:
            runs = (scanned_call(model, params, batch, new_tokens), generate_call(model, params, batch, new_tokens),
                    transformers_call(theirs_model, batch, new_tokens))
            firsts = [_seconds(run) for run in runs]  # ours compile here
            before_tokens, ours_tokens = runs[0](), runs[1]().tokens
            if not np.array_equal(before_tokens, ours_tokens):
                raise SystemExit(f"{preset} batch {batch}: the unrolled loop's greedy tokens differ from the scanned one's")
            best = [float("inf")] * len(runs)
            for _ in range(repeats):  # in turn, so a busy spell of the machine slows every side
                best = [min(b, _seconds(run)) for b, run in zip(best, runs)]
            before, ours, theirs = (b / new_tokens * 1e3 for b in best)
            bound = max(4 * weights / stream, 2 * batch * weights / peak) * 1e3
            print(f"{preset:<9} {batch:>5} {before:>9.2f} {ours:>8.2f} {theirs:>9.2f} {theirs / ours:>10.2f}x "
                  f"{bound:>8.2f} {bound / ours:>10.2f} {firsts[0]:>18.1f} {firsts[1]:>5.1f} {firsts[2]:>6.1f}",
                  flush=True)
        print(f"  {preset}: {count:,} parameters on both sides; transformers attention "
              f"{theirs_model.config._attn_implementation!r}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (other work on the machine slows both sides)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--preset", help="instead: ms per token of this preset through generate(), batch 1 and 8")
    parser.add_argument("--vs-transformers", action="store_true",
                        help="instead: ours beside Hugging Face transformers' GPT2LMHeadModel.generate, greedy")
    parser.add_argument("--presets", nargs="+", default=["gpt-tiny", "gpt2"], help="with --vs-transformers")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="with --vs-transformers")
    parser.add_argument("--new-tokens", type=int, default=100, help="with --vs-transformers")
    parser.add_argument("--repeats", type=int, default=3, help="with --vs-transformers: timed calls per side")
    args = parser.parse_args(argv)
    if args.vs_transformers:
        if min(args.batches) < 1 or args.new_tokens < 1 or args.repeats < 1:
            raise SystemExit("--batches, --new-tokens and --repeats must be positive counts")
        vs_transformers(args.presets, args.batches, args.new_tokens, args.repeats)
        return
    if args.preset:
        from matrixmagic.model.generate import Sampling

        for batch in (1, 8):
            for name, sampling in (("greedy", Sampling(0.0)), ("T 0.8, top-p 0.95", Sampling(0.8, top_p=0.95))):
                ms = generate_ms_per_token(args.preset, batch, sampling)
                print(f"{args.preset} batch {batch}, {name}: {ms:.2f} ms per token step on {jax.devices()[0].device_kind}")
        return
    cfg = BENCH_CONFIG
    if max(args.positions) >= cfg.max_len:
        raise SystemExit(f"--positions must be < max_len={cfg.max_len}")
    model = build_model(cfg)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    print(f"GPT d_model={cfg.d_model} layers={cfg.num_layers} max_len={cfg.max_len} batch={args.batch} "
          f"on {jax.devices()[0].device_kind}")
    print(f"{'position':>9} {'cached tok/s':>14} {'uncached tok/s':>15} {'speed-up':>9}")
    rows = []
    for position in args.positions:
        cached = cached_tokens_per_second(model, params, position, args.batch, args.steps)
        uncached = uncached_tokens_per_second(model, params, position, args.batch, max(2, args.steps // 4))
        rows.append((position, cached, uncached))
        print(f"{position:>9} {cached:>14.1f} {uncached:>15.1f} {cached / uncached:>8.1f}x")
    (p0, c0, u0), (p1, c1, u1) = rows[0], rows[-1]
    print(f"from position {p0} to {p1}: cached tok/s x{c1 / c0:.2f} (flat = 1), "
          f"uncached x{u1 / u0:.3f} (linear would be {p0 / p1:.3f})")


if __name__ == "__main__":
    main()
