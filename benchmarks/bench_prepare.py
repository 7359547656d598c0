"""`magic data prepare`: throughput, peak memory and time to first step, against corpus size.

Why: training on a directory of text files used to build a TFDS dataset and pack every
token in memory before step 1, so memory and start-up grew with the corpus. `magic data
prepare` writes token shards once (N worker processes); `magic train --set
data.source=SHARDS` then reads them lazily. This checks the claims: **peak RSS flat in
corpus size and under 1 GiB; time to first step under 15 s for the 3 GB corpus.**

For each corpus size (`--sizes`, GB = 1e9 bytes) it generates a synthetic corpus (below),
then runs, each as its own command with a fresh output directory:

* `magic data prepare CORPUS --out SHARDS --workers N` for N = 1 and 2: input MB/s (the
  command's wall, Python start-up included) and peak RSS;
* `magic train --preset gpt-tiny --set data.source=SHARDS`, one step, no eval, no sample:
  peak RSS, time to first step (launch until metrics.jsonl has its step-1 row: imports,
  data, compile and the step) and the command's wall (plus the checkpoint save);
* for the smallest size only, the baseline: the same 1-step train with data.source=CORPUS,
  from an empty data dir (a TFDS build, then the tokens packed beside it: into shards since
  `magic data prepare`, in memory before it: docs/benchmarks-data.md measures both).

$HOME starts empty, so the first train (on the smallest shards) also fills jax's compile
cache, matplotlib's font cache and the CPU peak calibration: it is printed as "cold" and
kept out of the table, whose trains all find those caches warm (as any second run does).

Peak RSS is the sum of VmRSS over the command's process tree (workers included), sampled
every 0.05 s from /proc: pages shared by forked workers are counted once per process, so
it is an upper bound; the per-command lines also give the peak of the summed PSS (shared
pages split between their processes). $HOME and $MATRIXMAGIC_DATA_DIR point into `--root`:
no user cache is read or written. Nothing drops the page cache: a corpus generated or read
shortly before is read from memory, one that was evicted from disk (by the first prepare).

The corpus: deterministic pseudo-random text, half English-like prose and half Python-like
code, drawn (Zipf-like) from a fixed word list with numpy's RNG, one document per ~1 MB
file, 32 files per directory two levels deep. It is kept in `--root` and reused when its
size matches; the corpora are deleted at the end unless `--keep`.

    python benchmarks/bench_prepare.py [--sizes 0.3,3] [--root /tmp/matrixmagic-bench-prepare] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

MAGIC = os.path.join(os.path.dirname(sys.executable), "magic")
GB, MB = 1e9, 1e6
PROSE_WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
               "but have an they you were her she there been one all we their has would when if so no will more "
               "can who out time only data model matrix train step memory shard worker corpus token batch layer "
               "weight value small large first number people after two over new may could other than then these "
               "into some very through just where most because between under while during without again each same "
               "such both those another known")
CODE_WORDS = ("def class return self if else elif for in while import from as with try except raise None True False "
              "and or not is lambda yield pass break continue assert print len range list dict int str float np jax "
              "x y i n batch params state config step tokens shape dtype result value key path name args kwargs")
# (separator, weight): a token is a word and what follows it
PROSE_SEPS = ((" ", 80), (", ", 8), (". ", 7), (".\n", 3), (".\n\n", 2))
CODE_SEPS = ((" ", 30), ("(", 10), (")", 8), (", ", 8), (": ", 5), (" = ", 8), (".", 8), ("\n    ", 10),
             (":\n        ", 5), ("\n", 6), ("\n\n", 2))


def token_table(words: str, seps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bytes [V, width] uint8, lengths [V], probabilities [V]) of every word + separator: the
    words Zipf-like (in the list's order), the separators by weight."""
    raw = [(w + s).encode() for w in words.split() for s, _ in seps]
    table = np.zeros((len(raw), max(map(len, raw))), np.uint8)
    for i, b in enumerate(raw):
        table[i, : len(b)] = np.frombuffer(b, np.uint8)
    p = np.outer(1.0 / (np.arange(len(words.split())) + 2.0), [weight for _, weight in seps]).ravel()
    return table, np.array([len(b) for b in raw]), p / p.sum()


TABLES = [token_table(PROSE_WORDS, PROSE_SEPS), token_table(CODE_WORDS, CODE_SEPS)]


def document(index: int, size: int) -> bytes:
    """Document `index` of a corpus: `size` bytes, the same on every run (vectorized: no per-word loop)."""
    rng = np.random.default_rng(index)
    table, lengths, p = TABLES[index % 2]
    ids = rng.choice(len(p), size=int(size / (lengths @ p)) + 1024, p=p)
    rows = table[ids]
    text = rows[np.arange(table.shape[1]) < lengths[ids][:, None]]  # each row cut to its token's length
    while len(text) < size:  # the estimate fell short (rare): repeat the tail
        text = np.concatenate([text, text[: size - len(text)]])
    return text[:size].tobytes()


def make_corpus(root: str, gigabytes: float) -> tuple[str, int, int]:
    """(directory, bytes, files) of the corpus of this size, generated unless already there."""
    total = int(gigabytes * GB)
    directory = os.path.join(root, f"corpus-{gigabytes:g}GB")
    marker = directory + ".json"
    done = json.loads(Path(marker).read_text()) if os.path.exists(marker) else {}
    if done.get("bytes") == total and os.path.isdir(directory):
        files = done["files"]
        print(f"corpus {gigabytes:g} GB: reusing {directory} ({files} files)", flush=True)
        return directory, total, files
    shutil.rmtree(directory, ignore_errors=True)
    start, written, index = time.perf_counter(), 0, 0
    sizes = np.random.default_rng(1).integers(int(0.75 * MB), int(1.25 * MB), size=total // int(0.75 * MB) + 2)
    while written < total:
        size = int(min(sizes[index], total - written))
        folder = os.path.join(directory, f"d{index // 1024:03d}", f"d{index // 32 % 32:02d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"doc-{index:06d}.txt"), "wb") as f:
            f.write(document(index, size))
        written, index = written + size, index + 1
    Path(marker).write_text(json.dumps({"bytes": total, "files": index}))
    print(f"corpus {gigabytes:g} GB: generated {index} files in {time.perf_counter() - start:.1f} s "
          f"({total / MB / (time.perf_counter() - start):.0f} MB/s) into {directory}", flush=True)
    return directory, total, index


def _kib(path: str, field: str) -> int:
    try:
        with open(path) as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field)), 0)
    except OSError:
        return 0  # exited between the scan and the read


def tree_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, Pss) summed over `pid` and all its descendants, in MiB (a /proc scan: stdlib only)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        rss += _kib(f"/proc/{p}/status", "VmRSS:")
        pss += _kib(f"/proc/{p}/smaps_rollup", "Pss:")
    return rss / 1024, pss / 1024


def run(cmd: list[str], env: dict, workdir: str | None = None, timeout: float = 3600) -> dict:
    """Run `cmd`, sampling its tree's RSS every 0.05 s; with `workdir`, also when its first step logged."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, pss, first, step_time, out = 0.0, 0.0, None, None, []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)  # never block on a full pipe
    reader.start()
    metrics = os.path.join(workdir, "metrics.jsonl") if workdir else None
    while proc.poll() is None and time.perf_counter() - start < timeout:
        rss_now, pss_now = tree_mib(proc.pid)
        peak, pss = max(peak, rss_now), max(pss, pss_now)
        if metrics and first is None and os.path.exists(metrics):
            lines = Path(metrics).read_text().splitlines(keepends=True)
            row = next((r for r in map(json.loads, lines) if r.get("split") == "train"), None)
            if row:
                first, step_time = time.perf_counter() - start, row.get("step_time")
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    rc = proc.wait()
    reader.join(timeout=5)
    return {"rc": rc, "wall": time.perf_counter() - start, "peak": peak, "pss": pss, "first": first,
            "step_time": step_time, "out": "".join(out)}


def checked(r: dict, what: str) -> dict:
    if r["rc"] != 0:
        print(f"  FAILED ({what}, exit {r['rc']}):\n" + "\n".join("    " + s for s in r["out"].splitlines()[-25:]))
    return r


def train_cmd(source: str, workdir: str) -> list[str]:
    sets = [f"data.source={source}", "steps=1", "eval_batches=0", "sample_tokens=0", f"workdir={workdir}"]
    return [MAGIC, "train", "--preset", "gpt-tiny", *(a for s in sets for a in ("--set", s))]


def train_once(source: str, wd: str, env: dict, what: str) -> dict:
    shutil.rmtree(wd, ignore_errors=True)
    r = checked(run(train_cmd(source, wd), env, wd), what)
    first = f"{r['first']:.1f} s" if r["first"] is not None else "n/a"
    step = f" (step 1 itself {r['step_time']:.1f} s, compile included)" if r["step_time"] is not None else ""
    print(f"{what}: first step after {first}{step}, wall {r['wall']:.1f} s, peak RSS {r['peak']:.0f} MiB "
          f"(PSS {r['pss']:.0f})", flush=True)
    shutil.rmtree(wd, ignore_errors=True)
    return r


def bench_size(gigabytes: float, root: str, env: dict, first: bool) -> dict:
    corpus, total, files = make_corpus(root, gigabytes)
    row = {"gb": gigabytes, "files": files, "bytes": total}
    out, wd = os.path.join(root, f"shards-{gigabytes:g}GB"), os.path.join(root, "run")
    for workers in (1, 2):
        shutil.rmtree(out, ignore_errors=True)
        what = f"prepare {gigabytes:g} GB, {workers} worker(s)"
        r = row[f"prep{workers}"] = checked(
            run([MAGIC, "data", "prepare", corpus, "--out", out, "--workers", str(workers), "--quiet"], env), what)
        print(f"{what}: {r['wall']:.1f} s, {total / MB / r['wall']:.1f} MB/s, peak RSS {r['peak']:.0f} MiB "
              f"(PSS {r['pss']:.0f}); it printed:\n" + "\n".join("    " + s for s in r["out"].splitlines()[-6:]),
              flush=True)
    row["shard_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    if first:  # a fresh $HOME: the compile cache, matplotlib's font cache, the CPU peak calibration
        row["cold"] = train_once(out, wd, env, f"train 1 step on shards of {gigabytes:g} GB, cold (not in the table)")
    row["train"] = train_once(out, wd, env, f"train 1 step on shards of {gigabytes:g} GB")
    shutil.rmtree(out, ignore_errors=True)
    if first:
        shutil.rmtree(env["MATRIXMAGIC_DATA_DIR"], ignore_errors=True)  # the TFDS build and packing are measured
        row["baseline"] = train_once(corpus, wd, env, f"baseline: train 1 step on the {gigabytes:g} GB directory")
        shutil.rmtree(env["MATRIXMAGIC_DATA_DIR"], ignore_errors=True)
    return row


def secs(r: dict, key: str) -> str:
    return f"{r[key]:.1f}" if r.get(key) is not None else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.3,3", help="corpus sizes in GB (1e9 bytes), comma-separated")
    parser.add_argument("--root", default="/tmp/matrixmagic-bench-prepare", help="corpora, shards, runs, caches")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpora for the next run")
    args = parser.parse_args()
    sizes = sorted(float(s) for s in args.sizes.split(","))
    env = {**os.environ, "HOME": os.path.join(args.root, "home"),
           "MATRIXMAGIC_DATA_DIR": os.path.join(args.root, "tfds"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    shutil.rmtree(env["HOME"], ignore_errors=True)  # cold on purpose: see the "cold" line
    os.makedirs(env["HOME"])
    rows = [bench_size(gb, args.root, env, first=i == 0) for i, gb in enumerate(sizes)]

    print(f"\n{os.cpu_count()} CPUs. prepare: MB/s of input (1e6 bytes) over the command's wall; peak RSS: "
          f"summed over the process tree, MiB; train: 1 step of gpt-tiny, first step s = launch to step 1 done")
    print(f"{'corpus':>8} {'files':>6} {'shards':>7} | {'prepare MB/s':>13} | {'prepare peak':>13} | "
          f"{'train':>6} {'first':>6} {'train':>6}")
    print(f"{'GB':>8} {'':>6} {'MB':>7} | {'1 w':>6} {'2 w':>6} | {'1 w':>6} {'2 w':>6} | "
          f"{'peak':>6} {'step s':>6} {'wall s':>6}")
    for r in rows:
        p1, p2, t = r["prep1"], r["prep2"], r["train"]
        print(f"{r['gb']:8g} {r['files']:6d} {r['shard_bytes'] / MB:7.0f} | {r['bytes'] / MB / p1['wall']:6.1f} "
              f"{r['bytes'] / MB / p2['wall']:6.1f} | {p1['peak']:6.0f} {p2['peak']:6.0f} | {t['peak']:6.0f} "
              f"{secs(t, 'first'):>6} {t['wall']:6.1f}")
    b = rows[0]["baseline"]
    print(f"{rows[0]['gb']:8g} {'':>6} {'':>7} | {'baseline: train on the DIR':<29} | "
          f"{b['peak']:6.0f} {secs(b, 'first'):>6} {b['wall']:6.1f}")

    kinds = {"prepare 1 w": "prep1", "prepare 2 w": "prep2", "train": "train"}
    peaks = {name: [r[key]["peak"] for r in rows] for name, key in kinds.items()}
    flat = all(max(v) <= 1.25 * min(v) and max(v) < 1024 for v in peaks.values())
    last = rows[-1]["train"]
    fast = last["first"] is not None and last["first"] < 15
    failed = [k for r in rows for k in (*kinds.values(), "cold", "baseline") if k in r and r[k]["rc"] != 0]
    print("goal: peak RSS flat in corpus size (largest <= 1.25x smallest) and under 1 GiB for every size: "
          + ", ".join(f"{name} {' / '.join(f'{p:.0f}' for p in v)} MiB" for name, v in peaks.items())
          + f": {'OK' if flat else 'MISSED'}")
    print(f"goal: time to first step under 15 s for the {rows[-1]['gb']:g} GB corpus: {secs(last, 'first')} s: "
          f"{'OK' if fast else 'MISSED'}")
    if failed:
        print(f"commands that failed: {', '.join(failed)} (see FAILED above)")
    if not args.keep:
        for gb in sizes:
            shutil.rmtree(os.path.join(args.root, f"corpus-{gb:g}GB"), ignore_errors=True)
            if os.path.exists(m := os.path.join(args.root, f"corpus-{gb:g}GB.json")):
                os.remove(m)
    return 0 if flat and fast and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
