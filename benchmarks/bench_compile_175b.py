"""GPT-3 175B compiled for TPU pods on a CPU-only machine: does it fit, how fast, how long to compile.

Runs `magic compile` (the real CLI, one subprocess per case so each gets its own
peak RSS) for:
  1. gpt3-175b on v5p-1024 (512 chips): memory vs HBM, compiler vs analytic FLOPs, step time
  2. gpt3-175b on a second TPU family (v4-1024, 512 chips of 32 GiB)
  3. gpt3-175b on v5e-16: too small, reported as not fitting with the shortfall
  4. compile time vs depth: 96 scanned layers, 12 scanned layers, 12 unrolled layers
Needs libtpu (pip install 'matrixmagic[tpu]'); takes ~40 min on 2 CPU cores.

  python benchmarks/bench_compile_175b.py [--quick]   (--quick: skip the unrolled 12-layer compile)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ["--preset", "gpt3-175b", "--mesh", "fsdp=-1,tensor=8", "--remat", "full"]
CASES = [
    ("175B on v5p-1024", BASE + ["--topology", "v5p-1024", "--microbatches", "4"]),
    ("175B on v4-1024", BASE + ["--topology", "v4-1024", "--microbatches", "8"]),
    ("175B on v5e-16 (too small)", BASE[:2] + ["--mesh", "fsdp=-1,tensor=4", "--remat", "full", "--topology",
                                               "v5e-16", "--microbatches", "4", "--no-calibrate"]),
]
DEPTH = [
    ("96 layers, scanned", []),
    ("12 layers, scanned", ["--set", "model.num_layers=12"]),
    ("12 layers, unrolled", ["--set", "model.num_layers=12", "--set", "model.scan_layers=False"]),
]


def versions() -> str:
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    pkgs = ", ".join(f"{p} {version(p)}" for p in ("jax", "jaxlib", "libtpu", "flax", "optax"))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"date {datetime.datetime.now().isoformat(timespec='seconds')}\n"
            f"python {platform.python_version()}, {pkgs}\n"
            f"host {platform.machine()}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM (CPU only: no accelerator)")


def run_case(args: list[str]) -> tuple[int, str, float, float]:
    """(exit status, stdout, wall seconds, peak RSS GiB) of one `magic compile`."""
    cmd = [sys.executable, "-c", "import sys; from matrixmagic.train.cli import main; sys.exit(main())", "compile", *args]
    env = dict(os.environ)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out, time.perf_counter() - start, usage.ru_maxrss / 2**20


def compile_seconds(out: str) -> str:
    m = re.search(r"lowered in ([\d.]+) s, compiled in ([\d.]+) s", out)
    return f"lower {m[1]} s + compile {m[2]} s" if m else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the slow unrolled 12-layer compile")
    opts = parser.parse_args()
    from matrixmagic.train.planning.chips import libtpu_available

    if not libtpu_available():
        print("libtpu is not installed: pip install 'matrixmagic[tpu]' (this benchmark compiles for TPU pods).")
        return 2
    print("# bench_compile_175b\n" + versions() + "\n", flush=True)
    for title, args in CASES:
        status, out, wall, rss = run_case(args)
        print(f"## {title}\n$ magic compile {' '.join(args)}\n{out.rstrip()}\n"
              f"[exit {status}; wall {wall:.0f} s; peak RSS {rss:.2f} GiB]\n", flush=True)
    rows = []
    depth = DEPTH[:2] if opts.quick else DEPTH
    for title, extra in depth:
        args = BASE + ["--topology", "v5p-1024", "--microbatches", "4", "--no-calibrate"] + extra
        status, out, wall, rss = run_case(args)
        rows.append(f"  {title:22s} {compile_seconds(out):34s} wall {wall:6.0f} s  peak RSS {rss:.2f} GiB  "
                    f"exit {status}")
        print(f"... {rows[-1].strip()}", flush=True)
    print("## compile time vs depth (gpt3-175b widths, v5p-1024, fsdp=64 tensor=8, remat full, 4 microbatches)\n"
          + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
