"""Requests/s of an lm-eval `loglikelihood` workload: our harness backend beside lm-eval's own `hf`.

Both backends score the same model, a random GPT-2 small (transformers' GPT2Config defaults:
12 layers, d_model 768, 12 heads, 1024 positions, 50,257 ids, 124M parameters), on the same
pre-tokenized requests, on the same CPU, in one run:

* theirs: lm_eval.models.huggingface.HFLM (float32, device cpu) on the directory that
  GPT2LMHeadModel.save_pretrained wrote (seeded torch init);
* ours: MatrixMagicLM (the `matrixmagic` backend) on that directory imported with
  `matrixmagic.train.hf.api.import_hf`: the same weights, read by our Flax model.

The workload is multiple choice, hellaswag-like: --requests // 4 contexts of 100-400
random token ids, each followed by 4 continuations of 1-10 ids (numpy seed 0), 500
requests by default. No text is involved: each backend's `_loglikelihood_tokens` gets the
same [((context_key, continuation_key), context_ids, continuation_ids), ...] list, the form
lm-eval's TemplateLM hands it after tokenizing, so tokenizers cannot make the work differ.

Why a tiny tokenizer: there is no network here to download GPT-2's, and `import_hf` needs a
tokenizer.json beside the weights. A 320-id byte-level BPE trained with `tokenizers` (as
tests/fixtures/make_hf_fixtures.py does) goes with the 50,257-row model: import_hf accepts a
tokenizer with fewer ids than the embedding table (it notes it and keeps every row), and
HFLM never reads the tokenizer on this path. Request ids are drawn from all 50,257 rows.

Each backend runs the whole workload once (the first pass: ours compiles one XLA program
per length bucket in it; theirs warms up torch), then --steady-passes more times; the
passes alternate between the backends so a neighbour's load falls on both. requests/s =
requests / wall seconds of a pass; "steady" is the best steady pass. The 1-minute load
average is printed before the run and after each pass: on a small shared CPU a neighbour's
job slows whichever pass it overlaps, so compare only runs whose passes saw no other load. Same --batch-size for
both (16). Threads: left at each library's default unless --threads N (then
torch.set_num_threads(N) and XLA's CPU client limited to N threads). Also printed: the max
|difference| of the two backends' log-likelihoods (the correctness check), how many
continuations' greedy flags agree, and where the work goes: our length buckets and
HF's per-batch lengths (padded token positions per real one), HF's forward rows after
lm-eval's one-token-continuation cache (requests sharing context + continuation[:-1] are
scored by one row).

    pip install -e '.[bench,eval]'      # torch, transformers and lm-eval[hf] beside matrixmagic
    python benchmarks/bench_eval.py [--requests 500] [--batch-size 16] [--threads N] [--steady-passes 1]

Timings only: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="loglikelihood requests (4 per context)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass, both backends")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads and XLA CPU threads (0: each library's default)")
    parser.add_argument("--steady-passes", type=int, default=1, help="timed passes after the first (best is shown); "
                                                                       "0: the first pass less our compile")
    parser.add_argument("--seed", type=int, default=0, help="numpy seed of the requests, torch seed of the weights")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.batch_size < 1 or args.steady_passes < 0 or args.threads < 0:
        parser.error("--requests and --batch-size must be positive; --steady-passes and --threads 0 or more")
    return args


def make_requests(n: int, vocab: int, seed: int):
    """n requests [((ctx key, cont key), ctx ids, cont ids)], 4 continuations per context."""
    import numpy as np

    rng = np.random.default_rng(seed)
    requests = []
    for c in range(math.ceil(n / 4)):
        context = rng.integers(0, vocab, int(rng.integers(100, 401))).tolist()
        for j in range(4):
            continuation = rng.integers(0, vocab, int(rng.integers(1, 11))).tolist()
            requests.append(((f"context {c}", f"choice {j}"), context, continuation))
    return requests[:n]


def zen() -> list[str]:
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this  # a corpus every Python has
    return codecs.decode(this.s, "rot13").splitlines()


def write_hf_model(directory: str, seed: int):
    """A random GPT-2 small + a tiny byte-level BPE tokenizer, as save_pretrained writes them."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    model.save_pretrained(directory)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(zen() * 4, vocab_size=319, min_frequency=2, show_progress=False)
    bpe.add_special_tokens(["<|endoftext|>"])
    GPT2Tokenizer(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                  unk_token="<|endoftext|>").save_pretrained(directory)
    return model.config


def hf_chunks(requests, batch_size: int):
    """HFLM's batches, as its _loglikelihood_tokens forms them (sort, one-token cache grouping)."""
    from lm_eval.models.utils import Collator

    collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                        group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
    return list(collator.get_batched(n=batch_size))


def padding_report(requests, batch_size: int, max_len: int):
    """(our {bucket: batches}, our padded/real positions, HF forward rows, HF padded/real positions)."""
    from matrixmagic.train.evals.scoring import bucket_length, window

    lengths = sorted((len(window(c, x, max_len)[0]) for _, c, x in requests), reverse=True)
    real = sum(lengths)
    buckets, ours = {}, 0
    for start in range(0, len(lengths), batch_size):
        length = bucket_length(lengths[start], max_len)
        buckets[length] = buckets.get(length, 0) + 1
        ours += batch_size * length  # rows padded to batch_size too
    rows, theirs, hf_real = 0, 0, 0
    for chunk in hf_chunks(requests, batch_size):
        widths = [min(len(c) + len(x), max_len + 1) - 1 for _, c, x in chunk]
        rows += len(chunk)
        theirs += len(chunk) * max(widths)
        hf_real += sum(widths)
    return buckets, ours / real, rows, theirs / hf_real


def compile_seconds(lm, buckets) -> dict:
    """Seconds to compile our scoring program for each bucket, from a fresh jit (nothing cached)."""
    import functools

    import jax
    import numpy as np

    from matrixmagic.train.evals.scoring import _token_logprobs

    fn = jax.jit(functools.partial(_token_logprobs, lm.scorer.model))
    out = {}
    for length in sorted(buckets):
        ids = np.zeros((lm.batch_size, length), np.int32)
        at = np.zeros((lm.batch_size, 16), np.int32)  # continuations of up to 16 ids: one scored bucket
        _, out[length] = timed(lambda ids=ids, at=at: fn.lower(lm.params, ids, at, at).compile())
    return out


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def cpu_name() -> str:
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return name or platform.machine()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:  # before jax starts its CPU client
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={args.threads}").strip()
    import jax
    import lm_eval
    import numpy as np
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    from matrixmagic.train.evals.harness import MatrixMagicLM
    from matrixmagic.train.hf.api import import_hf

    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {os.cpu_count()} CPUs ({cpu_name()}), {platform.platform()}, python {sys.version.split()[0]}; "
          f"load average {os.getloadavg()[0]:.2f} (1 min; above 0.5 before the run, another process shares the CPUs)")
    print(f"versions: jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, lm_eval "
          f"{getattr(lm_eval, '__version__', '?')}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, run_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "run")
        hf_config = write_hf_model(hf_dir, args.seed)
        _, seconds = timed(lambda: import_hf(hf_dir, run_dir))
        print(f"model: random GPT-2 ({hf_config.n_layer} layers, d {hf_config.n_embd}, {hf_config.n_head} heads, "
              f"{hf_config.n_positions} positions, vocab {hf_config.vocab_size}); import_hf took {seconds:.1f} s")

        ours, seconds_ours = timed(lambda: MatrixMagicLM(workdir=run_dir, batch_size=args.batch_size))
        theirs, seconds_theirs = timed(lambda: HFLM(pretrained=hf_dir, device="cpu", dtype="float32",
                                                    batch_size=args.batch_size))
        print(f"load: ours {seconds_ours:.1f} s, hf {seconds_theirs:.1f} s")

        requests = make_requests(args.requests, hf_config.vocab_size, args.seed)
        ctx = [len(c) for _, c, _ in requests]
        cont = [len(x) for _, _, x in requests]
        print(f"workload: {len(requests)} loglikelihood requests, {math.ceil(len(requests) / 4)} contexts of "
              f"{min(ctx)}-{max(ctx)} ids, continuations of {min(cont)}-{max(cont)} ids, batch size "
              f"{args.batch_size}")

        buckets, ours_pad, hf_rows, hf_pad = padding_report(requests, args.batch_size, ours.max_length)
        print(f"ours: length buckets {', '.join(f'{k}: {v} batches' for k, v in sorted(buckets.items()))}; "
              f"padded positions / real = {ours_pad:.2f}")
        print(f"hf:   {hf_rows} forward rows for {len(requests)} requests (one-token-continuation cache), "
              f"per-batch longest length; padded positions / real = {hf_pad:.2f}")

        backends = {"ours": ours, "hf": theirs}
        passes = {name: [] for name in backends}
        answers = {}
        for k in range(1 + args.steady_passes):
            for name, lm in backends.items():
                answers[name], seconds = timed(lambda lm=lm: lm._loglikelihood_tokens(requests, disable_tqdm=True))
                passes[name].append(seconds)
                what = "first pass (with compile)" if k == 0 and name == "ours" else (
                    "first pass" if k == 0 else f"pass {k + 1}")
                print(f"  {name:4s} {what:26s} {seconds:7.2f} s  {len(requests) / seconds:7.2f} requests/s  "
                      f"(load average after it {os.getloadavg()[0]:.2f})", flush=True)

        compiles = compile_seconds(ours, buckets)
        rate = {name: len(requests) / min(times[1:]) for name, times in passes.items()} if args.steady_passes else {}
        first = {name: len(requests) / times[0] for name, times in passes.items()}
        ll = {name: np.array([a[0] for a in out]) for name, out in answers.items()}
        diff = np.abs(ll["ours"] - ll["hf"])
        greedy = sum(a[1] == b[1] for a, b in zip(answers["ours"], answers["hf"]))
        print()
        print(f"first pass:  ours {first['ours']:7.2f} requests/s, hf {first['hf']:7.2f} requests/s, "
              f"ours/hf {first['ours'] / first['hf']:.2f}x; our compile {sum(compiles.values()):.1f} s "
              f"({', '.join(f'{k}: {v:.1f} s' for k, v in compiles.items())}, fresh jit after the passes)")
        if rate:
            print(f"steady:      ours {rate['ours']:7.2f} requests/s, hf {rate['hf']:7.2f} requests/s, "
                  f"ours/hf {rate['ours'] / rate['hf']:.2f}x")
        else:  # --steady-passes 0: our first pass less the compile measured after it
            warm = len(requests) / (passes["ours"][0] - sum(compiles.values()))
            print(f"first pass less our compile: ours {warm:7.2f} requests/s, hf {first['hf']:7.2f} requests/s, "
                  f"ours/hf {warm / first['hf']:.2f}x")
        print(f"correctness: max |ours - hf| log-likelihood {diff.max():.2e} (relative "
              f"{(diff / np.abs(ll['hf'])).max():.2e}, log-likelihoods {ll['hf'].min():.1f} .. {ll['hf'].max():.1f}); "
              f"greedy flags agree on {greedy}/{len(requests)}")


if __name__ == "__main__":
    main()
