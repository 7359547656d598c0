"""`magic plan` for GPT-3 175B on v5p-1024 on a CPU-only machine: wall time of the explicit and
the searched plan, each the real CLI in its own subprocess, with the machine's load beside it.

  1. explicit: --mesh fsdp=-1,tensor=8 --remat full --microbatches 4 (one compile, FLOPs
     corrected from the HLO's loop trip counts: the target is <= 60 s on a quiet machine)
  2. searched: no layout flags (pruned by the analytic memory model, the best few compiled:
     target <= 300 s)
Compile times scale with the free CPU: the load average is printed before and after each.
Needs libtpu (pip install 'matrixmagic[tpu]').

  python benchmarks/bench_plan.py [--only explicit|searched]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_compile_175b import versions  # same header: date, versions, host

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--preset", "gpt3-175b", "--topology", "v5p-1024", "--tokens", "300B"]
CASES = {
    "explicit": COMMON + ["--mesh", "fsdp=-1,tensor=8", "--remat", "full", "--microbatches", "4"],
    "searched": COMMON,
}


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run_plan(args: list[str]) -> tuple[int, str, float]:
    cmd = [sys.executable, "-c", "import sys; from matrixmagic.train.cli import main; sys.exit(main())", "plan", *args]
    env = {**os.environ, "MAGIC_COMPILE_CACHE": "off"}  # a cold compile every time: what a first user waits
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          check=False)
    return done.returncode, done.stdout, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(CASES), help="run one case")
    opts = parser.parse_args()
    from matrixmagic.train.planning.chips import libtpu_available

    if not libtpu_available():
        print("libtpu is not installed: pip install 'matrixmagic[tpu]' (this benchmark compiles for TPU pods).")
        return 2
    print("# bench_plan\n" + versions() + "\n", flush=True)
    rows = []
    for name, args in CASES.items():
        if opts.only and name != opts.only:
            continue
        before = load()
        status, out, wall = run_plan(args)
        rows.append(f"  {name:9s} wall {wall:6.0f} s  exit {status}  load average (1/5/15 min) {before} before, "
                    f"{load()} after")
        print(f"## {name}\n$ magic plan {' '.join(args)}\n{out.rstrip()}\n[{rows[-1].strip()}]\n", flush=True)
    print("## wall time of `magic plan` (gpt3-175b, v5p-1024, 300B tokens)\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
