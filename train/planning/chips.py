"""Accelerator chips, slice names and the devices to compile for.

Why a table: `magic compile` plans pod-scale runs on a laptop, so the chip's
peak FLOP/s and HBM must be known without the chip. One JAX device = one chip
everywhere here (v4 and v5p run their two TensorCores as one "megacore" device).

Slice names follow Google Cloud's accelerator types:
  v4-N, v5p-N   N counts TensorCores, 2 per chip: v5p-1024 = 512 chips (8x8x8)
  v5e-N, v6e-N  N counts chips (one TensorCore each): v5e-16 = 16 chips (4x4)
  v5p:8x8x8     a libtpu topology string, passed through (chips = product)
  cpu-8         8 of this host's CPU devices (a fake mesh for testing the plan)
  h100x64       64 GPUs: no compiler here, so an analytic estimate only
TPU topologies are 3-D tori for v4/v5p and 2-D for v5e/v6e; each dimension a
power of two, at least 2x2 (libtpu's chips-per-host bounds).

Sources (per-chip bf16 peak, HBM):
  v4   https://cloud.google.com/tpu/docs/v4 : 275 TFLOP/s, 32 GiB HBM2, 2 TensorCores
  v5e  https://cloud.google.com/tpu/docs/v5e : 197 TFLOP/s, 16 GiB HBM2, 1 TensorCore
  v5p  https://cloud.google.com/tpu/docs/v5p : 459 TFLOP/s, 95 GiB HBM2e, 2 TensorCores
  v6e  https://cloud.google.com/tpu/docs/v6e (Trillium): 918 TFLOP/s, 32 GiB HBM
       (overview: https://cloud.google.com/tpu/docs/system-architecture-tpu-vm)
  H100 NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOP/s dense bf16
       (1979 is with 2:4 sparsity), 80 GB HBM3
  H200 NVIDIA H200 Tensor Core GPU datasheet (SXM): 989 TFLOP/s dense bf16 (the H100's
       compute), 141 GB HBM3e
  A100 NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOP/s dense bf16, 80 GB HBM2e
Google's pages write "GB" and "GiB" for the same TPU figures; we use GiB (XLA
reports 95.74 GiB usable on a v5p). NVIDIA's GB are 10^9 bytes.

Data-centre network (DCN) bandwidth per chip, what joins the slices of a multi-slice job:
  v5p  https://cloud.google.com/tpu/docs/v5p : "Data center network (DCN) bandwidth per chip" 50 Gbps
  v5e  https://cloud.google.com/tpu/docs/v5e : "Per-host NIC configuration" 2 x 100 Gbps, 8 chips per
       host: 25 Gbps per chip
  v4, v6e: not stated per chip on their pages; `--dcn-gbps` gives it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Literal, Optional

from matrixmagic.configs.model_config import ConfigError, suggest

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    device_kinds: tuple[str, ...]  # jax Device.device_kind strings (compile-only and real)
    peak_bf16_flops: float  # per chip = per JAX device
    hbm_bytes: int
    cores_per_chip: int  # TensorCores: what v4-N / v5p-N count
    topology_dims: int  # 3 (v4, v5p torus), 2 (v5e, v6e), 0 (GPU: no libtpu topology)
    topology_kwargs: tuple = ()  # extra get_topology_desc arguments
    dcn_bits_per_s: Optional[float] = None  # per chip, between slices (sources above); None: not published


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", ("TPU v4",), 275e12, 32 * GiB, 2, 3, (("chip_config_name", "megacore"),)),
    Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * GiB, 1, 2, dcn_bits_per_s=2 * 100e9 / 8),
    Chip("v5p", ("TPU v5", "TPU v5p"), 459e12, 95 * GiB, 2, 3, dcn_bits_per_s=50e9),
    Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * GiB, 1, 2),
    Chip("h100", ("NVIDIA H100", "H100"), 989e12, 80 * 10**9, 1, 0),
    Chip("h200", ("NVIDIA H200", "H200"), 989e12, 141 * 10**9, 1, 0),
    Chip("a100", ("NVIDIA A100", "A100"), 312e12, 80 * 10**9, 1, 0),
)}


def peak_flops_for_device_kind(device_kind: str) -> float:
    """bf16 peak FLOP/s of one device, from `jax.Device.device_kind`. KeyError if unknown.

    Exact names first ("TPU v5 lite" must not match v5p's "TPU v5"), then GPU
    names by substring ("NVIDIA H100 80GB HBM3" -> H100)."""
    kind = device_kind.strip().lower()
    for chip in CHIPS.values():
        if kind in (k.lower() for k in chip.device_kinds):
            return chip.peak_bf16_flops
    for chip in CHIPS.values():
        if chip.topology_dims == 0 and any(k.lower() in kind for k in chip.device_kinds):
            return chip.peak_bf16_flops
    raise KeyError(f"no peak FLOP/s for device kind {device_kind!r}; known: "
                   f"{', '.join(k for c in CHIPS.values() for k in c.device_kinds)} (set peak_flops=...)")


@dataclasses.dataclass(frozen=True)
class Target:
    """What `--topology` names: the chip, how many, and how to get devices for it."""

    spec: str  # as the user wrote it
    kind: Literal["tpu", "cpu", "gpu"]
    chips: int
    chip: Optional[Chip]  # None for the CPU mesh (no HBM, no peak from the table)
    topology: str = ""  # libtpu topology string of one slice, e.g. "v5p:8x8x8"
    slices: int = 1  # identical slices joined by the data-centre network; chips counts all of them
    dcn_bits_per_s: Optional[float] = None  # per chip between slices: the chip's, or --dcn-gbps

    @property
    def description(self) -> str:
        if self.kind == "cpu":
            return f"{self.chips} CPU device(s) of this host (a fake mesh: no HBM limit)"
        assert self.chip is not None  # only the CPU mesh has no chip
        what = f"{self.chips} {self.chip.name} chip(s)"
        if self.kind == "gpu":
            return what + " (GPU cluster: analytic estimate, no compile)"
        counted = "TensorCores, 2 per chip" if self.chip.cores_per_chip == 2 else "chips"
        if self.slices > 1:
            assert self.dcn_bits_per_s is not None  # with_slices sets it for every multi-slice target
            what += (f" in {self.slices} slices of {self.topology} joined by the data-centre network "
                     f"({self.dcn_bits_per_s / 1e9:g} Gbps per chip)")
            return f"{what} ({self.chip.name}-N counts {counted}; --topology names one slice)"
        return f"{what}, topology {self.topology} ({self.chip.name}-N counts {counted})"


def with_slices(target: Target, slices: Optional[int], dcn_gbps: Optional[float] = None) -> Target:
    """`--slices N` (and `--dcn-gbps`): N copies of the named TPU slice, joined by DCN.

    Only the data axis crosses the slices (sharding/mesh.py), so a multi-slice plan is the
    one-slice layout with `mesh.dcn_data = N` more data-parallel replicas."""
    if dcn_gbps is not None and not (dcn_gbps > 0 and dcn_gbps != float("inf")):
        raise ConfigError(f"--dcn-gbps {dcn_gbps} is invalid: give the data-centre network bandwidth per chip in "
                          f"Gbit/s, e.g. --dcn-gbps 50.")
    if slices is None or slices == 1:
        if dcn_gbps is not None:
            raise ConfigError("--dcn-gbps only matters with --slices N (N > 1): one slice uses no DCN.")
        return target
    if slices < 1:
        raise ConfigError(f"--slices {slices} is invalid: use the number of TPU slices, 1 or more.")
    if target.kind != "tpu":
        where = ("a fake CPU mesh is one process, one slice (two processes with dcn_data=2 are tested in "
                 "tests/test_multihost.py)" if target.kind == "cpu" else
                 "GPU clusters have no slices: their nodes are the data-parallel replicas (--mesh data=...)")
        raise ConfigError(f"--slices {slices} is for TPU multi-slice topologies (e.g. --topology v5p-1024 "
                          f"--slices 2); {where}.")
    assert target.chip is not None  # a TPU target always names its chip
    bits = dcn_gbps * 1e9 if dcn_gbps is not None else target.chip.dcn_bits_per_s
    if bits is None:
        raise ConfigError(f"--slices {slices}: the {target.chip.name}'s data-centre network bandwidth per chip is "
                          f"not published with its specs; give it with --dcn-gbps (e.g. --dcn-gbps 50).")
    return dataclasses.replace(target, chips=target.chips * slices, slices=slices, dcn_bits_per_s=bits)


def add_slices_arguments(p) -> None:
    """`--slices` and `--dcn-gbps`, shared by `magic compile` and `magic plan`."""
    p.add_argument("--slices", type=int, help="TPU multi-slice: this many copies of --topology joined by the "
                                              "data-centre network (mesh.dcn_data); default 1")
    p.add_argument("--dcn-gbps", type=float, help="data-centre network bandwidth per chip in Gbit/s (default: "
                                                  "the chip's published figure, v5p 50, v5e 25)")


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's slice shape for a chip count: 512 chips, 3-D -> (8, 8, 8); 16, 2-D -> (4, 4).

    Doubling the smallest dimension reproduces Google's tables (v5p: 2x2x1,
    2x2x2, 2x4x4 ... 8x8x16; v5e: 2x2, 2x4, 4x4 ... 16x16)."""
    shape = [1] * dims
    n = chips
    while n > 1:
        shape[shape.index(min(shape))] *= 2
        n //= 2
    grown = sorted(s for s in shape if s > 1)
    return tuple(grown + [1] * (dims - len(grown)))


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_target(spec: str) -> Target:
    """`--topology` string -> Target, or ConfigError naming the accepted forms."""
    text = spec.strip().lower()
    forms = "v5p-1024, v4-2048, v5e-256, v6e-64, v5p:8x8x8, cpu-8 or h100x64"
    if m := re.fullmatch(r"cpu-(\d+)", text):
        if int(m[1]) < 1:
            raise ConfigError(f"--topology {spec!r} is invalid: use at least one CPU device, e.g. cpu-1 or cpu-8.")
        return Target(spec, "cpu", int(m[1]), None)
    if m := re.fullmatch(r"([a-z]\d+)x(\d+)", text):
        chip = CHIPS.get(m[1])
        if chip is None or chip.topology_dims:
            gpus = [c.name for c in CHIPS.values() if not c.topology_dims]
            raise ConfigError(f"--topology {spec!r}: unknown GPU {m[1]!r}; use one of {', '.join(gpus)} "
                              f"(e.g. h100x64).{suggest(m[1], gpus)}")
        if int(m[2]) < 1:  # every later split divides by the count
            raise ConfigError(f"--topology {spec!r} is invalid: use at least one GPU, e.g. {m[1]}x1 or {m[1]}x8.")
        return Target(spec, "gpu", int(m[2]), chip)
    if m := re.fullmatch(r"(v\d[a-z]?):(\d+(?:x\d+){1,2})", text):
        return _raw_topology(spec, m[1], m[2])
    if m := re.fullmatch(r"(v\d[a-z]?)-(\d+)", text):
        return _named_slice(spec, m[1], int(m[2]))
    raise ConfigError(f"--topology {spec!r} is not a slice name: use e.g. {forms}.")


def _tpu_chip(spec: str, name: str) -> Chip:
    chip = CHIPS.get(name)
    if chip is None or not chip.topology_dims:
        tpus = [c.name for c in CHIPS.values() if c.topology_dims]
        raise ConfigError(f"--topology {spec!r}: unknown TPU generation {name!r}; use one of "
                          f"{', '.join(tpus)}.{suggest(name, tpus)}")
    return chip


def _named_slice(spec: str, name: str, count: int) -> Target:
    chip = _tpu_chip(spec, name)
    chips = count // chip.cores_per_chip
    unit = "TensorCores (2 per chip)" if chip.cores_per_chip == 2 else "chips"
    smallest = 4 * chip.cores_per_chip
    if count % chip.cores_per_chip or not _power_of_two(chips) or chips < 4:
        raise ConfigError(f"--topology {spec!r}: {name}-N counts {unit}; N must be a power of two >= {smallest} "
                          f"(e.g. {name}-{smallest}, {name}-{64 * chip.cores_per_chip}), or give a topology "
                          f"string such as {name}:{'x'.join(map(str, torus_shape(16, chip.topology_dims)))}.")
    shape = torus_shape(chips, chip.topology_dims)
    return Target(spec, "tpu", chips, chip, f"{name}:{'x'.join(map(str, shape))}")


def _raw_topology(spec: str, name: str, dims: str) -> Target:
    chip = _tpu_chip(spec, name)
    shape = tuple(int(d) for d in dims.split("x"))
    chips = 1
    for d in shape:
        chips *= d
    return Target(spec, "tpu", chips, chip, f"{name}:{dims}")


# ----------------------------------------------------------------------------- devices


def libtpu_available() -> bool:
    """Is libtpu installed (the optional `tpu` extra)? Tests monkeypatch this."""
    if os.environ.get("TPU_LIBRARY_PATH"):
        return True
    return importlib.util.find_spec("libtpu") is not None


LIBTPU_MISSING = ("compiling for --topology {spec} needs libtpu, which is not installed. "
                  "Install the optional extra: pip install 'matrixmagic[tpu]' (or 'jax[tpu]' matching your jax). "
                  "Without it: --topology cpu-8 compiles for a fake 8-device CPU mesh (run with "
                  "XLA_FLAGS=--xla_force_host_platform_device_count=8), and --topology h100x64 gives an "
                  "analytic estimate.")


def _no_tpu_hardware() -> bool:
    return not any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")) and not os.environ.get("TPU_NAME")


def tpu_devices(target: Target) -> list:
    """Compile-only devices of a TPU topology, via libtpu (no TPU needed)."""
    if not libtpu_available():
        raise ConfigError(LIBTPU_MISSING.format(spec=target.spec))
    if _no_tpu_hardware():
        # libtpu's lockfile guards real chips against two processes; with no chips
        # there is nothing to guard, and parallel compiles (pytest -n) must not collide.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    assert target.chip is not None  # a TPU target always names its chip
    kwargs = dict(target.chip.topology_kwargs, **({"num_slices": target.slices} if target.slices > 1 else {}))
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **kwargs)
    except Exception as err:  # libtpu raises JaxRuntimeError with its own reason
        raise ConfigError(f"--topology {target.spec}: libtpu rejected topology {target.topology!r} "
                          f"({str(err).splitlines()[0]}); try a power-of-two slice such as v5p-128.") from err
    return list(topo.devices)


def cpu_devices(target: Target) -> list:
    import jax

    devices = jax.devices("cpu")
    if len(devices) < target.chips:
        raise ConfigError(f"--topology {target.spec} needs {target.chips} CPU devices but this process has "
                          f"{len(devices)}: run with XLA_FLAGS=--xla_force_host_platform_device_count="
                          f"{target.chips} (set before JAX starts), or use --topology cpu-{len(devices)}.")
    return devices[:target.chips]


def target_devices(target: Target) -> list:
    """Devices to build the mesh over; GPU targets have none (estimate only)."""
    if target.kind == "tpu":
        return tpu_devices(target)
    if target.kind == "cpu":
        return cpu_devices(target)
    raise ConfigError(f"--topology {target.spec}: GPU clusters cannot be compiled for here; "
                      f"magic compile prints an analytic estimate for them instead.")
