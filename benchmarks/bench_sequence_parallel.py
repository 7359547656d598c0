"""Sequence parallelism on GPT-3 175B, v5p-1024: memory and the compiler's step time, with and without.

Runs `magic compile --preset gpt3-175b --topology v5p-1024 --mesh fsdp=-1,tensor=8` (the real CLI,
one subprocess per case, bench_compile_175b.py's runner) for each remat policy and microbatch count
below, with `--set mesh.sequence_parallel=true` and `=false` back to back, and prints one table row
per case: per-device memory (or the shortfall), the loop-corrected step time, and with --calibrate
the compiler's own figure from its 1- and 2-layer compiles. Needs libtpu; ~4 min a compile on 2
CPU cores (twice that with --calibrate).

  python benchmarks/bench_sequence_parallel.py [--calibrate] [--cases full:4,full:2,full:1,save_dots:4]
"""

from __future__ import annotations

import argparse
import re
import sys

from bench_compile_175b import run_case, versions

BASE = ["--preset", "gpt3-175b", "--topology", "v5p-1024", "--mesh", "fsdp=-1,tensor=8"]


def figures(out: str) -> tuple[str, str]:
    """(memory, step time) from `magic compile`'s report."""
    total = re.search(r"= total\s+([\d.]+ GiB)", out)
    short = re.search(r"short by ([\d.]+ GiB)", out)
    step = re.search(r"compiler's own estimate \(optimal_seconds, ([^)]+)\): ([\d.]+ \w+)/step", out)
    memory = total[1] if total else f"does not fit (short by {short[1]})" if short else "error"
    return memory, f"{step[2]} ({step[1]})" if step else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", action="store_true", help="the compiler's own step time (two more compiles)")
    parser.add_argument("--cases", default="full:4,full:2,full:1,save_dots:4,save_dots:2",
                        help="remat:microbatches pairs, comma-separated")
    opts = parser.parse_args()
    from matrixmagic.train.planning.chips import libtpu_available

    if not libtpu_available():
        print("libtpu is not installed: pip install 'matrixmagic[tpu]' (this benchmark compiles for TPU pods).")
        return 2
    print("# bench_sequence_parallel\n" + versions() + "\n", flush=True)
    rows = ["| remat, microbatches | sequence parallel | per-device memory | compiler's step estimate |",
            "|---|---|---|---|"]
    for case in opts.cases.split(","):
        remat, micro = case.split(":")
        for sp in ("true", "false"):
            args = BASE + ["--remat", remat, "--microbatches", micro, "--set", f"mesh.sequence_parallel={sp}"]
            args += ["--calibrate"] if opts.calibrate else []
            status, out, wall, _ = run_case(args)
            memory, step = figures(out)
            rows.append(f"| {remat}, {micro} | {'on' if sp == 'true' else 'off'} | {memory} | {step} |")
            print(f"... {rows[-1]}  [exit {status}, {wall:.0f} s]", flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
