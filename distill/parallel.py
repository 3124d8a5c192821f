"""The device mesh of a run and the placement of batches and model states on it.

Axes `data`, `fsdp`, `tensor`, `expert` (sizes from the `mesh:` section, -1 fills the rest).
Parameters carry logical axis names; `distill.model.sharding.DEFAULT_RULES` maps them to mesh axes (MaxText's
`logical_axis_rules` in spirit): the batch over data x fsdp x expert, `embed` over fsdp (ZeRO-3
style: weights gathered where they are used), heads / mlp / vocab over tensor (Megatron style),
`experts` over expert (expert parallelism, see `distill.model.expert_parallel`). Each model may
override rules (`teacher.sharding`, `students[i].sharding`), e.g. a small student kept whole on
every device ("replicated": pure data parallelism). Optimizer states follow their parameters.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill.config import MeshConfig
from distill.errors import ConfigError
from distill.job import checkpoints_meet_outside_collectives
from distill.model.layout import param_path
from distill.model.sharding import AXES, Rules, logical_to_spec, mesh_axes_of


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
    """The mesh over `devices` (default: all devices of all processes, process by process)."""
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(np.asarray(devices).reshape(mesh_shape(cfg, len(devices))), AXES)


def single_device_mesh(device=None) -> Mesh:
    """A 1x1x1x1 mesh: the whole model on one device (evaluation, tests, notebooks)."""
    return Mesh(np.asarray([device or jax.devices()[0]]).reshape(1, 1, 1, 1), AXES)


def param_shardings(params, rules: Rules, mesh: Mesh, role: str):
    """NamedShardings for an `nnx.State` of parameters, from their logical names and `rules`.

    Raises ConfigError naming the parameter, the axis and the sizes when a dimension does not
    split evenly over its mesh axes.
    """
    specs = nnx.get_partition_spec(params)

    def place(path, logical, value):
        logical = tuple(logical) if logical is not None else (None,) * value.ndim
        spec = logical_to_spec(logical, rules, mesh)
        for dim, (name, axes) in enumerate(zip(logical, spec)):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            split = math.prod(mesh.shape[a] for a in axes)
            if value.shape[dim] % split:
                shown = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
                raise ConfigError(
                    f"{role}: parameter {param_path(path)} {tuple(value.shape)}: its {name} dimension "
                    f"({value.shape[dim]}) does not split over mesh {shown}; choose mesh sizes that divide "
                    f"{value.shape[dim]}, or map {name} to null in {role}.sharding")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(place, specs, params,
                                            is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def opt_state_shardings(tx: optax.GradientTransformation, opt_state, params_sharding, mesh: Mesh):
    """Optimizer state placed like its parameters (Adam's moments); counters replicated."""
    return optax.tree_map_params(tx, lambda _, sharding: sharding, opt_state, params_sharding,
                                 transform_non_params=lambda _: replicated(mesh),
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
    return mesh_axes_of("batch", rules, mesh)


def batch_sharding(mesh: Mesh, rules: Rules, *, micro_batched: bool = False) -> NamedSharding:
    """Rows over the `batch` rule's axes, the sequence whole (`[accum, rows, seq]` when micro-batched)."""
    rows = batch_axes(mesh, rules) or None
    return NamedSharding(mesh, PartitionSpec(None, rows) if micro_batched else PartitionSpec(rows))


def check_batch_divides(batch_rows: int, grad_accum: int, mesh: Mesh, rules: Rules) -> None:
    axes = batch_axes(mesh, rules)
    shards = math.prod(mesh.shape[a] for a in axes)
    if (batch_rows // grad_accum) % shards:
        shown = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
        raise ConfigError(f"data.batch_size={batch_rows}: each of the {grad_accum} micro-batches must split "
                          f"evenly over the batch axes {shown} = {shards} devices")


def bytes_per_device(tree) -> dict:
    """Bytes each device holds of a tree of sharded arrays or ShapeDtypeStructs with shardings."""
    totals: dict = {}
    for leaf in jax.tree.leaves(tree):
        sharding = leaf.sharding
        shard = sharding.shard_shape(leaf.shape)
        nbytes = math.prod(shard) * np.dtype(leaf.dtype).itemsize
        for device in sharding.device_set:
            totals[device] = totals.get(device, 0) + nbytes
    return totals


def state_memory(state, student_names: list[str]) -> dict[str, dict]:
    """Per model (teacher, EMA/stale target, each student): the largest per-device bytes of its
    parameters and optimizer state, and that total as a fraction of the unsharded total."""
    models = {"teacher": (state.teacher.params, state.teacher.opt_state)}
    if state.target is not None:
        models["teacher target"] = (state.target, None)
    models.update({name: (s.params, s.opt_state) for name, s in zip(student_names, state.students)})
    rows = {}
    for name, (params, opt_state) in models.items():
        per_param, per_opt = bytes_per_device(params), bytes_per_device(opt_state) if opt_state is not None else {}
        whole = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves((params, opt_state)))
        totals = {d: per_param.get(d, 0) + per_opt.get(d, 0) for d in per_param}
        device = max(totals, key=totals.get)
        rows[name] = {"params": per_param[device], "optimizer": per_opt.get(device, 0),
                      "fraction": totals[device] / whole}
    return rows


_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(?:-start)?\(")


def collectives(hlo_text: str) -> Counter:
    """(collective, result shape) -> count, from compiled HLO text (layouts dropped)."""
    found = Counter()
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if match:
            found[(match.group(2), re.sub(r"\{[^}]*\}", "", match.group(1)))] += 1
    return found


def all_expert_gathers(found: Counter, models, fsdp: int, tensor: int) -> list[str]:
    """All-gathers whose result holds every routed expert's weights (leading dimension E, then d
    and f whole or split by fsdp / tensor): what expert parallelism must never do."""
    whole = set()
    for m in models:
        e, d, f = m.num_local_experts, m.hidden_size, m.intermediate_size
        for a in {d, d // fsdp}:
            for b in {f, f // tensor}:
                whole |= {f"{e},{a},{b}", f"{e},{b},{a}"}
    return [shape for (op, shape), _ in found.items()
            if op == "all-gather" and set(re.findall(r"\[([0-9,]*)\]", shape)) & whole]


_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES")


def wants_distributed(mode: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether to call `jax.distributed.initialize()`: "on", "off", or "auto" (JAX's coordinator
    variables, a SLURM job of several tasks, or an Open MPI job of several ranks)."""
    if mode != "auto":
        return mode == "on"
    if any(environ.get(name) for name in _DISTRIBUTED_ENV):
        return True
    return int(environ.get("SLURM_NTASKS", "1")) > 1 or int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize_distributed(mode: str, environ: Mapping[str, str] = os.environ) -> None:
    """Join the multi-host job with JAX's own runtime: the coordinator, process count and index from
    `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` when they are set (jax
    0.10 does not read the last two itself), else JAX's cluster detection (SLURM, Open MPI, ...).
    Processes on CPUs exchange over gloo; orbax's barriers go through JAX's coordination service."""
    if not wants_distributed(mode, environ) or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU devices' collectives (others ignore it)
    given = {"coordinator_address": environ.get("JAX_COORDINATOR_ADDRESS") or None,
             "num_processes": int(environ["JAX_NUM_PROCESSES"]) if environ.get("JAX_NUM_PROCESSES") else None,
             "process_id": int(environ["JAX_PROCESS_ID"]) if environ.get("JAX_PROCESS_ID") else None}
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
    checkpoints_meet_outside_collectives()


_LOST_PEER = ("connection reset by peer", "connection closed by peer", "heartbeat timeout", "broken pipe",
              "tasks are unhealthy", "socket closed", "gloo", "coordination service")


def lost_process(error: BaseException, process_count: int | None = None) -> str | None:
    """When `error` (or what caused it) says another process of this multi-process job is gone (a
    collective's peer closed its connection, the coordinator missed its heartbeats): the reason, in
    one line; else None. A job of one process never loses a peer."""
    if (process_count if process_count is not None else jax.process_count()) < 2:
        return None
    while error is not None:
        text = str(error)
        if any(marker in text.lower() for marker in _LOST_PEER):
            return " ".join(text.split())[:300]
        error = error.__cause__ or error.__context__
    return None


def process_row_block(sharding: NamedSharding, global_shape: tuple[int, ...], axis: int,
                      process_index: int, owner=lambda device: device.process_index) -> slice:
    """The contiguous block of `axis` that the devices of one process hold under `sharding`.

    Each process loads only these rows of the global batch (`data.train_iterator(shard_index,
    shard_count)`); raises ConfigError when the mesh scatters a process's rows (reorder the mesh
    so that each process's devices are neighbours on the batch axes).
    """
    starts = sorted({index[axis].indices(global_shape[axis])[:2]
                     for device, index in sharding.devices_indices_map(global_shape).items()
                     if owner(device) == process_index})
    block = slice(starts[0][0], starts[-1][1])
    covered = sum(stop - start for start, stop in starts)
    if covered != block.stop - block.start:
        raise ConfigError(f"mesh: process {process_index}'s devices hold rows {starts} of the batch, not one "
                          "contiguous block; put each host's devices on neighbouring batch positions")
    return block


def global_batch(local: dict, sharding: NamedSharding, global_shape: tuple[int, ...]) -> dict:
    """Global arrays from this process's block of rows (one process: a plain device_put);
    `global_shape` gives the leading dimensions, an array's trailing ones (e.g. a cached teacher's
    top-k) are whole on every process."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v, (*global_shape, *v.shape[len(global_shape):]))
            for k, v in local.items()}
