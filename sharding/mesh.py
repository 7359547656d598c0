"""Device meshes from config axis sizes (data, fsdp, tensor), -1 auto-filled."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from configs.model_config import ConfigError

AXES = ("data", "fsdp", "tensor")


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
                          f"make the product of data x fsdp x tensor equal {device_count} (or use -1 for one axis).")
    return sizes


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = resolve_axis_sizes({a: getattr(mesh_config, a) for a in AXES}, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))
