"""The device mesh of a run and the placement of batches and states on it.

Axes `data`, `fsdp`, `tensor`, `expert` (sizes from the `mesh:` section, -1 fills the rest). The
batch's rows are split over `data` x `fsdp`. Parameters and optimizer states are replicated for
now: the logical-axis rules that shard them over `fsdp`, `tensor` and `expert` are the sharding
issue's work; the names they will map are already on every parameter.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill.config import MeshConfig
from distill.model.config import ConfigError

AXES = ("data", "fsdp", "tensor", "expert")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    sizes = [getattr(cfg, axis) for axis in AXES]
    fill = [axis for axis, size in zip(AXES, sizes) if size == -1]
    bad = [(axis, size) for axis, size in zip(AXES, sizes) if size == 0 or size < -1]
    if bad:
        raise ConfigError(f"mesh.{bad[0][0]}={bad[0][1]}: axis sizes are positive integers, or -1 to fill")
    if len(fill) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {', '.join(fill)}")
    fixed = math.prod(size for size in sizes if size != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(f"mesh: the fixed axes multiply to {fixed}, which does not divide the "
                              f"{num_devices} devices")
        sizes[AXES.index(fill[0])] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        shown = " x ".join(f"{axis}={size}" for axis, size in zip(AXES, sizes))
        raise ConfigError(f"mesh: {shown} = {math.prod(sizes)} devices, but {num_devices} are available; "
                          "make the product equal the device count (or use -1 on one axis)")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def batch_sharding(mesh: Mesh, *, micro_batched: bool = False) -> NamedSharding:
    """Rows over data x fsdp, the sequence axis whole (`[accum, rows, seq]` when micro-batched)."""
    rows = PartitionSpec(("data", "fsdp"))
    return NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")) if micro_batched else rows)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divides(batch_rows: int, grad_accum: int, mesh: Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (batch_rows // grad_accum) % shards:
        raise ConfigError(f"data.batch_size={batch_rows}: each of the {grad_accum} micro-batches must split "
                          f"evenly over data x fsdp = {shards} devices")
