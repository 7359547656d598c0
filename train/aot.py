"""Ahead-of-time compilation of THE train step, and its serialized executable.

`compile_step` builds the same jitted step `magic train` runs (`run.train_run`)
over any devices, here TPU topology devices from libtpu or a fake CPU mesh, and
lowers it with ShapeDtypeStructs (`run.abstract_batch`, from the family record)
instead of arrays: no memory is allocated, so a 175B model compiles for a
512-chip pod on a laptop. What the compiler then says (memory, FLOPs, out of
memory) is read by train/planning/compiled.py.

`save_executable` / `load_train_step`: `magic compile --serialize X` writes the
executable; `magic train --compiled X` uses it only if this run's config,
devices, trees and shapes match it exactly, and otherwise compiles, saying why.
X may be a local path or a `gs://` URL (train/storage.py): a pod's hosts share no disk,
so the file compiled on a laptop reaches them through the bucket. It is read and written
whole, as bytes (an object appears whole when written; a local file through a temporary
name), so a reader never sees half of it. The file is sealed (train/sealed.py: header, SHA-256,
a keyed tag) and checked before anything in it is loaded: an executable is code, so a file
this user's key did not sign is refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from typing import Callable, Optional

import jax

from matrixmagic.sharding.mesh import axis_sizes
from matrixmagic.train.planning.compiled import CompileOutcome, cost_summary, memory_breakdown, parse_out_of_memory

from . import sealed, storage
from .run import abstract_batch, train_run


def lower_step(config, devices=None):
    """(ShardedRun, Lowered): the train step `magic train` runs (run.train_run), lowered for `devices`."""
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


# ----------------------------------------------------------------------------- serialize

def step_signature(config, devices: int) -> dict:
    """The config fields baked into a compiled step (shapes, optimizer constants, schedule,
    batch ramp, mesh: its resolved sizes, so data=-1 and data=1 on one device compare equal)."""
    mesh = dataclasses.asdict(config.mesh)
    mesh.update(axis_sizes(config.mesh, devices))
    return {"model": dataclasses.asdict(config.model), "optimizer": dataclasses.asdict(config.optimizer),
            "ramp": dataclasses.asdict(config.ramp), "mesh": mesh, "batch_size": config.batch_size,
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
    """Write the executable, sealed with what a loader must check; returns the file size.
    The metadata is JSON (train/sealed.py): the only pickle in the file is jax's own."""
    from jax.experimental import serialize_executable

    blob, in_tree, out_tree = serialize_executable.serialize(outcome.compiled)
    device = outcome.devices[0]
    metadata = {"jax": jax.__version__, "platform": device.platform,
                "device_kind": device.device_kind, "num_devices": len(outcome.devices),
                "signature": step_signature(outcome.config, len(outcome.devices)),
                "in_tree": str(in_tree), "out_tree": str(out_tree)}
    data = sealed.seal(metadata, blob)
    storage.write_bytes(path, data)
    return len(data)


def _as_json(value):
    """What a value reads back as from the file's JSON metadata (tuples become lists), so a
    loaded signature compares equal to this run's."""
    return json.loads(json.dumps(value, sort_keys=True))


def _load_problems(payload: dict, run, config) -> list[str]:
    problems = []
    if payload["jax"] != jax.__version__:
        problems.append(f"compiled with jax {payload['jax']}, running jax {jax.__version__}")
    devices = list(run.mesh.devices.flat)
    if payload["num_devices"] != len(devices) or payload["platform"] != devices[0].platform:
        problems.append(f"compiled for {payload['num_devices']} {payload['platform']} device(s), this mesh has "
                        f"{len(devices)} {devices[0].platform} device(s)")
    problems += signature_differences(payload["signature"], _as_json(step_signature(config, len(devices))))
    return problems


@dataclasses.dataclass(frozen=True)
class CompiledFile:
    """A --compiled file read and checked (train/sealed.py); `unreadable` says why it could not be read."""
    path: str
    metadata: Optional[dict] = None
    executable: bytes = b""
    unreadable: str = ""


def open_compiled(path: str) -> CompiledFile:
    """Read and check a --compiled file before any work: a file that is not ours, damaged or
    signed with another key is refused (sealed.CompiledFileRefused, exit 2), unloaded; one that
    cannot be read at all is reported later, and the step is compiled instead."""
    if storage.is_url(path):  # another scheme is refused naming the flag; gs:// needs credentials
        path = storage.normalize(path, "--compiled")
        storage.check_credentials(path, "--compiled")
    else:
        path = os.path.abspath(os.path.expanduser(path))
    try:
        data = storage.read_bytes(path)
    except Exception as err:  # noqa: BLE001 - missing, unreadable, or storage not answering: compile instead
        return CompiledFile(path, unreadable=f"cannot read it: {storage.short(err)}")
    metadata, executable = sealed.unseal(path, data)
    return CompiledFile(path, metadata, executable)


def load_train_step(source: "str | CompiledFile", run, config, warn: Optional[Callable[[str], None]] = None,
                    log: Callable[[str], None] = lambda msg: None) -> Callable:
    """The serialized step if it matches this run exactly, else `run.train_step` (jit
    compiles it on the first call) after a warning that says what differed. A file that is
    not ours is refused before this (open_compiled)."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    file = source if isinstance(source, CompiledFile) else open_compiled(source)
    path, payload = file.path, file.metadata

    def fall_back(reason: str) -> Callable:
        warn(f"--compiled {path}: not used ({reason}); compiling the train step instead.")
        return run.train_step

    if payload is None:
        return fall_back(file.unreadable)
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
        loaded = serialize_executable.deserialize_and_load(file.executable, in_tree, out_tree,
                                                           execution_devices=list(run.mesh.devices.flat))
    except Exception as err:  # noqa: BLE001 - a runtime that cannot load it (other libtpu, other topology)
        return fall_back(f"the runtime refused it: {str(err).splitlines()[0]}")
    expected = jax.tree.leaves((run.abstract_state, batch))
    got = jax.tree.leaves(loaded.args_info)
    if [(a.shape, a.dtype) for a in expected] != [(g.shape, g.dtype) for g in got]:
        return fall_back("argument shapes or dtypes differ from this run's")
    log(f"--compiled {path}: using the serialized train step (no compile)")
    return loaded
