"""Multi-host pieces that one machine can test: when to join a job, and which rows each process
loads (8 simulated devices split into pretend processes, in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from distill.parallel import wants_distributed


@pytest.mark.parametrize("mode, environ, expected", [
    ("auto", {}, False),
    ("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ("auto", {"SLURM_NTASKS": "1"}, False),
    ("auto", {"SLURM_NTASKS": "4"}, True),
    ("auto", {"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ("on", {}, True),
    ("off", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False),
])
def test_when_a_run_joins_a_multi_host_job(mode, environ, expected):
    assert wants_distributed(mode, environ) is expected


CHECK = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from distill.config import MeshConfig
    from distill.errors import ConfigError
    from distill.parallel import batch_sharding, make_mesh, process_row_block
    from distill.model.sharding import DEFAULT_RULES

    def blocks(mesh_cfg, processes, shape=(2, 16, 8), axis=1):
        mesh = make_mesh(mesh_cfg)
        sharding = batch_sharding(mesh, DEFAULT_RULES, micro_batched=True)
        owner = lambda d: d.id * processes // 8  # devices 0-3 -> process 0, 4-7 -> 1 (for 2 processes)
        return [process_row_block(sharding, shape, axis, p, owner) for p in range(processes)]

    # Rows of each micro-batch split over data x fsdp x expert, devices process by process.
    assert blocks(MeshConfig(data=8), 2) == [slice(0, 8), slice(8, 16)]
    assert blocks(MeshConfig(data=2, fsdp=2, expert=2), 2) == [slice(0, 8), slice(8, 16)]
    assert blocks(MeshConfig(data=2, fsdp=2, expert=2), 4) == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)]
    # Tensor-parallel neighbours share rows: a process of 4 devices holds 2 row blocks of 4.
    assert blocks(MeshConfig(data=4, tensor=2), 2) == [slice(0, 8), slice(8, 16)]
    # A process whose devices are not batch neighbours is refused, with the fix named.
    mesh = make_mesh(MeshConfig(data=8))
    interleaved = lambda d: d.id % 2
    try:
        process_row_block(batch_sharding(mesh, DEFAULT_RULES), (16, 8), 0, 0, interleaved)
    except ConfigError as error:
        assert "contiguous" in str(error), error
    else:
        raise AssertionError("scattered rows were accepted")
    print("ok")
""")


def test_each_process_loads_one_contiguous_block_of_rows():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
