"""Checkpoint cost against step time: does an async save stall training?

On the default config (gpt-tiny, `magic train`'s batch and seq_len, fp32 AdamW state) this measures

* the normal train step (median of `--steps`, each synchronized);
* a save's blocking part (what `Checkpointer.save` costs the loop: the on-device
  fingerprint, the device->host copy, starting the background write);
* the save's total time until orbax has committed the step directory (no training then);
* the steps that run while a save is being written in the background.

The claim checked: those steps stay within 1.5x of a normal step (`--limit`); the exit
status is 1 if they do not. Batches are synthetic (random tokens): the input pipeline
has its own benchmark, and this isolates the checkpoint from it.

    python benchmarks/bench_checkpoint.py [--saves 5] [--steps 10] [--workdir /tmp/x]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time


def build(batch_size: int, seq_len: int, preset: str):
    import jax

    from matrixmagic.train.run import resolve_config, train_run

    config = resolve_config(preset, [f"batch_size={batch_size}", f"data.seq_len={seq_len}", "model.vocab_size=256"])
    _, run = train_run(config)  # the step `magic train` runs
    return config, run, run.init_state(jax.random.PRNGKey(0))


def timed_step(run, state, batch):
    import jax

    start = time.perf_counter()
    state, metrics = run.train_step(state, batch)
    jax.block_until_ready(metrics["loss"])
    return state, time.perf_counter() - start


def measure(saves: int, steps: int, batch_size: int, seq_len: int, preset: str, workdir: str) -> dict:
    from bench_train_step import synthetic_batch

    from matrixmagic.sharding.memory import tree_bytes
    from matrixmagic.train.checkpoint import Checkpointer

    config, run, state = build(batch_size, seq_len, preset)
    batch = run.put_batch(synthetic_batch(config))
    for _ in range(3):  # compile and warm up
        state, _ = timed_step(run, state, batch)
    normal = []
    for _ in range(steps):
        state, dt = timed_step(run, state, batch)
        normal.append(dt)

    ckpt = Checkpointer(workdir, keep=2)
    ckpt.save(0, state, {}, config)  # the first save creates directories and handlers: not timed
    ckpt.wait()
    blocking, total, during, step = [], [], [], 0
    for _ in range(saves):  # a save alone: blocking part, then until orbax has committed it
        step += 1
        start = time.perf_counter()
        ckpt.save(step, state, {"iterator": {"step": step}}, config)
        blocking.append(time.perf_counter() - start)
        ckpt.wait()
        total.append(time.perf_counter() - start)
    for _ in range(saves):  # a save while training: the steps that overlap the background write
        step += 1
        ckpt.save(step, state, {"iterator": {"step": step}}, config)
        while ckpt.manager.is_saving_in_progress():
            state, dt = timed_step(run, state, batch)
            during.append(dt)
        for _ in range(2):  # and then settle, so one save's tail does not shade the next baseline
            state, _ = timed_step(run, state, batch)
    ckpt.close()
    return {"state_mb": tree_bytes(run.abstract_state, per_device=False) / 2**20,
            "step_s": statistics.median(normal), "step_max_s": max(normal),
            "save_blocking_s": statistics.median(blocking), "save_total_s": statistics.median(total),
            "steps_during_save": len(during), "during_median_s": statistics.median(during) if during else float("nan"),
            "during_max_s": max(during) if during else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt-tiny")
    from matrixmagic.configs.train_config import TrainConfig

    default = TrainConfig()
    parser.add_argument("--batch-size", type=int, default=default.batch_size)
    parser.add_argument("--seq-len", type=int, default=default.data.seq_len)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="normal steps timed for the baseline")
    parser.add_argument("--limit", type=float, default=1.5, help="allowed step-time ratio during a save")
    parser.add_argument("--workdir", help="where to write (default: a temp dir)")
    args = parser.parse_args()
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        r = measure(args.saves, args.steps, args.batch_size, args.seq_len, args.preset, args.workdir or tmp)
    ratio = r["during_median_s"] / r["step_s"]
    print(f"{args.preset}, batch {args.batch_size} x seq {args.seq_len}, {jax.devices()[0].platform} "
          f"x{jax.device_count()}, state {r['state_mb']:.1f} MiB (params + AdamW, fp32)")
    print(f"  train step (normal)        {r['step_s'] * 1e3:8.1f} ms median, {r['step_max_s'] * 1e3:.1f} ms max")
    print(f"  save, blocking part        {r['save_blocking_s'] * 1e3:8.1f} ms median "
          f"({r['save_blocking_s'] / r['step_s']:.2f} steps)")
    print(f"  save, until committed      {r['save_total_s'] * 1e3:8.1f} ms median "
          f"({r['save_total_s'] / r['step_s']:.2f} steps)")
    print(f"  steps during async writes  {r['during_median_s'] * 1e3:8.1f} ms median, "
          f"{r['during_max_s'] * 1e3:.1f} ms max over {r['steps_during_save']} steps")
    ok = ratio <= args.limit
    print(f"  ratio during/normal        {ratio:8.2f}x  (limit {args.limit}x): {'OK' if ok else 'STALLS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
