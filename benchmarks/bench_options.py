"""What each model option costs per train step: gpt-tiny with one option changed at a time, and
llama-tiny (all of them), measured in one process in interleaved rounds so every row shares the
machine's load; the ratio is to gpt-tiny's median of the same run.

    python benchmarks/bench_options.py [--rounds 3] [--steps 15]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from bench_train_step import train_step_tokens_per_second

VARIANTS = {
    "gpt-tiny": {},
    "positional=rope": dict(positional="rope"),
    "norm=rmsnorm": dict(norm="rmsnorm"),
    "activation=swiglu, d_ff=368": dict(activation="swiglu", d_ff=368),
    "num_kv_heads=1": dict(num_kv_heads=1),
    "untied, no biases": dict(tie_embeddings=False, use_bias=False),
}


def main() -> None:
    from matrixmagic.configs.train_config import train_config_for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    base = train_config_for("gpt-tiny")
    configs = {name: dataclasses.replace(base, model=base.model.replace(**changes))
               for name, changes in VARIANTS.items()}
    configs["llama-tiny (all of them)"] = train_config_for("llama-tiny")
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, config in configs.items():
            times[name].append(train_step_tokens_per_second(config, steps=args.steps)[1])
    reference = statistics.median(times["gpt-tiny"])
    print(f"{'config':32s} {'ms/step (median)':>17s} {'x gpt-tiny':>11s}")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:32s} {1000 * median:17.1f} {median / reference:11.2f}")


if __name__ == "__main__":
    main()
