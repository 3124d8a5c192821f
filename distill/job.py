"""The processes of one multi-process JAX job meeting outside the collectives: barriers and values
passed through JAX's coordination service (the `jax.distributed` client). A collective gives a
late peer 30 s (gloo's rendezvous) before the job fails; these wait as long as a straggler may
take (compiling, reading data, a loaded machine). In a job of one process they do nothing."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import orbax.checkpoint  # noqa: F401 (defines the absl flag below)
from absl import flags
from jax._src import distributed

WAIT_MS = 30 * 60 * 1000  # the longest a process waits for the others at one meeting point
_meetings = itertools.count()  # every process meets the others in the same order: ids agree


def checkpoints_meet_outside_collectives() -> None:
    """orbax's barriers (around every save, restore and manager) through the coordination service
    too, rather than an all-reduce over every device."""
    flags.FLAGS(["distill", "--experimental_orbax_use_distributed_barrier"], known_only=True)


def _key(name: str) -> str:
    return f"distill/{next(_meetings)}/{name}"


def wait_for_processes(name: str) -> None:
    """Return once every process of the job has reached this point."""
    if jax.process_count() > 1:
        distributed.global_state.client.wait_at_barrier(_key(name), WAIT_MS)


def from_process_0(name: str, value: str) -> str:
    """`value` as process 0 gives it, on every process (the others wait for it)."""
    if jax.process_count() == 1:
        return value
    key = _key(name)
    if jax.process_index() == 0:
        distributed.global_state.client.key_value_set(key, value)
        return value
    return distributed.global_state.client.blocking_key_value_get(key, WAIT_MS)


def compiled_together(jitted, name: str) -> Callable:
    """`jitted` (a `jax.jit` function) that, in a job of several processes, compiles at its first
    call, waits there for the other processes to have compiled theirs, then runs: the job's
    processes reach the program's first collective together. Later calls run the compiled program.
    In a job of one process: `jitted` itself."""
    if jax.process_count() == 1:
        return jitted
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = jitted.lower(*args).compile()
            wait_for_processes(name)
        return compiled(*args)

    return call
