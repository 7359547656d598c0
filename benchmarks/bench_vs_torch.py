"""Our train step beside a PyTorch reference of the same GPT, in one run on one machine.

The reference is written here (not imported) so that both sides compute the same model:
learned token and position embeddings, pre-LayerNorm blocks (causal multi-head
attention with biases, a GELU-tanh MLP of d_ff), a final LayerNorm and an output
layer tied to the token embedding; no dropout; AdamW (0.9, 0.95, eps 1e-8, weight
decay 0.1) with global-norm clipping at 1.0; token-level cross entropy. Attention
uses torch's scaled_dot_product_attention with is_causal, as nanoGPT does. Both run
float32 on the same random byte batches. Ours is the step `magic train` runs
(train.run.train_run), with its packed-document segment mask.

    pip install -e '.[bench]'        # torch: a benchmark extra, never a test dependency
    python benchmarks/bench_vs_torch.py [--layers 4 --d-model 256 --heads 4 --seq-len 256 --batch 16]
                                        [--steps 20] [--no-compile]

It prints tokens/s of ours, of torch eager and of torch.compile, the ratios, and
our model FLOP/s against this CPU's f32 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def torch_gpt(vocab: int, layers: int, d_model: int, heads: int, d_ff: int, max_len: int):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
            self.fc, self.out = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d_model, dim=2)
            q, k, v = (z.view(b, t, heads, d_model // heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d_model)
            x = x + self.proj(y)
            return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(max_len, d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(d_model)
            for p in self.parameters():
                if p.dim() > 1:
                    nn.init.normal_(p, std=0.02)

        def forward(self, ids, targets):
            x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.tok.weight.T  # tied output layer
            return F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))

    return GPT()


def torch_tokens_per_second(model, ids, targets, steps: int, warmup: int) -> float:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(ids, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return ids.numel() * steps / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes on 2 cores)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        raise SystemExit("bench_vs_torch needs torch: pip install -e '.[bench]'") from None

    from bench_train_step import train_step_tokens_per_second

    from matrixmagic.train.loop import flops_per_step
    from matrixmagic.train.metrics import measure_cpu_matmul_peak
    from matrixmagic.train.run import resolve_config

    L, D, H, T, B = args.layers, args.d_model, args.heads, args.seq_len, args.batch
    config = resolve_config("gpt-tiny", [f"model.num_layers={L}", f"model.d_model={D}", f"model.num_heads={H}",
                                         f"model.d_ff={4 * D}", f"model.max_len={T}", f"model.scan_unroll={L}",
                                         f"data.seq_len={T}", f"batch_size={B}"], platform="cpu")
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    rows = np.random.default_rng(0).integers(0, 256, (B, T + 1))
    ids, targets = (torch.from_numpy(np.ascontiguousarray(r)).long() for r in (rows[:, :-1], rows[:, 1:]))
    vocab = config.model.vocab_size

    print(f"GPT L{L} D{D} H{H} T{T} B{B}, float32, {os.cpu_count()} CPU threads, torch {torch.__version__}")
    peak = measure_cpu_matmul_peak()
    ours, per_step = train_step_tokens_per_second(config, args.steps)
    eager = torch_tokens_per_second(torch_gpt(vocab, L, D, H, 4 * D, T), ids, targets, args.steps, 3)
    flops = flops_per_step(config)
    print(f"matmul peak (f32, measured now): {peak / 1e9:.0f} GFLOP/s")
    print(f"ours (jax, the magic train step): {ours:,.0f} tokens/s, {flops / per_step / 1e9:.1f} GFLOP/s "
          f"= {flops / per_step / peak:.2f} of the peak")
    print(f"torch eager:                      {eager:,.0f} tokens/s   ours / eager = {ours / eager:.2f}x")
    if not args.no_compile:
        compiled = torch.compile(torch_gpt(vocab, L, D, H, 4 * D, T))
        rate = torch_tokens_per_second(compiled, ids, targets, args.steps, 3)
        print(f"torch.compile:                    {rate:,.0f} tokens/s   ours / compiled = {ours / rate:.2f}x")


if __name__ == "__main__":
    main()
