"""What the compiler says about a compiled program: memory, FLOPs, out-of-memory.

Knows nothing of training: train/aot.py lowers the train step and hands the
compiled program here. Two things the compiler reports need care:
  memory   `memory_analysis()` per device: arguments (state + batch), outputs,
           temporaries, generated code. A donated argument is written into in
           place: its `alias` bytes are counted in both arguments and outputs, and
           we subtract them once: total = arguments + outputs - alias + temporaries + code.
  FLOPs    `cost_analysis()` is per device and counts each while-loop body
           ONCE (checked on TPU and CPU: a 4-layer scanned model reports about
           the FLOPs of one layer). Layers are a scan and microbatches another,
           so `loop_corrected` extrapolates from two loop-free compiles of the
           same program with 1 and 2 unrolled layers and one microbatch of B/k
           rows: total = k * (c1 + (L - 1) * (c2 - c1)). That calibration is kept for
           the rare loop without a static trip count; the default path reads trip
           counts from the optimized HLO instead (train/planning/loops.py, no extra compile).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

from .loops import loop_corrected_cost

# ----------------------------------------------------------------------------- memory


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device, from `compiled.memory_analysis()`."""

    arguments: int
    outputs: int
    alias: int  # donated argument bytes reused for outputs (counted in both)
    temporaries: int
    code: int
    peak: int = 0  # XLA's own peak estimate where the backend reports one (TPU), else 0

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.alias + self.temporaries + self.code


def memory_breakdown(stats) -> MemoryBreakdown:
    return MemoryBreakdown(
        arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
        alias=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
        code=stats.generated_code_size_in_bytes, peak=int(getattr(stats, "peak_memory_in_bytes", 0) or 0))


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
    """The compiler refused: the program does not fit the chip's HBM."""

    message: str  # the compiler's first line
    required: Optional[float] = None  # bytes, when the message says
    available: Optional[float] = None
    details: str = ""  # the whole message: TPU lists its largest allocations there (train/planning/oom.py)

    @property
    def shortfall(self) -> Optional[float]:
        if self.required is None or self.available is None:
            return None
        return self.required - self.available


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"


def _bytes(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit.upper()]


def parse_out_of_memory(message: str) -> Optional[OutOfMemory]:
    """An OutOfMemory from an XLA error message, or None if it is another error.

    XLA's sizes ("192.83G") are binary: G = GiB."""
    if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
        return None
    first = next((line.strip() for line in message.splitlines() if line.strip()), message)
    patterns = (
        (rf"required for .*?\({_SIZE}\) exceeds available HBM \({_SIZE}\)", False),
        (rf"Used {_SIZE} of {_SIZE} hbm", False),
        (rf"requires? {_SIZE}.*?(?:only|available)\D*{_SIZE}", False),
        (rf"Exceeded hbm capacity by {_SIZE}", True),
    )
    for pattern, is_excess in patterns:
        m = re.search(pattern, message, flags=re.IGNORECASE | re.DOTALL)
        if m and is_excess:
            return OutOfMemory(first, _bytes(*m.groups()), 0.0, message)
        if m:
            return OutOfMemory(first, _bytes(m[1], m[2]), _bytes(m[3], m[4]), message)
    return OutOfMemory(first, details=message)


# ----------------------------------------------------------------------------- compile


@dataclasses.dataclass
class CompileOutcome:
    config: Any
    mesh_shape: dict
    devices: list  # the mesh's devices, flat
    lower_seconds: float
    compile_seconds: float
    compiled: Any = None  # jax.stages.Compiled, None when out of memory
    memory: Optional[MemoryBreakdown] = None
    cost: Optional[dict] = None  # flops, optimal_seconds (TPU), bytes accessed: raw, per device
    oom: Optional[OutOfMemory] = None
    dcn_bytes: Optional[float] = None  # multi-slice: bytes per device sent across slices per step (the HLO's)

    @property
    def fits(self) -> bool:
        return self.oom is None


def cost_summary(compiled) -> dict:
    """The few cost_analysis() keys we use (list-of-dicts in older jax, dict now)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    keys = ("flops", "optimal_seconds", "bytes accessed", "transcendentals")
    return {k: float(cost[k]) for k in keys if k in cost}


def hlo_cost(module_text: str) -> dict:
    """XLA's cost analysis (HloCostAnalysis, loops counted once) of an HLO module given as text.

    Through jaxlib's own bindings (jax 0.10 exposes no public path): the module is parsed and
    costed by the CPU client, whose per-op FLOP counts are XLA's generic ones, equal to the
    TPU compiler's for the same module (checked: 51,019,772 vs 51,019,776 for a scanned MLP)."""
    import jax
    from jax._src.lib import _jax
    from jaxlib import _hlo  # type: ignore[attr-defined]  # a compiled module: jaxlib ships no stub for it

    module = _hlo.hlo_module_from_text(module_text)
    return dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))


def hlo_loop_corrected(compiled, raw: dict, peak: Optional[float] = None) -> Optional[dict]:
    """{flops, optimal_seconds?} for the whole step with every loop body counted as often as it
    runs (train/planning/loops.py), or None if a loop has no static trip count or jaxlib cannot parse
    the module.

    optimal_seconds (TPU only): the cut-out loop bodies can only be costed by the CPU client,
    which has no TPU time model, so the step time is modelled as compute at the chip's `peak`
    plus bytes at the rate the compiler's own raw estimate implies,
        seconds = F / peak + B * (raw_seconds - F_raw / peak) / B_raw,
    with F and B (FLOPs, bytes accessed) loop-corrected. Its agreement with the 1- and 2-layer
    calibration compiles is measured in docs/benchmarks.md (planning)."""
    costs: dict[str, dict] = {}

    def cost(text: str) -> dict:  # the whole module is costed once, for both figures
        if text not in costs:
            costs[text] = hlo_cost(text)
        return costs[text]

    keys = ("flops", "bytes accessed")
    try:
        text = compiled.as_text()
        counted = loop_corrected_cost(text, cost, keys=keys)
        if not counted:
            return None
        whole = cost(text)
    except (ValueError, RuntimeError):  # a dialect jaxlib's parser rejects: fall back to the calibration
        return None
    if not whole.get("flops"):
        return None
    ratio = counted["flops"] / float(whole["flops"])
    out = {"flops": raw.get("flops", float(whole["flops"])) * ratio}
    seconds = raw.get("optimal_seconds")
    if seconds and peak:
        memory = seconds - whole["flops"] / peak
        per_byte = memory / whole["bytes accessed"] if memory > 0 and whole.get("bytes accessed") else 0.0
        out["optimal_seconds"] = (counted["flops"] / peak + per_byte * counted["bytes accessed"]
                                  if per_byte else seconds * ratio)
    return out


def calibration_configs(config) -> list:
    """The same step with 1 and with 2 unrolled layers and one microbatch of B/k rows:
    no while loops, so cost_analysis counts everything in them."""
    return [dataclasses.replace(config, model=config.model.replace(num_layers=n, scan_layers=False), microbatches=1,
                                batch_size=config.batch_size // config.microbatches) for n in (1, 2)]


def needs_calibration(config) -> bool:
    """A while loop remains only when the scan is not fully unrolled."""
    return config.model.scan_layers and config.model.num_layers > config.model.scan_unroll


def loop_corrected(raw: float, calibration: Optional[tuple[float, float]], config) -> Optional[float]:
    """Per-device cost of the whole step, for a cost that adds up over ops (flops, optimal_seconds).

    raw: the real (scanned) compile, whose loop bodies count once. calibration: the
    1- and 2-layer unrolled compiles; cost is linear in depth (layers, their share of
    the optimizer and norms), so depth L costs c1 + (L - 1)(c2 - c1) per microbatch,
    times k microbatches. That counts the optimizer update k times instead of once:
    ~40 FLOPs per parameter against 6 x parameters x tokens per microbatch, i.e.
    negligible at scale (it matters only for toy batches)."""
    per_microbatch = raw
    if needs_calibration(config):
        if calibration is None or calibration[1] <= calibration[0]:
            return None
        c1, c2 = calibration
        per_microbatch = c1 + (config.model.num_layers - 1) * (c2 - c1)
    return config.microbatches * per_microbatch
