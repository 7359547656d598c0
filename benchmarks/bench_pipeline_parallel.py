"""The pipeline's bubble on 8 fake CPU devices, measured, beside (S - 1) / (R M + S - 1).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python benchmarks/bench_pipeline_parallel.py

(benchmarks/bench_pipeline.py is the data pipeline's throughput.)

What "measured" means here. Fake CPU devices share this machine's cores, so a stage that
sits idle in the schedule does not leave a core free for the others... and in this SPMD
program it is not idle anyway: every stage runs its layers every step and the results of
the idle (stage, step) pairs are dropped (model/stages.py). The bubble therefore shows up
as extra total compute, which shared cores do measure: the same layers on the same batch
over the same 8 devices, once as the pipeline (S stages x 8/S data shards, R M + S - 1
steps) and once unpipelined (a plain scan, the batch split 8 ways), give

    measured bubble = 1 - T(unpipelined) / T(pipeline)

the share of the pipeline's time that was not useful layer work. It also charges the
pipeline's own overheads (moving activations between stages, the microbatch buffer), so it
sits at or above the formula; on real chips the same fraction is idle time per device.
"counted" is the idle share of the schedule's (stage, step) pairs (configs/pipeline.py).

The layer is a residual MLP (x + tanh(x W1) W2, d -> 4d -> d), so the time is matmuls,
as in a Transformer layer; 16 layers, d = 128, microbatches of 16 rows of 32 positions
(the batch is M microbatches, so every case runs the same matmul shapes per step and the
unpipelined reference does exactly the pipeline's useful work). Timings on shared cores
are noisy, more so when other processes load them: each figure takes the fastest of
--repeats alternating runs of the two programs.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from matrixmagic.configs.pipeline import Schedule, bubble_fraction, idle_fraction
from matrixmagic.model.stages import Pipeline, pipeline_apply

MICRO_ROWS, LENGTH = 16, 32
CASES = [(2, 1, 2), (2, 1, 8), (4, 1, 4), (4, 1, 16), (4, 2, 4), (4, 2, 8), (8, 1, 8), (8, 2, 8)]


def layer(params, x, args, key):
    w1, w2 = params
    return x + jnp.tanh(x @ w1) @ w2


def fastest_pair(a, b, args_a, args_b, repeats: int) -> tuple[float, float]:
    """The fastest of `repeats` runs of a(*args_a) and of b(*args_b), after one compiling call
    each, run alternately: the minimum is the least disturbed by whatever else shares the cores,
    and alternating exposes both to the same disturbances."""
    jax.block_until_ready(a(*args_a))
    jax.block_until_ready(b(*args_b))
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, (fn, fn_args) in enumerate(((a, args_a), (b, args_b))):
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def measure(stages: int, repeats: int, micro: int, weights, repeat_runs: int) -> float:
    devices = jax.devices()
    x = jax.random.normal(jax.random.PRNGKey(1), (micro * MICRO_ROWS, LENGTH, weights[0].shape[1]))
    mesh = Mesh(np.asarray(devices).reshape(stages, len(devices) // stages), ("stage", "data"),
                axis_types=(AxisType.Auto,) * 2)
    rows = NamedSharding(mesh, P("data"))
    layers = NamedSharding(mesh, P("stage"))
    pipeline = Pipeline(Schedule(stages, repeats, micro), "stage")

    def piped(w, h):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return pipeline_apply(layer, w, h, (), pipeline)

    def plain(w, h):
        return jax.lax.scan(lambda c, p: (layer(p, c, (), None), None), h, w)[0]
    flat = Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))
    piped_fn = jax.jit(piped, in_shardings=(layers, rows))
    plain_fn = jax.jit(plain, in_shardings=(NamedSharding(flat, P()), NamedSharding(flat, P("data"))))
    t_pipe, t_plain = fastest_pair(piped_fn, plain_fn, (weights, x), (weights, x), repeat_runs)
    return 1 - t_plain / t_pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (the fastest counts)")
    parser.add_argument("--cases", default="", help="S,R,M;S,R,M... (default: the table's)")
    args = parser.parse_args()
    cases = [tuple(int(v) for v in c.split(",")) for c in args.cases.split(";")] if args.cases else CASES
    if jax.device_count() != 8:
        raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu")
    d, num_layers = 128, 16
    k2, k3 = jax.random.split(jax.random.PRNGKey(0), 2)
    weights = (jax.random.normal(k2, (num_layers, d, 4 * d)) / d ** 0.5,
               jax.random.normal(k3, (num_layers, 4 * d, d)) / (4 * d) ** 0.5)
    print(f"{'S':>2} {'R':>2} {'M':>3} {'steps':>5} {'formula':>8} {'counted':>8} {'measured':>9}")
    for S, R, M in cases:
        schedule = Schedule(S, R, M)
        measured = measure(S, R, M, weights, args.repeats)
        print(f"{S:>2} {R:>2} {M:>3} {schedule.iterations:>5} {bubble_fraction(S, R, M):>8.3f} "
              f"{idle_fraction(schedule):>8.3f} {measured:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
