"""Will it fit? The analytic memory of a run against this machine's memory, before compiling.

`magic train`, `magic generate` and `magic explain` call `check_fits` before anything is
compiled or allocated, so a model or batch too large for the machine fails in a second
with the numbers and the knobs to turn, instead of minutes later with an allocator's
traceback (GPT-3 175B in `magic generate` asked for 231 GB).

What is counted, per device:
  train     `plan.estimate` (train/planning/plan.py): params, gradients and Adam's two moments
            (1 : 1 : 2 of its state), activations for the remat policy, and the float32
            logits and their gradient (split out here, 8 bytes per token per vocab row / t).
  generate  the params, the unrolled copy the decoding loop reads (model/generate.py
            model/generate.holds_unrolled_copy), the KV cache (K and V per layer,
            [B, cache, kv_heads x head_dim] in the compute dtype) and the prefill's float32 logits.
  explain   the params and one forward pass with every intermediate kept (the walk
            reads them all): per layer ~ 10 d_model + 2 d_ff floats per token plus
            3 [T, T] score-sized arrays per head, and the logits and probabilities.
What it is compared with: an accelerator's `memory_stats()['bytes_limit']` less what is
in use; on CPU, where every device shares the host, the host's available RAM
(/proc/meminfo MemAvailable, else sysconf) against the per-device figure times the
number of local devices.

The estimate is a floor, not a promise: on CPU, XLA's temp slab for the train step is
1-5x the closed form (tests/test_memory_fit.py states the factor per config), so
only a run the model already says is too big is refused. The check never refuses what
might fit by a wide margin; `--no-memory-check` skips it for users who know better.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from matrixmagic.configs import ConfigError, ModelConfig
from matrixmagic.configs.train_config import TrainConfig
from matrixmagic.model.accounting import closed_form_params
from matrixmagic.model.attention import kv_cache_width
from matrixmagic.model.families import family_of
from matrixmagic.model.generate import holds_unrolled_copy

from .chips import GiB
from .plan import DTYPE_BYTES, estimate, logit_bytes

OVERRIDE_FLAG = "--no-memory-check"


@dataclasses.dataclass(frozen=True)
class Available:
    bytes: float  # for the whole need (per device on accelerators; the host's on CPU)
    where: str  # what was measured, for the message
    devices_sharing: int  # how many devices' needs must fit in `bytes` (CPU: all local devices)


def host_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """The host RAM a new allocation can take: MemAvailable (free + reclaimable caches),
    else sysconf's free pages; None where neither exists."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(devices: Sequence) -> Available | None:
    """This process's memory for `devices` (its local jax devices): an accelerator's free bytes,
    or the host's RAM on CPU; None when neither can be read (then nothing is checked)."""
    device = devices[0]
    try:
        stats = device.memory_stats()  # None on CPU
    except (RuntimeError, NotImplementedError):  # a backend without allocator stats
        stats = None
    if stats and stats.get("bytes_limit"):
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return Available(free, f"{device.device_kind} memory per device (jax memory_stats bytes_limit "
                               f"{stats['bytes_limit'] / GiB:.2f} GiB, less what is in use)", 1)
    if device.platform == "cpu":
        host = host_available_bytes()
        if host is None:
            return None
        return Available(host, f"host RAM available (MemAvailable), shared by {len(devices)} CPU device(s)",
                         len(devices))
    return None


# ----------------------------------------------------------------------------- what a job needs


def training_parts(config: TrainConfig, devices: int) -> dict[str, float]:
    """Per-device bytes of one train step by part (`plan.estimate`, split for the message)."""
    est = estimate(config, devices)
    logits = logit_bytes(config, devices)  # plan.estimate's logits term
    quarter = est.state_bytes / 4  # plan.estimate's state is 4 p N / shards: params, grads, 2 Adam moments
    return {"params": quarter, "gradients": quarter, "Adam moments": 2 * quarter,
            "activations": est.activation_bytes - logits, "logits (float32, and their gradient)": logits}


def param_bytes(cfg: ModelConfig) -> float:
    counts = closed_form_params(cfg)
    return (counts["model"] + counts["mlm_head"]) * DTYPE_BYTES[cfg.param_dtype]


def generation_parts(cfg: ModelConfig, batch: int, prompt_len: int, cache_len: int) -> dict[str, float]:
    """Bytes `magic generate` holds: params (twice when the decoding loop unrolls a scanned
    stack), the KV cache of every self-attention layer, the prefill's logits."""
    parts = {"params": param_bytes(cfg)}
    if holds_unrolled_copy(cfg):
        parts["unrolled copy of the params"] = parts["params"]
    if cfg.has_decoder:
        parts["KV cache"] = cfg.num_layers * batch * cache_len * kv_cache_width(cfg) * DTYPE_BYTES[cfg.dtype]
    parts["logits (float32)"] = 4 * batch * prompt_len * cfg.vocab_size
    return parts


def forward_parts(cfg: ModelConfig, batch: int, seq_len: int) -> dict[str, float]:
    """Bytes of one forward pass that keeps every intermediate (`magic explain`)."""
    stacks = len(family_of(cfg).sides)
    per_token_layer = 4 * (10 * cfg.d_model + 2 * cfg.d_ff + 3 * cfg.num_heads * seq_len)
    return {"params": param_bytes(cfg),
            "intermediates": stacks * cfg.num_layers * batch * seq_len * per_token_layer,
            "logits and probabilities (float32)": 8 * batch * seq_len * cfg.vocab_size}


# ----------------------------------------------------------------------------- the check


def shortfall_message(what: str, parts: dict[str, float], have: Available, knobs: Sequence[str]) -> str | None:
    """The error text when `parts` (bytes per device) exceed `have`, else None."""
    per_device = sum(parts.values())
    need = per_device * have.devices_sharing
    if need <= have.bytes:
        return None
    share = f" ({have.devices_sharing} devices x {per_device / GiB:,.2f} GiB)" if have.devices_sharing > 1 else ""
    largest = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
    parts_text = ", ".join(f"{name} {size / GiB:,.2f} GiB" for name, size in largest)
    return (f"{what} does not fit in memory: it needs about {need / GiB:,.2f} GiB{share}, and this machine has "
            f"{have.bytes / GiB:,.2f} GiB ({have.where}). Largest parts per device: {parts_text} "
            f"(closed forms, train/planning/fit.py). To fit: {'; '.join(knobs)}. The estimate is a floor; if you know "
            f"better, pass {OVERRIDE_FLAG}.")


def check_fits(what: str, parts: dict[str, float], devices: Sequence, knobs: Sequence[str]) -> None:
    """Raise ConfigError (exit 2 in the CLI) when the job cannot fit; nothing is allocated."""
    have = available_memory(devices)
    message = shortfall_message(what, parts, have, knobs) if have else None
    if message:
        raise ConfigError(message)


def training_knobs(config: TrainConfig) -> list[str]:
    """What shrinks a train step, leaving out what is already as small as it goes."""
    knobs = [f"a smaller --batch (batch_size={config.batch_size})",
             f"more --microbatches (now {config.microbatches})"]
    if config.model.remat_policy != "full":
        knobs.append(f"--remat full (now {config.model.remat_policy})")
    model = (f"a smaller model (--preset, or --set model.d_model / model.num_layers; now d_model="
             f"{config.model.d_model}, {config.model.num_layers} layers) or a shorter data.seq_len "
             f"({config.data.seq_len})")
    knobs += [model, "more devices, with --mesh fsdp=-1 to shard the params and optimizer state"]
    return knobs


def check_training_fits(config: TrainConfig, devices: int, local_devices: Sequence) -> None:
    """`devices`: the run's device count (the mesh); `local_devices`: this process's jax devices."""
    check_fits(f"training {config.preset} (batch {config.batch_size} x {config.data.seq_len})",
               training_parts(config, devices), local_devices, training_knobs(config))
