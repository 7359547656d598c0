"""What a run will do, worked out without running it: `magic train --print-config` and
`magic schedule`.

Everything here reads the functions the run itself uses (TrainConfig's resolved warmup and
decay, the BatchRamp table, `step.make_learning_rate`), so the printout and the plot show
the run's schedule, not a second implementation of it.
"""

from __future__ import annotations

import math
from typing import BinaryIO

import jax
import numpy as np

from matrixmagic.configs.ramp import ramp_description
from matrixmagic.configs.train_config import TrainConfig, config_to_json
from matrixmagic.sharding.mesh import axis_sizes

from .run import run_tokenizer, sized_for_data
from .step import make_learning_rate

DECAYING = ("cosine", "linear")


def schedule_facts(config: TrainConfig) -> dict:
    """The schedule as resolved: lengths in steps, where each came from, in tokens, and the
    step at which each ends (later than its length during a batch ramp: small steps first)."""
    opt, ramp, per_step = config.optimizer, config.batch_ramp, config.tokens_per_step
    facts = {"kind": opt.schedule, "peak_learning_rate": opt.learning_rate,
             "clock": "tokens seen, in full-batch steps (the batch ramps)" if ramp.on else "steps",
             "warmup_steps": config.warmup_steps, "warmup_from": config.schedule_source("warmup"),
             "warmup_tokens": config.warmup_steps * per_step,
             "warmup_ends_at_step": ramp.first_step_with(config.warmup_steps * per_step)}
    if opt.schedule in DECAYING:
        facts.update({"decay_steps": config.decay_steps, "decay_from": config.schedule_source("decay"),
                      "decay_tokens": config.decay_steps * per_step,
                      "decay_ends_at_step": ramp.first_step_with(config.decay_steps * per_step)})
        if opt.schedule == "cosine":
            facts["final_learning_rate"] = opt.final_ratio * opt.learning_rate
    return facts


def resolved(config: TrainConfig, devices: int) -> dict:
    """The config as JSON plus what it implies: mesh sizes, batch, schedule, ramp, run length."""
    ramp = config.batch_ramp
    return {
        "config": config_to_json(config),
        "resolved": {
            "devices": devices,
            "mesh": axis_sizes(config.mesh, devices),
            "layout": config.mesh.layout,
            "dtype": config.model.dtype,
            "param_dtype": config.model.param_dtype,
            "attention_impl": config.model.attention_impl,
            "batch": {"rows": config.batch_size, "seq_len": config.data.seq_len,
                      "tokens_per_step": config.tokens_per_step, "microbatches": config.microbatches,
                      "rows_per_microbatch": config.batch_size // config.microbatches},
            "schedule": schedule_facts(config),
            "ramp": ramp.summary(config.microbatches),
            "run": {"steps": config.steps, "tokens": ramp.tokens_before(config.steps)},
        },
    }


def print_config(config: TrainConfig) -> dict:
    """`magic train --print-config`: the run's config as `train` would use it, on this runtime's
    devices, without reading data or compiling. The embedding table is sized for the tokenizer
    when that needs no dataset (bytes, a .model file); a corpus-trained sentencepiece tokenizer
    lives beside its dataset, so then the preset's table is shown."""
    devices = jax.device_count()
    if config.data.tokenizer != "sentencepiece":
        config = sized_for_data(config, run_tokenizer(config), devices, jax.process_count())
    out = resolved(config, devices)
    if config.data.tokenizer == "sentencepiece":
        out["resolved"]["vocab_note"] = "model.vocab_size is the preset's; training sizes it for the tokenizer"
    return out


# ----------------------------------------------------------------------------- the schedule over a run


def horizon(config: TrainConfig) -> int:
    """Steps to draw: the run, and at least through the decay (and 10% past it, to show the floor)."""
    facts = schedule_facts(config)
    end = facts.get("decay_ends_at_step", 10 * facts["warmup_ends_at_step"])
    return max(config.steps, math.ceil(1.1 * max(end, config.batch_ramp.ramp_steps)), 2)


def schedule_curve(config: TrainConfig, steps: int) -> dict[str, np.ndarray]:
    """Per step: tokens seen before it, its batch in rows and tokens, and its learning rate,
    computed by the run's own schedule (`make_learning_rate`, jitted over every step)."""
    ramp = config.batch_ramp
    index = np.arange(steps)
    lr = np.asarray(jax.jit(jax.vmap(make_learning_rate(config)))(index.astype(np.int32)))
    rows = np.array([ramp.rows(int(s)) for s in index], np.int64)
    tokens_before = np.concatenate([[0], np.cumsum(rows)[:-1]]) * config.data.seq_len
    return {"step": index, "tokens_before": tokens_before, "batch_rows": rows,
            "batch_tokens": rows * config.data.seq_len, "learning_rate": lr}


def summary_lines(config: TrainConfig, devices: int) -> list[str]:
    """`magic schedule`'s text: the same facts as --print-config, in sentences."""
    facts, ramp = schedule_facts(config), config.batch_ramp
    sizes = ", ".join(f"{k} {v}" for k, v in axis_sizes(config.mesh, devices).items() if v > 1) or "one device"
    lines = [
        (f"{config.preset}: {config.batch_size} x {config.data.seq_len} = {config.tokens_per_step:,} tokens per full "
         f"step on {devices} device(s) ({sizes}), {config.microbatches} microbatch(es)"),
        f"learning rate: {facts['kind']}, peak {facts['peak_learning_rate']:g}; the schedule's clock is {facts['clock']}",
        (f"  warmup {facts['warmup_steps']:,} steps = {facts['warmup_tokens']:,} tokens ({facts['warmup_from']}); "
         f"ends at step {facts['warmup_ends_at_step']:,}"),
    ]
    if "decay_steps" in facts:
        final = f" to {facts['final_learning_rate']:g}" if "final_learning_rate" in facts else " to 0"
        lines.append(f"  decay{final} by {facts['decay_steps']:,} steps = {facts['decay_tokens']:,} tokens "
                     f"({facts['decay_from']}); ends at step {facts['decay_ends_at_step']:,}")
    lines.append(f"batch: {ramp_description(ramp)}")
    if ramp.on:
        useful = ramp.summary(config.microbatches)["ramp_rows_useful_over_computed"]
        lines.append(f"  during the ramp {useful:.1%} of the rows the step computes are data, with "
                     f"{config.microbatches} microbatch(es) of {config.batch_size // config.microbatches} rows "
                     f"(microbatches without an active row are skipped)")
    lines.append(f"this run: {config.steps:,} steps = {ramp.tokens_before(config.steps):,} tokens")
    return lines


def plot_schedule(config: TrainConfig, curve: dict, path: str | BinaryIO) -> str | BinaryIO:
    """Learning rate and batch size against tokens seen: the whole schedule on the left, its start
    (warmup and ramp) on the right. `path`: a file name, or a binary file object to write into."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = curve["tokens_before"]
    total = float(tokens[-1] + curve["batch_tokens"][-1])
    unit, scale = next(((u, s) for u, s in (("B", 1e9), ("M", 1e6), ("k", 1e3)) if total >= s), ("", 1.0))
    facts, ramp = schedule_facts(config), config.batch_ramp
    start_end = max(ramp.tokens_before(ramp.ramp_steps), facts["warmup_tokens"]) * 1.25 or total / 10
    marks = [(facts["warmup_tokens"], "warmup ends"), (ramp.tokens_before(ramp.ramp_steps), "batch full")]
    marks += [(facts["decay_tokens"], "decay ends")] if "decay_tokens" in facts else []
    marks += [(ramp.tokens_before(config.steps), f"this run ends (steps={config.steps:,})")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), dpi=120, sharex="col")
    for col, limit in enumerate((total, start_end)):
        shown = tokens <= limit
        x = tokens[shown] / scale
        axes[0, col].plot(x, curve["learning_rate"][shown], drawstyle="steps-post", color="C0")
        axes[1, col].plot(x, curve["batch_tokens"][shown] / 1e3, drawstyle="steps-post", color="C1")
        labelled: list[float] = []
        for at, label in marks:  # in priority order: a crowded later mark gets a line, no label
            if not 0 < at <= limit:
                continue
            crowded = any(abs(at - other) < 0.04 * limit for other in labelled)  # the zoom shows those
            labelled += [] if crowded else [at]
            for ax in axes[:, col]:
                ax.axvline(at / scale, color="0.6", linestyle=":", linewidth=1)
                if not crowded:
                    ax.text(at / scale, 0.5, f" {label}", transform=ax.get_xaxis_transform(), fontsize=7,
                            rotation=90, va="center", color="0.35")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
        axes[1, col].set_xlabel(f"tokens seen ({unit} tokens)" if unit else "tokens seen")
    axes[0, 0].set_ylabel("learning rate")
    axes[1, 0].set_ylabel("batch (thousand tokens)")
    axes[0, 0].set_title("the whole schedule", fontsize=10)
    axes[0, 1].set_title("the start: warmup and batch ramp", fontsize=10)
    fig.suptitle(f"{config.preset}: {facts['kind']} learning rate and batch size against tokens "
                 f"({config.batch_size} x {config.data.seq_len} full batch)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
