"""Planning a run: analytic estimates, and the printed report of `magic compile`.

`magic compile` answers "will this fit, and how fast would it go?" for a preset
on a slice it does not have. The compiler's word (train/planning/compiled.py) comes first;
the closed forms here are the cross-check, and the only answer for GPU clusters.

Analytic memory per device (bytes; N parameters, p = bytes per parameter dtype,
c = bytes per compute dtype, s = ways the state is sharded, t = mesh.tensor,
h = d_model, a = heads, S = sequence length, L = layers, V = vocab,
C = mesh.context, x = tokens per device per microbatch = batch / (data * fsdp) / microbatches * S / C):
  state        4 p N / s              params + grads + Adam's two moments
  activations  x (L A + 8 V / t)      8 V / t: the fp32 logits and their gradient
    A (per token per layer), adapted from Korthikanti et al. 2022 ("Reducing
    Activation Recomputation in Large Transformer Models", sbh(34 + 5as/h) for
    16-bit activations) to this code's float32 scores and softmax:
      none       (c/2) h (10 + 24/t) + 11 a S / t
      save_dots  c (2h + 4h/t + d_ff/t) + 4 a S / t   (matmul outputs + layer input)
      full       c h, + one layer's `none` working set while it is recomputed
    (the paper's h-terms count 2-byte activations, hence c/2: float32 compute doubles them)
  sequence parallelism (mesh.sequence_parallel under tp, sharding/rules.py): the terms above
    that tensor does not split (10 h of `none`, 2 h of save_dots, the h of full) are the
    residual stream's, now split over t too (the paper's Table 2: sbh (34/t + 5as/(ht)))
    With splash attention no [S, S] matrix exists: each head keeps one float32
    logsumexp per token instead of S scores, so S becomes 1 in the a S terms.
  context parallelism (C > 1, model/context.py): each device keeps its S / C tokens, each
    query still a row of S scores; plus, per layer, the K/V of all S tokens that reached it
    (all-gathered, or the ring's blocks kept for the backward pass): L rows S 2 g d_k c
    (g = K/V heads; remat none and save_dots; none under full remat).
FLOPs: 6N + 12 L S h per token (PaLM, model/accounting.py); full remat adds the
forward matmuls whose outputs the backward pass reads: + L (6h^2 + 2 h d_ff + 4 S h)
per token (see `recompute_flops_per_token`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from matrixmagic.configs import get_preset
from matrixmagic.configs.model_config import side_lengths
from matrixmagic.configs.pipeline import schedule_of
from matrixmagic.configs.train_config import TrainConfig
from matrixmagic.model.accounting import attention_layers, closed_form_params, human, training_flops_per_token
from matrixmagic.model.attention import kv_cache_width, qkv_width
from matrixmagic.model.families import family_of
from matrixmagic.model.feed_forward import up_width
from matrixmagic.sharding.mesh import AXES, axis_sizes
from matrixmagic.sharding.rules import sequence_parallel

from .chips import GiB, Target
from .compiled import MemoryBreakdown

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ----------------------------------------------------------------------------- analytic


@dataclasses.dataclass(frozen=True)
class Estimate:
    params: int
    state_bytes: float  # per device
    activation_bytes: float  # per device
    model_flops: float  # global per step, 6N + 12LSh
    executed_flops: float  # global per step, with remat recompute
    tokens_per_step: int

    @property
    def total_bytes(self) -> float:
        return self.state_bytes + self.activation_bytes


def _state_shards(layout: str, sizes: dict[str, int]) -> int:
    return (sizes["fsdp"] if "fsdp" in layout else 1) * (sizes["tensor"] if "tp" in layout else 1)


def activation_bytes_per_token_layer(cfg, tensor: int, seq_len: int, sequence_parallel: bool = False) -> float:
    """A in the module doc: bytes one token keeps per layer for the backward pass."""
    h, a, c = cfg.d_model, cfg.num_heads, DTYPE_BYTES[cfg.dtype]
    row = 1 if cfg.attention_impl == "splash" else seq_len  # per token and head: a score row, or a logsumexp
    residual = tensor if sequence_parallel else 1  # how many ways the residual stream's terms are split
    # Korthikanti's h-terms count 16-bit activations: they scale with the compute dtype (float32
    # on CPU keeps twice the bytes). The score terms are already float32 in this code.
    working = c / 2 * h * (10 / residual + 24 / tensor) + 11 * a * row / tensor
    if cfg.remat_policy == "save_dots":
        return c * (2 * h / residual + 4 * h / tensor + up_width(cfg) / tensor) + 4 * a * row / tensor
    if cfg.remat_policy in ("full", "save_dots_no_batch"):
        return c * h / residual + working / cfg.num_layers  # inputs kept; one layer's set live at a time
    return working


def cross_attention_bytes_per_token(cfg, tensor: int, encoder_len: int, sequence_parallel: bool = False) -> float:
    """What a decoder token keeps for one cross-attention sublayer: Korthikanti's attention-block
    h-terms (11 h, of which 2 h of input are split by tensor parallelism only under sequence
    parallelism) and its scores over the encoder's keys (remat none; full remat keeps none of it)."""
    if cfg.remat_policy in ("full", "save_dots_no_batch"):
        return 0.0
    row = 1 if cfg.attention_impl == "splash" else encoder_len
    residual = tensor if sequence_parallel else 1
    return DTYPE_BYTES[cfg.dtype] / 2 * cfg.d_model * (2 / residual + 9 / tensor) + 11 * cfg.num_heads * row / tensor


def logit_bytes(config: TrainConfig, devices: int) -> float:
    """The float32 logits and their gradient, per device: 8 bytes per output token per vocab row / t
    (the output side only: an encoder-decoder's decoder half)."""
    sizes = axis_sizes(config.mesh, devices)
    rows = config.batch_size // (sizes["data"] * sizes["fsdp"]) // config.microbatches
    out_len = list(side_lengths(config.model.family, config.data.seq_len).values())[-1]
    return 8 * rows * out_len / sizes.get("context", 1) * config.model.vocab_size / sizes["tensor"]


def context_kv_bytes(config: TrainConfig, devices: int) -> float:
    """Under a context split (C > 1): the K/V of the whole sequence each device keeps per layer
    for the backward pass (gathered, or received round the ring); 0 without a split or under
    full remat (one layer's at a time)."""
    cfg, sizes = config.model, axis_sizes(config.mesh, devices)
    if sizes.get("context", 1) == 1 or cfg.remat_policy in ("full", "save_dots_no_batch"):
        return 0.0
    rows = config.batch_size // (sizes["data"] * sizes["fsdp"]) // config.microbatches
    heads_split = sizes["tensor"] if cfg.kv_heads % sizes["tensor"] == 0 else 1
    return cfg.num_layers * rows * config.data.seq_len * kv_cache_width(cfg) / heads_split * DTYPE_BYTES[cfg.dtype]


def estimate(config: TrainConfig, devices: int) -> Estimate:
    """Closed-form memory per device and FLOPs per step (see the module doc)."""
    cfg = config.model
    sizes = axis_sizes(config.mesh, devices)
    counts = closed_form_params(cfg)
    n = counts["model"] + counts["mlm_head"]
    seq = config.data.seq_len
    stage = sizes["stage"]  # pipeline stages each hold L / stage layers (the embeddings, small at scale, too)
    state = 4 * DTYPE_BYTES[cfg.param_dtype] * n / _state_shards(config.mesh.layout, sizes) / stage
    rows = config.batch_size // (sizes["data"] * sizes["fsdp"]) // config.microbatches
    lengths = side_lengths(cfg.family, seq)  # an encoder-decoder's stacks each see half the window
    t = sizes["tensor"]
    sp = sequence_parallel(config.mesh, t)
    context = sizes.get("context", 1)  # the sequence split: S / C tokens per device, each a row of S scores
    acts = sum(cfg.num_layers / stage * rows * n / context * activation_bytes_per_token_layer(cfg, t, n, sp)
               for n in lengths.values()) + context_kv_bytes(config, devices)
    if family_of(cfg).cross_attention:  # each decoder layer's cross attention, over the encoder's keys
        acts += cfg.num_layers * rows * lengths["decoder"] * cross_attention_bytes_per_token(
            cfg, t, lengths["encoder"], sp)
    acts += logit_bytes(config, devices)
    tokens_step = config.tokens_per_step
    model_flops = training_flops_per_token(cfg, n, seq) * tokens_step
    recompute = recompute_flops_per_token(cfg, seq) * tokens_step
    return Estimate(n, state, acts, model_flops, model_flops + recompute, tokens_step)


def bubble(config: TrainConfig, devices: int) -> float:
    """The pipeline's idle share of the step, (S - 1) / (R M + S - 1) (configs/pipeline.py); 0 unpipelined."""
    stages = axis_sizes(config.mesh, devices)["stage"]
    return schedule_of(config.mesh, stages).bubble if stages > 1 else 0.0


def recompute_flops_per_token(cfg, seq_len: int) -> float:
    """Forward FLOPs that full remat runs again in the backward pass.

    Only matmuls whose OUTPUTS the backward pass reads are recomputed: Q/K/V, the
    scores and A.V (read by the softmax and output-projection gradients) and the
    FFN up-projection (read by the activation's gradient). The attention output
    projection and the FFN down-projection only need their inputs, so XLA drops
    their recomputation as dead code: 6h^2 + 2 h d_ff + 4 S h, not the whole
    forward (for GPT-3 shapes 14h^2 of 24h^2 per layer). Grouped-query K/V and a gated
    FFN change the first two terms: 2 h (Q + K + V columns) and 2 h (W_gate + W_up columns)."""
    if cfg.remat_policy not in ("full", "save_dots_no_batch"):
        return 0.0
    h = cfg.d_model
    ffns = family_of(cfg).ffn_sublayers * cfg.num_layers
    return attention_layers(cfg) * (2 * h * qkv_width(cfg) + 4 * seq_len * h) + ffns * 2 * h * up_width(cfg)


def dcn_seconds(config: TrainConfig, target: Target, dcn_bytes: Optional[float] = None) -> Optional[float]:
    """Seconds per step the slices spend all-reducing gradients over the data-centre network.

    Only the data axis crosses slices (sharding/mesh.py), so the one cross-slice collective is
    the data-parallel gradient reduction. `dcn_bytes`: what each device sends across slices per
    step, read from the compiled HLO (train/planning/loops.py `dcn_send_bytes`); without it the
    closed form: reduced hierarchically (inside each slice over ICI first), every chip carries
    its 1/(chips per slice) share of the N p gradient bytes. A ring over S slices moves
    2 (S - 1) / S times that per chip, at the chip's DCN bandwidth, not overlapped with
    compute: an upper bound on what DCN adds."""
    if target.slices <= 1 or not target.dcn_bits_per_s:
        return None
    if dcn_bytes is None:
        counts = closed_form_params(config.model)
        grad_bytes = (counts["model"] + counts["mlm_head"]) * DTYPE_BYTES[config.model.param_dtype]
        dcn_bytes = grad_bytes / (target.chips // target.slices)
    return 2 * (target.slices - 1) / target.slices * dcn_bytes * 8 / target.dcn_bits_per_s


def step_time(model_flops: float, devices: int, peak: float, mfu: float) -> float:
    """Seconds per step at `mfu` of peak: MFU counts model FLOPs (6N + 12LSh), not recompute."""
    return model_flops / (devices * peak * mfu)


# ----------------------------------------------------------------------------- report


def gib(n: float) -> str:
    return f"{n / GiB:9.2f} GiB"


def seconds_text(s: float) -> str:
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def count(n: float) -> str:
    return human(n).replace(" G", " B").strip()


def mesh_text(config: TrainConfig, devices: int) -> str:
    """'fsdp=64,tensor=8' (data, stage, context named when above 1): a row label and a --mesh value."""
    sizes = axis_sizes(config.mesh, devices)
    return ",".join(f"{a}={sizes[a]}" for a in AXES if sizes[a] > 1 or a in ("fsdp", "tensor"))


def header(config: TrainConfig, target: Target, devices: int) -> list[str]:
    cfg = config.model
    sizes = axis_sizes(config.mesh, devices)
    n = closed_form_params(cfg)["model"]
    paper = get_preset(config.preset).recipe.batch_tokens
    return [
        f"{config.preset} on {target.spec}: {target.description}",
        f"  model    {count(n)} params, {cfg.num_layers} layers{' (scanned)' if cfg.scan_layers else ' (unrolled)'}"
        f", d_model {cfg.d_model}; compute {cfg.dtype}, params {cfg.param_dtype}"
        + (" (the TPU/GPU default, as magic train runs there)" if cfg.dtype == "bfloat16" else "")
        + f"; attention {cfg.attention_impl}",
        "  mesh     " + " ".join(f"{a}={sizes[a]}" for a in AXES)
        + (f" (dcn_data={config.mesh.dcn_data}: the data axis spans the slices)" if config.mesh.dcn_data > 1 else "")
        + (f" over {devices} device(s), "
        f"layout {config.mesh.layout}; remat {cfg.remat_policy}; {config.microbatches} microbatch(es)"),
        (f"  batch    {config.batch_size} x {config.data.seq_len} = {config.tokens_per_step:,} tokens/step (paper "
         f"{paper:,}, {config.tokens_per_step / paper - 1:+.0%}: by default rounded down to a multiple of data x "
         f"fsdp x microbatches; --batch sets it)"),
    ]


def memory_lines(outcome, hbm: Optional[int]) -> list[str]:
    m: MemoryBreakdown = outcome.memory
    lines = ["memory per device (compiled.memory_analysis())",
             f"  arguments    {gib(m.arguments)}  params, Adam moments, step, rng, batch shard",
             f"  outputs      {gib(m.outputs)}  the new state and the metrics",
             f"  - aliased    {gib(-m.alias)}  donated state buffers the new state is written into",
             f"  temporaries  {gib(m.temporaries)}  activations, gradients, gathered weights, scratch",
             f"  code         {gib(m.code)}",
             f"  = total      {gib(m.total)}  arguments + outputs - aliased + temporaries + code"]
    if m.peak and outcome.devices[0].platform != "cpu":
        lines.append(f"  XLA peak     {gib(m.peak)}  the compiler's peak of simultaneously live buffers (the "
                     f"total above is what is allocated: the temp slab whole)")
    if hbm:
        room = hbm - m.total
        verdict = f"fits, {room / GiB:.2f} GiB headroom" if room >= 0 else \
            f"the sum exceeds HBM by {-room / GiB:.2f} GiB (the compiler accepted it: see XLA peak)"
        lines.append(f"  HBM          {gib(hbm)}  {verdict}")
    return lines


def oom_lines(oom, config: TrainConfig, est: "Estimate", hbm: Optional[float], chips: int) -> list[str]:
    lines = ["memory per device: DOES NOT FIT", f"  the compiler refused: {oom.message[:300]}"]
    if oom.shortfall is not None:
        short = oom.shortfall
        need = f"needs {oom.required / GiB:.2f} GiB, {oom.available / GiB:.2f} GiB available: " if oom.available else ""
        lines.append(f"  {need}short by {short / GiB:.2f} GiB ({short / 1e9:.2f} GB) per device"
                     + (" (at least: the compiler's figure counts temporaries only)" if "temporaries" in oom.message
                        else ""))
    lines.append("  fix: " + ", ".join(oom_fixes(config, est, hbm, chips)))
    return lines


def oom_fixes(config: TrainConfig, est: "Estimate", hbm: Optional[float], chips: int) -> list[str]:
    """What could make it fit, leaving out what is already in use."""
    if hbm and est.state_bytes * chips / hbm > chips:  # even the fully sharded state is too big
        need = math.ceil(est.state_bytes * chips / hbm)
        return [(f"more chips: the state alone (params, grads, Adam) needs {est.state_bytes * chips / GiB:,.0f} GiB, "
                 f"i.e. at least {need} chips of {hbm / GiB:.0f} GiB before any activation")]
    fixes = []
    if config.model.remat_policy != "full":
        fixes.append("--remat full (or save_dots)")
    fixes += [f"more --microbatches (now {config.microbatches})", "a smaller --batch", "a larger --topology",
              "or --sweep to search"]
    return fixes


def estimate_lines(est: Estimate, hbm: Optional[int], title: str) -> list[str]:
    lines = [title,
             f"  state        {gib(est.state_bytes)}  params + grads + Adam (4 x param bytes x N / shards)",
             f"  activations  {gib(est.activation_bytes)}  per remat policy, formula in train/planning/plan.py",
             f"  = total      {gib(est.total_bytes)}"]
    if hbm:
        room = hbm - est.total_bytes
        lines.append(f"  HBM          {gib(hbm)}  " + (f"fits, {room / GiB:.2f} GiB headroom" if room >= 0
                                                      else f"does NOT fit: short by {-room / GiB:.2f} GiB "
                                                           f"({-room / 1e9:.2f} GB)"))
    return lines


def flops_lines(est: Estimate, devices: int, raw: Optional[float], corrected: Optional[float],
                remat: str) -> list[str]:
    def row(label: str, value: float, note: str) -> str:
        return f"  {label:36s} {value:11.4g}   {note}"

    lines = ["FLOPs per step (per device; global = x devices)"]
    if raw is not None:
        lines.append(row("compiler, cost_analysis() raw", raw, "counts each while-loop body once"))
    if corrected is not None:
        lines.append(row("compiler, loop-corrected", corrected, f"= {corrected * devices:.4g} global (each loop body "
                                                                 f"x its trip count: layers, microbatches)"))
    elif raw is not None:
        lines.append("  (no loop-corrected count: a loop has no static trip count; drop --no-calibrate to compile "
                     "the 1- and 2-layer calibrations)")
    lines.append(row("analytic 6N + 12LSh", est.model_flops / devices, f"= {est.model_flops:.4g} global"))
    if est.executed_flops != est.model_flops:
        lines.append(row(f"analytic + {remat} remat recompute", est.executed_flops / devices,
                         "(Q/K/V, scores, A.V, FFN-up forward again)"))
    if corrected is not None:
        gap = corrected / (est.executed_flops / devices) - 1
        lines.append(f"  compiler vs analytic: {gap:+.1%}  (analytic counts matmuls only; the compiler also counts "
                     f"softmax, GELU, norms, the loss, the optimizer and work replicated across the tensor axis)")
    return lines


def throughput_lines(est: Estimate, devices: int, peak: float, mfu: float, chip_name: str,
                     compiler_seconds: Optional[float], dcn: Optional[float] = None,
                     seconds_from: str = "loop-corrected") -> list[str]:
    """Step time at the stated MFU and by the compiler (`seconds_from` says how its figure was
    made whole); with several slices each plus the cross-slice gradient all-reduce (`dcn_seconds`)."""
    extra = dcn or 0.0
    plus = " + DCN" if dcn else ""
    step = step_time(est.model_flops, devices, peak, mfu) + extra
    lines = [f"throughput at {mfu:.0%} MFU ({chip_name}: {human(peak, 'FLOP/s')} peak per device)",
             (f"  step time    {seconds_text(step)}{plus}   tokens/s {est.tokens_per_step / step:,.0f}   "
              f"(MFU counts 6N + 12LSh; remat recompute is extra work inside that time)")]
    if dcn:
        lines.append(f"  DCN          {seconds_text(dcn)}/step: the gradient all-reduce between slices over the "
                     f"data-centre network, not overlapped (train/planning/plan.py dcn_seconds)")
    if compiler_seconds:
        lines.append(f"  compiler's own estimate (optimal_seconds, {seconds_from}){plus}: "
                     f"{seconds_text(compiler_seconds + extra)}/step "
                     f"= {est.tokens_per_step / (compiler_seconds + extra):,.0f} tokens/s")
    return lines
