"""Logical axis names -> mesh axes, and the sharding context a model is traced under.

Every parameter carries logical axis names (`embed`, `mlp`, `experts`, ...); activations are
named with the same vocabulary (`batch`, `length`, `embed`, ...). A rules table maps each name to
a mesh axis, a tuple of mesh axes, or None (replicated). The trainer traces each model's forward
inside `use_sharding(ShardingContext(mesh, rules))`, so the model can place activation hints and
pick expert parallelism without holding a mesh itself; outside any context (a notebook, a test)
everything below is a no-op and the model runs on one device.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill.errors import ConfigError

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

AXES = ("data", "fsdp", "tensor", "expert")

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # activations' rows; outside MoE layers `expert` is data parallel
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "layers": None,
    "norm": None,
}
PARAMETER_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts", "layers", "norm")


def resolve_rules(base: Mapping, overrides: Mapping | str | None, where: str) -> dict:
    """`base` with `overrides` applied: a mapping of logical axis -> mesh axis / list / null, or
    "replicated" (every parameter whole on every device; the batch keeps its rule)."""
    rules = dict(base)
    if overrides is None:
        return rules
    if overrides == "replicated":
        return {**rules, **{name: None for name in PARAMETER_AXES}}
    if isinstance(overrides, str) or not isinstance(overrides, Mapping):
        raise ConfigError(f"{where}={overrides!r}: give a mapping of logical axis -> mesh axis "
                          f"(or list of axes, or null), or \"replicated\"")
    for logical, target in overrides.items():
        if logical not in DEFAULT_RULES:
            close = difflib.get_close_matches(str(logical), DEFAULT_RULES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}.{logical}: not a logical axis; known: {', '.join(DEFAULT_RULES)}{hint}")
        names = [] if target is None else [target] if isinstance(target, str) else list(target)
        for name in names:
            if name not in AXES:
                raise ConfigError(f"{where}.{logical}={target!r}: {name!r} is not a mesh axis; "
                                  f"use {', '.join(AXES)} or null")
        rules[logical] = None if not names else names[0] if len(names) == 1 else tuple(names)
    return rules


def mesh_axes_of(logical: str | None, rules: Rules, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) a logical axis maps to; () when replicated or unnamed."""
    if logical is None:
        return ()
    target = rules.get(logical)
    if target is None:
        return ()
    names = (target,) if isinstance(target, str) else tuple(target)
    return tuple(name for name in names if mesh.shape[name] > 1)


def logical_to_spec(logical_axes: tuple[str | None, ...], rules: Rules, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry `logical_axes`.

    A mesh axis already used by an earlier dimension is not used again (the later dimension stays
    whole), as in flax's logical partitioning.
    """
    used: set[str] = set()
    spec = []
    for logical in logical_axes:
        axes = tuple(a for a in mesh_axes_of(logical, rules, mesh) if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


@dataclass(frozen=True)
class ShardingContext:
    mesh: Mesh
    rules: Rules

    def axes(self, logical: str) -> tuple[str, ...]:
        return mesh_axes_of(logical, self.rules, self.mesh)

    def size(self, logical: str) -> int:
        """How many shards the logical axis is split into."""
        size = 1
        for axis in self.axes(logical):
            size *= self.mesh.shape[axis]
        return size

    def spec(self, *logical_axes: str | None) -> PartitionSpec:
        return logical_to_spec(tuple(logical_axes), self.rules, self.mesh)

    def sharding(self, *logical_axes: str | None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(*logical_axes))


_active = threading.local()


@contextlib.contextmanager
def use_sharding(context: ShardingContext | None):
    """Trace model code under `context` (None: no sharding hints)."""
    previous = getattr(_active, "context", None)
    _active.context = context
    try:
        yield context
    finally:
        _active.context = previous


def current() -> ShardingContext | None:
    return getattr(_active, "context", None)


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """`with_sharding_constraint` by logical names under the active context; identity without one."""
    context = current()
    if context is None or context.mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, context.sharding(*logical_axes))
