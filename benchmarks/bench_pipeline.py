"""Input-pipeline throughput: tokens per second that `batch(step)` can deliver.

The pipeline must never be the bottleneck of a train step, so this measures the
steady state (after the one-time build and packing, which are cached) on the default
config: stdlib corpus, byte tokenizer, the default run's seq_len and batch, decoder family.

    python benchmarks/bench_pipeline.py [--family encoder] [--steps 200]
"""

from __future__ import annotations

import argparse
import time

from matrixmagic.configs.train_config import TrainConfig

DEFAULT = TrainConfig()


def pipeline_tokens_per_second(family: str = "decoder", source: str = "stdlib", tokenizer: str = "bytes",
                               seq_len: int = DEFAULT.data.seq_len, batch_size: int = DEFAULT.batch_size,
                               steps: int = 200,
                               warmup: int = 10, seed: int = 0, data_dir=None) -> float:
    """Input tokens per second over `steps` calls of `batch(step)` after `warmup` calls.

    Steps are spread over the run (stride 997) so the row reads are not cache-friendly
    neighbours. Building the dataset and packing happen (once) before timing starts.
    """
    from matrixmagic.train.data.pipeline import make_pipeline

    pipe = make_pipeline(family, source, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                         data_dir=data_dir, process_index=0, process_count=1)
    for step in range(warmup):
        pipe.batch(step)
    start = time.perf_counter()
    for i in range(steps):
        pipe.batch(warmup + 997 * i)
    elapsed = time.perf_counter() - start
    return steps * pipe.tokens_per_batch / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="decoder")
    parser.add_argument("--source", default="stdlib")
    parser.add_argument("--tokenizer", default="bytes")
    parser.add_argument("--seq-len", type=int, default=DEFAULT.data.seq_len)
    parser.add_argument("--batch-size", type=int, default=DEFAULT.batch_size)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    from matrixmagic.train.data.pipeline import make_pipeline

    make_pipeline(args.family, args.source, args.tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
                  data_dir=args.data_dir, process_index=0, process_count=1)
    print(f"prepare (build + pack, cached after the first run): {time.perf_counter() - start:.2f} s")
    rate = pipeline_tokens_per_second(args.family, args.source, args.tokenizer, args.seq_len, args.batch_size,
                                      args.steps, data_dir=args.data_dir)
    print(f"input pipeline ({args.family}, {args.source}, {args.tokenizer}, seq_len {args.seq_len}, "
          f"batch {args.batch_size}): {rate:,.0f} tokens/s")


if __name__ == "__main__":
    main()
