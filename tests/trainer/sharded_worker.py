"""Runs jobs of the sharding tests on 8 simulated CPU devices (jax must not be loaded yet).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python sharded_worker.py JOBS_JSON

JOBS_JSON: a list of {"run_dir", "mesh": {axis: size}, "stop_after": int | null, "collectives":
bool}. Each job runs (or resumes) tests/configs/sharded.yaml on that mesh, then restores its latest
checkpoint onto the same mesh and reports, as one JSON line per job on stdout: every parameter's
addressable shard shapes, per device the bytes the shardings imply against the bytes the arrays
hold, and (when asked) the collectives of the compiled step.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import jax
import numpy as np

import distill
from distill.config import MeshConfig
from distill.parallel import all_expert_gathers, bytes_per_device, collectives
from distill.runs import restore_state
from distill.setup import compiled_step

CONFIG = Path(__file__).parents[1] / "configs" / "sharded.yaml"


def shard_shapes(tree) -> dict[str, list[list[int]]]:
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        shapes[name.replace("/value", "")] = sorted({tuple(s.data.shape) for s in leaf.addressable_shards})
    return shapes


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    for job in json.loads(sys.argv[1]):
        mesh = {axis: 1 for axis in ("data", "fsdp", "tensor", "expert")} | job["mesh"]
        overrides = [f"run.dir={job['run_dir']}"] + [f"mesh.{axis}={size}" for axis, size in mesh.items()]
        cfg = distill.load_config(CONFIG, overrides)
        distill.run(cfg, stop_after=job.get("stop_after"))
        found = collectives(compiled_step(cfg).as_text()) if job.get("collectives") else Counter()
        models = [model for _, model in distill.resolve(cfg).models()]
        _, _, state, step = restore_state(job["run_dir"], mesh=MeshConfig(**mesh))
        implied = bytes_per_device(state)  # from each array's sharding alone
        held = {}
        for leaf in jax.tree.leaves(state):
            for shard in leaf.addressable_shards:
                held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
        print(json.dumps({
            "run_dir": job["run_dir"], "step": step,
            "teacher": shard_shapes(state.teacher.params),
            "students": [shard_shapes(s.params) for s in state.students],
            "teacher_opt": shard_shapes(state.teacher.opt_state),
            "bytes_implied": sorted(int(v) for v in implied.values()),
            "bytes_held": sorted(int(v) for v in held.values()),
            "collectives": [[op, shape, count] for (op, shape), count in found.items()],
            "all_expert_gathers": all_expert_gathers(found, models, mesh["fsdp"], mesh["tensor"]),
            "total_bytes": int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))),
        }), flush=True)


if __name__ == "__main__":
    main()
