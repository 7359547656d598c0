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

`--storage` measures instead where a checkpoint goes: the save (until committed) and the
restore (`Checkpointer.restore`, fingerprint check included) of a gpt2-sized TrainState
(default `--preset gpt2`: 124M params plus both AdamW moments, fp32) to a local directory
and to `gs://` on the test GCS server (tests/gcs_server.py, started here on 127.0.0.1),
interleaved in one run, `--repeats` times each, medians printed with MiB/s and peak RSS.
The server is gcp-storage-emulator, a single-threaded Python HTTP server holding the
objects in its memory (`--emulator-dir`: on disk): the gs:// figures measure our path and
tensorstore's HTTP requests against it, not Cloud Storage's throughput.

    python benchmarks/bench_checkpoint.py [--saves 5] [--steps 10] [--workdir /tmp/x]
    python benchmarks/bench_checkpoint.py --storage [--repeats 5] [--preset gpt2] [--emulator-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")


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


# ----------------------------------------------------------------------------- --storage: local vs gs://

EMULATOR_NOTE = ("gs:// is the test GCS server (gcp-storage-emulator: one single-threaded Python HTTP server on "
                 "127.0.0.1, objects in its {where}): these figures measure our save/restore path and tensorstore's "
                 "HTTP requests against a local Python server, not Cloud Storage's throughput.")

# tests/gcs_server.py with two things Cloud Storage does and the emulator does not, each of which
# would otherwise be most of what this measures (a gpt-tiny save: 2.2 s instead of 0.2 s):
# * "100 Continue" to `Expect: 100-continue`: curl (tensorstore's HTTP) sends it with every larger
#   upload and, unanswered (Python's HTTP/1.0 server never answers), waits 1 s before each;
# * a listen backlog of 128, not Python's 5: tensorstore opens up to 32 connections at once, and
#   a connect dropped from a full backlog is retried by the kernel after 1 s.
# Run as `python -c` so this benchmark stays one file.
_SERVER = r"""
import socketserver
import sys
sys.path.insert(0, sys.argv.pop(1))
import gcs_server
from gcp_storage_emulator import server

parse_request = server.RequestHandler.parse_request

def answering_expect(self):
    ok = parse_request(self)
    if ok and self.headers.get("Expect", "").lower() == "100-continue":
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.wfile.flush()
    return ok

server.RequestHandler.parse_request = answering_expect
socketserver.TCPServer.request_queue_size = 128
gcs_server.main(sys.argv[1:])
"""


def start_emulator(data_dir: str | None):
    sys.path.insert(0, TESTS)
    from gcs_helpers import GcsServer

    class Server(GcsServer):
        def command(self) -> list[str]:
            return [sys.executable, "-c", _SERVER, TESTS, *super().command()[2:]]

    srv = Server(bucket="bench", data_dir=data_dir).start()
    # Soft delete off (a bucket setting real GCS has too): the emulator would keep every deleted
    # object's bytes for 7 days, in its memory.
    body = json.dumps({"softDeletePolicy": {"retentionDurationSeconds": "0"}}).encode()
    urllib.request.urlopen(urllib.request.Request(f"{srv.url}/storage/v1/b/{srv.bucket}", data=body, method="PATCH",
                                                  headers={"Content-Type": "application/json"}), timeout=10).read()
    return srv


def _status_kb(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak(pid: int | str = "self") -> None:
    """Start a new peak-RSS window (Linux: '5' to clear_refs resets VmHWM); no-op elsewhere."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib(pid: int | str = "self") -> float:
    try:
        return _status_kb(pid, "VmHWM") / 1024
    except (OSError, StopIteration):
        return float("nan")


def stored_bytes(target: str, srv, step: int) -> int:
    """Bytes of checkpoint step `step` as written (after orbax's zstd), local or in the bucket."""
    if not target.startswith("gs://"):
        root = os.path.join(target, "checkpoints", str(step))
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)
    prefix = f"{target[len('gs://bench/'):]}/checkpoints/{step}/"
    total, token = 0, None
    while True:
        query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
        page = json.load(urllib.request.urlopen(f"{srv.url}/storage/v1/b/{srv.bucket}/o?{query}", timeout=30))
        total += sum(int(item["size"]) for item in page.get("items", []))
        token = page.get("nextPageToken")
        if not token:
            return total


def build_state(preset: str):
    """(config, run, state): the preset's own TrainState (`magic train`'s init), with the AdamW
    moments filled with noise. At init they are zeros, which orbax's zstd squeezes to nothing, so
    a saved step would carry a third of a trained run's bytes; after the first steps they are
    values as incompressible as the params."""
    import jax
    import jax.numpy as jnp

    from matrixmagic.train.run import resolve_config, train_run

    config = resolve_config(preset, [])
    _, run = train_run(config)
    state = run.init_state(jax.random.PRNGKey(0))
    leaves, treedef = jax.tree.flatten(state.opt_state)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [jax.device_put(jax.random.normal(k, x.shape, x.dtype) * 1e-3, x.sharding)
              if x.ndim and jnp.issubdtype(x.dtype, jnp.floating) else x for k, x in zip(keys, leaves)]
    state = state.replace(opt_state=jax.tree.unflatten(treedef, leaves))
    return config, run, jax.block_until_ready(state)


def measure_storage(preset: str, repeats: int, local_dir: str, emulator_dir: str | None) -> dict:
    srv = start_emulator(emulator_dir)
    try:
        os.environ.update(srv.env)  # before matrixmagic.train.storage (and so tensorstore, gcsfs) is imported
        import jax

        from matrixmagic.sharding.memory import tree_bytes
        from matrixmagic.train import storage
        from matrixmagic.train.checkpoint import Checkpointer

        storage.use_emulator()
        config, run, state = build_state(preset)
        targets = {"local": local_dir, "gs://": f"gs://{srv.bucket}/bench-checkpoint"}
        ckpts = {name: Checkpointer(path, keep=2) for name, path in targets.items()}
        rows = {name: {"blocking": [], "save": [], "restore": [], "delete": [], "save_rss": [],
                       "restore_rss": []} for name in targets}
        order, first, step = [], {}, 0

        def one(name: str, timed: bool) -> None:
            nonlocal step
            step += 1
            ckpt, row = ckpts[name], rows[name]
            reset_peak()
            save_before = peak_mib()  # just after the reset: the RSS now
            start = time.perf_counter()
            ckpt.save(step, state, {"iterator": {"step": step}}, config)
            blocking = time.perf_counter() - start
            ckpt.wait()
            save = time.perf_counter() - start
            save_rss = peak_mib()
            if not timed:
                row["stored"] = stored_bytes(targets[name], srv, step)
            reset_peak()
            restore_before = peak_mib()
            start = time.perf_counter()
            restored, _, _ = ckpt.restore(run.abstract_state, step)
            jax.block_until_ready(restored)
            restore = time.perf_counter() - start
            restore_rss = peak_mib()
            del restored
            start = time.perf_counter()
            ckpt.manager.delete(step)  # what keep=N costs each save; and the bucket holds one step at a time
            delete = time.perf_counter() - start
            if not timed:  # the first of each: directories, handlers, tensorstore contexts, jit of the fingerprint
                first[name] = (save, restore)
                return
            order.append(name)
            row["blocking"].append(blocking)
            row["save"].append(save)
            row["restore"].append(restore)
            row["delete"].append(delete)
            row["save_rss"].append((save_before, save_rss))
            row["restore_rss"].append((restore_before, restore_rss))

        for name in targets:
            one(name, timed=False)
        reset_peak(srv.proc.pid)
        for i in range(repeats):  # interleaved, the order flipped each round: local gs gs local local gs ...
            for name in (list(targets) if i % 2 == 0 else list(reversed(targets))):
                one(name, timed=True)
        for ckpt in ckpts.values():
            ckpt.close()
        emulator_rss = peak_mib(srv.proc.pid)
        return {"params": sum(x.size for x in jax.tree.leaves(state.params)),
                "state_bytes": tree_bytes(run.abstract_state, per_device=False), "rows": rows, "first": first,
                "order": order, "emulator_rss": emulator_rss, "targets": targets,
                "device": f"{jax.devices()[0].platform} x{jax.device_count()}"}
    finally:
        srv.stop()


def print_storage(r: dict, preset: str, repeats: int, emulator_dir: str | None) -> None:
    mib = r["state_bytes"] / 2**20
    med = statistics.median
    print(f"{preset}: {r['params'] / 1e6:.1f}M params, state {mib:.1f} MiB (params + AdamW moments, fp32), "
          f"{r['device']}; {repeats} rounds, interleaved ({' '.join(n.rstrip(':/') for n in r['order'][:4])} ...), "
          f"same process")
    print("  " + EMULATOR_NOTE.format(where=f"files under {emulator_dir}" if emulator_dir else "memory"))
    print(f"  {'':8} {'stored':>7} {'save':>7} {'(blocking)':>10} {'restore':>8} {'delete':>7} "
          f"{'save':>7} {'restore':>8} {'RSS -> peak, MiB':>17} {'RSS -> peak, MiB':>17}")
    print(f"  {'':8} {'MiB':>7} {'s':>7} {'s':>10} {'s':>8} {'s':>7} {'MiB/s':>7} {'MiB/s':>8} "
          f"{'in save':>17} {'in restore':>17}")
    for name, row in r["rows"].items():
        save, restore = med(row["save"]), med(row["restore"])
        rss = {op: f"{med(b for b, _ in row[op]):.0f} -> {max(p for _, p in row[op]):.0f}"
               for op in ("save_rss", "restore_rss")}
        print(f"  {name:8} {row['stored'] / 2**20:7.0f} {save:7.2f} {med(row['blocking']):10.2f} {restore:8.2f} "
              f"{med(row['delete']):7.2f} {mib / save:7.0f} {mib / restore:8.0f} {rss['save_rss']:>17} "
              f"{rss['restore_rss']:>17}")
    local, gs = r["rows"]["local"], r["rows"]["gs://"]
    print(f"  gs:// / local: save {med(gs['save']) / med(local['save']):.2f}x, "
          f"restore {med(gs['restore']) / med(local['restore']):.2f}x (medians of {repeats}; MiB/s of the "
          f"{mib:.0f} MiB state; RSS of this process: median before the operation -> max peak during it)")
    for name, row in r["rows"].items():
        print(f"  {name:8} save s  {' '.join(f'{t:.2f}' for t in row['save'])}   restore s  "
              f"{' '.join(f'{t:.2f}' for t in row['restore'])}   first (not in medians) "
              f"{r['first'][name][0]:.2f} / {r['first'][name][1]:.2f}")
    print(f"  emulator process peak RSS over the timed rounds: {r['emulator_rss']:.0f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="default: gpt-tiny (gpt2 with --storage)")
    from matrixmagic.configs.train_config import TrainConfig

    default = TrainConfig()
    parser.add_argument("--batch-size", type=int, default=default.batch_size)
    parser.add_argument("--seq-len", type=int, default=default.data.seq_len)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="normal steps timed for the baseline")
    parser.add_argument("--limit", type=float, default=1.5, help="allowed step-time ratio during a save")
    parser.add_argument("--workdir", help="where to write (default: a temp dir); with --storage the local target")
    parser.add_argument("--storage", action="store_true",
                        help="save and restore time to a local directory vs gs:// on the test GCS server")
    parser.add_argument("--repeats", type=int, default=5, help="--storage: timed rounds (each: local and gs://)")
    parser.add_argument("--emulator-dir", help="--storage: the test GCS server keeps its objects here, not in memory")
    args = parser.parse_args()
    if args.storage:
        preset = args.preset or "gpt2"
        with tempfile.TemporaryDirectory() as tmp:
            r = measure_storage(preset, args.repeats, args.workdir or tmp, args.emulator_dir)
        print_storage(r, preset, args.repeats, args.emulator_dir)
        return 0
    args.preset = args.preset or "gpt-tiny"
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
