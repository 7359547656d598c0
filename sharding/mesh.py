"""Device meshes from config axis sizes (data, stage, fsdp, context, tensor), -1 auto-filled.

Axis order is outermost = least communication. `tensor` all-reduces activations
twice per layer, so it goes innermost (fastest links, one host); `context` passes
K/V blocks every layer; `fsdp` gathers weights every layer; `stage` sends one
activation per microbatch to its neighbour; `data` only all-reduces gradients
once per step, so on a multi-slice
TPU pod it is the one axis that crosses the slow data-centre network (DCN):
`mesh.dcn_data` = how many slices split the data axis.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from matrixmagic.configs.model_config import ConfigError
from matrixmagic.configs.train_config import MESH_AXES as AXES


def resolve_axis_sizes(sizes: dict[str, int], device_count: int) -> dict[str, int]:
    """Fill the one -1 axis so the product equals the device count."""
    unknown = [a for a, s in sizes.items() if s == -1]
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}={size} is invalid: use a positive size or -1 (fill).")
    if len(unknown) > 1:
        raise ConfigError(f"mesh axes {', '.join(unknown)} are all -1: at most one axis can be filled automatically.")
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        if device_count % known:
            raise ConfigError(f"mesh {sizes} cannot fill {unknown[0]}: {device_count} devices are not divisible "
                              f"by {known}; choose sizes whose product divides {device_count}.")
        sizes = {**sizes, unknown[0]: device_count // known}
    if math.prod(sizes.values()) != device_count:
        raise ConfigError(f"mesh {sizes} has {math.prod(sizes.values())} devices but {device_count} are available; "
                          f"make the product of the axis sizes equal {device_count} (or use -1 for one axis).")
    return sizes


def axis_sizes(mesh_config, device_count: int) -> dict[str, int]:
    return resolve_axis_sizes({a: getattr(mesh_config, a) for a in AXES}, device_count)


def granules(devices) -> tuple[str, int]:
    """(attribute, count) of the units the slow network joins: TPU slices when the
    devices span several, else processes (hosts), the GPU-cluster analogue."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) > 1:
        return "slice_index", len(slices)
    return "process_index", len({getattr(d, "process_index", 0) for d in devices})


def check_dcn_divides(sizes: dict[str, int], dcn_data: int) -> None:
    """dcn_data must be a positive divisor of the data axis (needs no devices: config checks)."""
    if dcn_data < 1:
        raise ConfigError(f"mesh.dcn_data={dcn_data} is invalid: use the number of slices (1 on one slice).")
    if sizes["data"] % dcn_data:
        raise ConfigError(f"mesh.data={sizes['data']} is not divisible by mesh.dcn_data={dcn_data}: each slice "
                          f"holds data/dcn_data replicas; make mesh.data a multiple of {dcn_data}.")


def check_dcn(sizes: dict[str, int], dcn_data: int, devices) -> None:
    """dcn_data must divide data and match the slices present; fail with the fix."""
    check_dcn_divides(sizes, dcn_data)
    attr, count = granules(devices)
    if attr == "slice_index" and dcn_data != count:
        raise ConfigError(f"mesh.dcn_data={dcn_data} but the devices span {count} slices: set mesh.dcn_data={count} "
                          f"so only the data axis crosses the data-centre network.")
    if dcn_data > 1 and dcn_data != count:
        raise ConfigError(f"mesh.dcn_data={dcn_data} needs {dcn_data} slices (or hosts) but the devices form "
                          f"{count}; use mesh.dcn_data=1 on a single slice.")


def device_array(sizes: dict[str, int], dcn_data: int, devices) -> np.ndarray:
    """Devices arranged as [data, fsdp, tensor]: topology-aware where JAX knows the
    interconnect (TPU torus, multi-slice), a plain reshape elsewhere (CPU)."""
    from jax.experimental import mesh_utils

    shape = tuple(sizes[a] for a in AXES)
    check_dcn(sizes, dcn_data, devices)
    if dcn_data > 1:
        ici = tuple(sizes[a] // dcn_data if a == "data" else sizes[a] for a in AXES)
        dcn = tuple(dcn_data if a == "data" else 1 for a in AXES)
        attr, _ = granules(devices)
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                    process_is_granule=attr == "process_index")
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):  # e.g. a TPU subset that is no sub-torus
        return np.asarray(devices).reshape(shape)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A GSPMD-style (AxisType.Auto) mesh: XLA propagates shardings from the
    params, inputs and the model's logical constraints."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = axis_sizes(mesh_config, len(devices))
    array = device_array(sizes, mesh_config.dcn_data, devices)
    return Mesh(array, AXES, axis_types=(AxisType.Auto,) * len(AXES))
