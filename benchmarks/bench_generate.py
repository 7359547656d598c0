"""Per-token generation latency with and without the KV cache, early and late in a sequence.

With the cache a step feeds one token and attends over the fixed-size cache (masked
to the filled slots), so its cost does not depend on the position: tokens/s at
position 64 and 1024 should be about equal. Without it, every step recomputes the
whole prefix: the work grows linearly with the position (plus a quadratic attention
term), so tokens/s at 1024 should be roughly 1024/64 = 16x lower once the prefix
matmuls dominate (on small CPU models fixed overheads make the ratio smaller).

    python benchmarks/bench_generate.py [--positions 64 1024] [--steps 32] [--batch 1]
    python benchmarks/bench_generate.py --preset gpt-tiny     # ms per token through generate(), batch 1 and 8
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

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


def generate_ms_per_token(preset: str, batch: int, sampling=None, new_tokens: int = 100, repeats: int = 5) -> float:
    """Milliseconds per decoded token (per step of the batch) through `generate()`, the loop
    `magic generate` runs, after its compile: the best of `repeats` runs; random weights."""
    from matrixmagic.configs import get_preset
    from matrixmagic.model.generate import Sampling, generate

    cfg = get_preset(preset).model.replace(num_valid_tokens=260)
    if cfg.family != "decoder":
        raise SystemExit(f"--preset {preset}: generate() continues text with a decoder-only model; "
                         f"pick a GPT preset such as gpt-tiny or gpt2.")
    model, params = build_model(cfg), jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    prompts = [[256, 100, 101, 102]] * batch

    def run():  # eot is never produced (ids >= 260 are masked), so every call decodes new_tokens
        return generate(model, params, prompts, max_new_tokens=new_tokens, eot_id=10**6,
                        sampling=sampling or Sampling(0.0))

    run()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / new_tokens * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--preset", help="instead: ms per token of this preset through generate(), batch 1 and 8")
    args = parser.parse_args(argv)
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
