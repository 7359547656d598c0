"""How long `magic params` takes over every preset, and how much memory it needs.

Counting walks each preset's parameter tree from `jax.eval_shape(model.init)`, so even
GPT-3 175B (700 GB of float32 weights) costs only tracing time. This runs the real
command in a fresh subprocess (imports and JAX start-up included, as a user sees it) and
reports its wall time and peak resident memory (getrusage of the child).

Targets: under 30 s and under 3 GB. The figures are printed, not asserted: wall time
depends on the machine and its load.

    python benchmarks/bench_params.py [--repeat 1] [PRESET ...]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_SECONDS = 30.0
TARGET_BYTES = 3 * 1024**3


def run_once(presets: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the largest child so far, its stdout)."""
    cmd = [sys.executable, "-m", "matrixmagic.train.cli", "params", *presets]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"magic params failed with exit code {proc.returncode}")
    # ru_maxrss of RUSAGE_CHILDREN: the peak RSS of the largest waited-for child (KiB on Linux).
    # This script starts no other children, so it is the peak of `magic params` itself.
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kib * 1024, proc.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="preset names (default: all, as `magic params`)")
    parser.add_argument("--repeat", type=int, default=1, help="runs to time (each a fresh process)")
    args = parser.parse_args(argv)

    runs = [run_once(args.presets) for _ in range(args.repeat)]
    output = runs[-1][2]
    n_presets = output.count("  parameters ")
    for i, (wall, peak, _) in enumerate(runs):
        print(f"run {i + 1}: wall {wall:6.2f} s   peak RSS so far {peak / 1024**2:7.1f} MiB")
    wall = min(r[0] for r in runs)
    peak = max(r[1] for r in runs)
    print(f"magic params ({n_presets} presets, gpt3-175b included, via eval_shape)")
    print(f"  wall time  {wall:6.2f} s    target < {TARGET_SECONDS:.0f} s    "
          f"{'OK' if wall < TARGET_SECONDS else 'OVER'}")
    print(f"  peak RSS   {peak / 1024**3:6.2f} GiB  target < {TARGET_BYTES / 1024**3:.0f} GiB  "
          f"{'OK' if peak < TARGET_BYTES else 'OVER'}")
    print(f"  (cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
