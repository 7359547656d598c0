"""Where the train step's time goes on CPU: matmuls or the rest, by model part, forward or backward.

    python benchmarks/profile_step.py [--preset gpt-tiny] [--set field=value ...] [--steps 3]

It compiles the step `magic train` runs, traces a few steps with the jax profiler (a Perfetto
trace, so no profiler plugin is needed) with XLA:CPU's per-thunk trace events switched on, and
joins every thunk's time with its instruction in the optimized HLO: a thunk is a matmul when its
fusion holds a `dot`, its model part comes from the op_name metadata jax writes (the flax
module path), and it belongs to the backward pass when that name passes through `transpose(`.
Thunk times are summed over XLA's worker threads, so they add up to about cores x wall time;
the shares are what to read.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

PARTS = ("self_attention_norm", "feed_forward_norm", "cross_attention_norm", "final_norm",
         "self_attention/query", "self_attention/key", "self_attention/value", "self_attention/output",
         "self_attention", "cross_attention", "feed_forward/hidden", "feed_forward/output", "feed_forward",
         "token_embedding", "position", "output_head", "mlm_head")


def hlo_index(hlo_text: str) -> dict[str, tuple[bool, str]]:
    """instruction name -> (is a matmul, op_name metadata of what it computes)."""
    bodies = {m.group(1): m.group(2) for m in
              re.finditer(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.DOTALL | re.MULTILINE)}
    index = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w+)\(", line)
        if not m:
            continue
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = bodies.get(called.group(1), "") if called else line
        names = re.findall(r'op_name="([^"]+)"', body) or re.findall(r'op_name="([^"]+)"', line)
        index[m.group(1)] = (" dot(" in body or m.group(2) == "dot", " ".join(names))
    return index


def label(is_dot: bool, op_names: str) -> str:
    part = next((p for p in PARTS if p in op_names), "optimizer/loss/other")
    return f"{'matmul' if is_dot else 'other '}  {'bwd' if 'transpose(' in op_names else 'fwd'}  {part}"


def profile(step, state, batch, steps: int) -> tuple[collections.Counter, float]:
    """({label: thunk microseconds}, wall seconds per step) over `steps` traced steps."""
    compiled = step.lower(state, batch).compile(compiler_options={"xla_cpu_enable_xprof_traceme": True})
    index = hlo_index(compiled.as_text())
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
        wall = (time.perf_counter() - start) / steps
        (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path, "rt") as f:
            events, _ = json.JSONDecoder().raw_decode(f.read())
    totals = collections.Counter()
    for event in events["traceEvents"]:
        if event.get("ph") == "X" and event.get("name") in index:
            totals[label(*index[event["name"]])] += event["dur"]
    return totals, wall


def main() -> None:
    from bench_train_step import synthetic_batch

    from matrixmagic.train.data.tokenizers import ByteTokenizer
    from matrixmagic.train.run import resolve_config, train_run, with_tokenizer_vocab

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt-tiny")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=16, help="rows of the by-part table")
    args = parser.parse_args()
    config = with_tokenizer_vocab(resolve_config(args.preset, args.set, platform="cpu"), ByteTokenizer())
    _, run = train_run(config)
    state = run.init_state(jax.random.PRNGKey(0))
    totals, wall = profile(run.train_step, state, run.put_batch(synthetic_batch(config)), args.steps)
    all_time = sum(totals.values())
    by_kind = collections.Counter()
    for key, micros in totals.items():
        by_kind[key[:6].strip()] += micros
    print(f"{args.preset} batch {config.batch_size} x {config.data.seq_len}: {wall * 1e3:.0f} ms/step wall; "
          f"thunk time {all_time / args.steps / 1e3:.0f} ms/step summed over threads")
    print("  " + ", ".join(f"{kind} {micros / all_time:.0%}" for kind, micros in by_kind.most_common()))
    for key, micros in totals.most_common(args.top):
        print(f"  {micros / all_time:6.1%}  {key}")


if __name__ == "__main__":
    main()
