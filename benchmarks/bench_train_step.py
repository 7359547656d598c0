"""Train-step throughput and MFU of a config, beside the input pipeline's rate.

The input pipeline must be at least 10x faster than the step, so the model never
waits for data. Default: `magic train`'s own config (gpt-tiny, bytes, T 128, batch 32).

    python benchmarks/bench_train_step.py [--preset gpt-tiny] [--steps 30] [--set field=value ...]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np


def synthetic_batch(config) -> dict:
    """A batch of random byte tokens for the config's family, one document per row, made by the
    family's own objective (benchmarks time the step, not the data)."""
    from matrixmagic.model.families import family_of
    from matrixmagic.train.data.tokenizers import ByteTokenizer

    family = family_of(config.model)
    rows = np.random.default_rng(0).integers(0, 256, (config.batch_size, family.row_len(config.data.seq_len)))
    return family.make_batch(rows.astype(np.int32), ByteTokenizer(), config.data.seq_len)


def train_step_tokens_per_second(config, steps: int = 30, warmup: int = 3) -> tuple[float, float]:
    """(tokens/s, seconds per step) of the jitted, sharded train step on synthetic batches."""
    from matrixmagic.train.data.tokenizers import ByteTokenizer
    from matrixmagic.train.run import train_run, with_tokenizer_vocab

    config = with_tokenizer_vocab(config, ByteTokenizer())
    _, run = train_run(config)
    state = run.init_state(jax.random.PRNGKey(0))
    batch = run.put_batch(synthetic_batch(config))
    for _ in range(warmup):
        state, metrics = run.train_step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = run.train_step(state, batch)
    jax.block_until_ready(metrics)
    per_step = (time.perf_counter() - start) / steps
    return config.tokens_per_step / per_step, per_step


def main() -> None:
    from matrixmagic.train.data.tokenizers import ByteTokenizer
    from matrixmagic.train.loop import flops_per_step
    from matrixmagic.train.metrics import cpu_matmul_peak, peak_flops_per_device, probe_cpu_matmul_peak
    from matrixmagic.train.run import resolve_config, with_tokenizer_vocab

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt-tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--no-pipeline", action="store_true", help="skip the input-pipeline comparison")
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    config = resolve_config(args.preset, args.set, devices=jax.device_count(), platform=platform)  # as magic train
    step_rate, per_step = train_step_tokens_per_second(config, args.steps)
    flops = flops_per_step(with_tokenizer_vocab(config, ByteTokenizer()))
    line = (f"train step ({args.preset}, batch {config.batch_size} x {config.data.seq_len}, {platform}): "
            f"{per_step * 1e3:.1f} ms/step, {step_rate:,.0f} tokens/s, {flops / per_step / 1e9:.1f} GFLOP/s")
    if platform == "cpu":  # the peak measured now, in this run, not a figure from another day
        probe = probe_cpu_matmul_peak()
        peak = cpu_matmul_peak(measured=probe)  # and kept for magic train's MFU if the probe was quiet
        line += f" = {flops / per_step / peak:.1%} of this CPU's f32 matmul peak, {peak / 1e9:.0f} GFLOP/s"
    else:  # accelerators: MFU against the chip table's dense bf16 peak (train/planning/chips.py cites it)
        peak = peak_flops_per_device(jax.devices()) * jax.device_count()
        kind = jax.devices()[0].device_kind
        line += (f" = MFU {flops / per_step / peak:.1%} of {jax.device_count()} x {kind}'s bf16 peak"
                 if peak else f" ({kind}: no peak in train/planning/chips.py, so no MFU)")
    print(line)
    if not args.no_pipeline and config.model.family == "decoder":
        from bench_pipeline import pipeline_tokens_per_second

        rate = pipeline_tokens_per_second(seq_len=config.data.seq_len, batch_size=config.batch_size)
        print(f"input pipeline: {rate:,.0f} tokens/s = {rate / step_rate:,.0f}x the train step")


if __name__ == "__main__":
    main()
