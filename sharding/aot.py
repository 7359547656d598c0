"""Ahead-of-time compilation of THE train step, and what the compiler says about it.

`compile_step` builds the same jitted step `magic train` runs (`setup.train_run`:
`bind_train_step` + `shard_run`) over any devices, here TPU topology devices from libtpu or a
fake CPU mesh, and lowers it with ShapeDtypeStructs instead of arrays: no
memory is allocated, so a 175B model compiles for a 512-chip pod on a laptop.

Two things the compiler reports need care:
  memory   `memory_analysis()` per device: arguments (state + batch), outputs,
           temporaries, generated code. The state is donated, so the new state
           is written into the old one's buffers: `alias` bytes are counted in
           both arguments and outputs, and we subtract them once:
           total = arguments + outputs - alias + temporaries + code.
  FLOPs    `cost_analysis()` is per device and counts each while-loop body
           ONCE (checked on TPU and CPU: a 4-layer scanned model reports about
           the FLOPs of one layer). Layers are a scan and microbatches another,
           so `loop_corrected` extrapolates from two loop-free compiles of the
           same step with 1 and 2 unrolled layers and one microbatch of B/k
           rows: total = k * (c1 + (L - 1) * (c2 - c1)).
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import time
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

GiB = 2**30

# The pipeline's batch contract (train/pipeline.py): [B, T] int32 unless noted.
_DECODER = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32,
            "loss_mask": jnp.float32}
BATCH_KEYS = {
    "decoder": _DECODER,
    "encoder": {**_DECODER, "token_types": jnp.int32},
    # encoder and decoder rows are both seq_len long (make_pipeline's decoder_len=None)
    "encoder_decoder": {"encoder_inputs": jnp.int32, "encoder_segment_ids": jnp.int32,
                        "encoder_positions": jnp.int32, "decoder_inputs": jnp.int32, "decoder_targets": jnp.int32,
                        "decoder_segment_ids": jnp.int32, "decoder_positions": jnp.int32, "loss_mask": jnp.float32},
}


def abstract_batch(config, sharding) -> dict:
    """ShapeDtypeStructs of one global batch, laid out as `shard_run` expects it."""
    shape = (config.batch_size, config.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, dtype in BATCH_KEYS[config.model.family].items()}


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
            return OutOfMemory(first, _bytes(*m.groups()), 0.0)
        if m:
            return OutOfMemory(first, _bytes(m[1], m[2]), _bytes(m[3], m[4]))
    return OutOfMemory(first)


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


def lower_step(config, devices=None):
    """(ShardedRun, Lowered): the train step `magic train` runs (setup.train_run), lowered for `devices`."""
    from sharding.setup import train_run

    _, run = train_run(config, devices)
    lowered = run.train_step.lower(run.abstract_state, abstract_batch(config, run.batch_sharding))
    return run, lowered


def compile_step(config, devices=None) -> CompileOutcome:
    """Lower and compile; an out-of-memory refusal becomes a result, not an exception."""
    start = time.perf_counter()
    run, lowered = lower_step(config, devices)
    lowered_at = time.perf_counter()
    shape, devices = dict(run.mesh.shape), list(run.mesh.devices.flat)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        oom = parse_out_of_memory(str(err))
        if oom is None:
            raise
        return CompileOutcome(config, shape, devices, lowered_at - start, time.perf_counter() - lowered_at, oom=oom)
    return CompileOutcome(config, shape, devices, lowered_at - start, time.perf_counter() - lowered_at, compiled,
                          memory_breakdown(compiled.memory_analysis()), cost_summary(compiled))


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


# ----------------------------------------------------------------------------- serialize

FORMAT = "matrixmagic-executable-v1"


def step_signature(config, devices: int) -> dict:
    """The config fields baked into a compiled step (shapes, optimizer constants, schedule,
    mesh: its resolved sizes, so data=-1 and data=1 on one device compare equal)."""
    from sharding.mesh import axis_sizes

    mesh = dataclasses.asdict(config.mesh)
    mesh.update(axis_sizes(config.mesh, devices))
    return {"model": dataclasses.asdict(config.model), "optimizer": dataclasses.asdict(config.optimizer),
            "mesh": mesh, "batch_size": config.batch_size,
            "microbatches": config.microbatches, "steps": config.steps, "data.seq_len": config.data.seq_len}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def signature_differences(saved: dict, current: dict) -> list[str]:
    a, b = _flat(saved), _flat(current)
    return [f"{k}: compiled {a.get(k)!r}, this run {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def save_executable(path: str, outcome: "CompileOutcome") -> int:
    """Write the executable plus what a loader must check; returns the file size.

    Only load files you made: deserializing an executable runs pickle."""
    from jax.experimental import serialize_executable

    blob, in_tree, out_tree = serialize_executable.serialize(outcome.compiled)
    device = outcome.devices[0]
    payload = {"format": FORMAT, "jax": jax.__version__, "platform": device.platform,
               "device_kind": device.device_kind, "num_devices": len(outcome.devices),
               "signature": step_signature(outcome.config, len(outcome.devices)),
               "in_tree": str(in_tree), "out_tree": str(out_tree), "executable": blob}
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def _load_problems(payload: dict, run, config) -> list[str]:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return ["not a `magic compile --serialize` file"]
    problems = []
    if payload["jax"] != jax.__version__:
        problems.append(f"compiled with jax {payload['jax']}, running jax {jax.__version__}")
    devices = list(run.mesh.devices.flat)
    if payload["num_devices"] != len(devices) or payload["platform"] != devices[0].platform:
        problems.append(f"compiled for {payload['num_devices']} {payload['platform']} device(s), this mesh has "
                        f"{len(devices)} {devices[0].platform} device(s)")
    problems += signature_differences(payload["signature"], step_signature(config, len(devices)))
    return problems


def load_train_step(path: str, run, config, warn: Callable[[str], None] = None,
                    log: Callable[[str], None] = lambda msg: None) -> Callable:
    """The serialized step if it matches this run exactly, else `run.train_step` (jit
    compiles it on the first call) after a warning that says what differed."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))

    def fall_back(reason: str) -> Callable:
        warn(f"--compiled {path}: not used ({reason}); compiling the train step instead.")
        return run.train_step

    try:
        with open(path, "rb") as f:
            payload = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        return fall_back(f"cannot read it: {err}")
    if problems := _load_problems(payload, run, config):
        return fall_back("; ".join(problems[:6]))
    batch = abstract_batch(config, run.batch_sharding)
    in_tree = jax.tree.structure(((run.abstract_state, batch), {}))
    out_tree = jax.tree.structure(jax.eval_shape(run.train_step, run.abstract_state, batch))
    if str(in_tree) != payload["in_tree"]:
        return fall_back("its input tree (state, batch) differs from this run's")
    if str(out_tree) != payload["out_tree"]:
        return fall_back("its output tree (state, metrics) differs from this run's")
    from jax.experimental import serialize_executable

    try:
        loaded = serialize_executable.deserialize_and_load(payload["executable"], in_tree, out_tree,
                                                           execution_devices=list(run.mesh.devices.flat))
    except Exception as err:  # a runtime that cannot load it (other libtpu, other topology)
        return fall_back(f"the runtime refused it: {str(err).splitlines()[0]}")
    expected = jax.tree.leaves((run.abstract_state, batch))
    got = jax.tree.leaves(loaded.args_info)
    if [(a.shape, a.dtype) for a in expected] != [(g.shape, g.dtype) for g in got]:
        return fall_back("argument shapes or dtypes differ from this run's")
    log(f"--compiled {path}: using the serialized train step (no compile)")
    return loaded
