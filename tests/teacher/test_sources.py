"""A teacher from another run (`teacher.source: run`): its parameters are read from that run's
checkpoint straight into the teacher's shardings and dtype, nothing else of the checkpoint is
read, and a teacher.model that does not fit the checkpoint is refused before anything is read.
A teacher from a HF directory (`hf`) is converted, placed, and the students start as with any."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distill
import teacher.sources
from distill.errors import ConfigError
from distill.hf import to_hf
from distill.runs import checkpoint_tree, model_with_params
from distill.setup import initial_state

SHARDED = Path(__file__).parents[1] / "configs" / "sharded.yaml"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A teacher trained alone for 2 steps on one device."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    distill.run(distill.load_config(SHARDED, [f"run.dir={run_dir}", "train.steps=2", "teacher.warmup_steps=2",
                                              "train.eval_every=2"], students=[]))
    return run_dir


def from_run(source: Path, *overrides: str):
    return distill.load_config(SHARDED, ["teacher.source=run", f"teacher.path={source}", "teacher.model={}",
                                         "teacher.warmup_steps=0", *overrides])


def saved_teacher(source: Path) -> list[np.ndarray]:
    """The source's teacher parameters read the old way (the whole checkpoint, on the host), in the
    leaf order of an nnx.State (numeric keys in numeric order)."""
    cfg = distill.load_config(source / "config.yaml")
    model = model_with_params(distill.resolve(cfg).teacher.model, checkpoint_tree(source)[1]["teacher"]["params"],
                              "source")
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


WORKER = """
import json, sys
import jax, numpy as np
import dataclasses
import distill, teacher.sources
from distill.setup import initial_state, placement
source, saved = sys.argv[1], sys.argv[2]
overrides = ["teacher.source=run", f"teacher.path={source}", "teacher.model={}", "teacher.warmup_steps=0",
             "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"]
cfg = distill.load_config(sys.argv[3], overrides)
def no_host_teacher(*args, **kwargs):
    raise AssertionError("the teacher was loaded on the host")
run_source = teacher.sources.SOURCES["run"]
teacher.sources.SOURCES["run"] = dataclasses.replace(run_source, host_model=no_host_teacher)
state = initial_state(cfg)
teacher.sources.SOURCES["run"] = run_source
shardings = placement(distill.resolve(cfg)).state_sharding
params, expected = jax.tree.leaves(state.teacher.params), jax.tree.leaves(shardings.teacher.params)
saved = np.load(saved)
same = [bool(np.array_equal(np.asarray(p), saved[f"a{i}"])) for i, p in enumerate(params)]
placed = [p.sharding.is_equivalent_to(s, p.ndim) for p, s in zip(params, expected, strict=True)]
split = sum(len(p.addressable_shards) > 1 and p.addressable_shards[0].data.shape != p.shape for p in params)
scratch = initial_state(distill.load_config(sys.argv[3], ["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"]))
students = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(state.students), jax.tree.leaves(scratch.students), strict=True))
print(json.dumps({"same": all(same), "placed": all(placed), "split": split, "leaves": len(params),
                  "students": students, "devices": len(jax.devices())}))
"""


def test_a_run_teacher_is_read_into_its_shardings_on_a_mesh(source, tmp_path):
    """8 simulated devices, data x fsdp x expert: the teacher's arrays hold the saved values, each
    in the sharding the rules give it (split ones included), without a host copy of the teacher;
    the students start as they would with any teacher."""
    saved = tmp_path / "saved.npz"
    np.savez(saved, **{f"a{i}": a for i, a in enumerate(saved_teacher(source))})
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", WORKER, str(source), str(saved), str(SHARDED)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["devices"] == 8 and report["same"] and report["placed"] and report["students"], report
    assert report["split"] >= report["leaves"] // 2, report  # most of the teacher is split over devices


def test_the_teacher_is_read_in_this_runs_parameter_dtype(source, monkeypatch):
    """`teacher.model.param_dtype: bfloat16` over a float32 checkpoint: the saved values, rounded."""
    monkeypatch.setitem(teacher.sources.SOURCES, "run", dataclasses.replace(
        teacher.sources.SOURCES["run"], host_model=lambda *a, **k: pytest.fail("a host teacher was loaded")))
    state = initial_state(from_run(source, "teacher.model={param_dtype: bfloat16}"))
    params = jax.tree.leaves(state.teacher.params)
    assert {p.dtype for p in params} == {jnp.dtype(jnp.bfloat16)}
    for got, saved in zip(params, saved_teacher(source), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(saved).astype(jnp.bfloat16)))


def test_a_student_copying_the_teacher_reads_it_on_the_host(source):
    """`init: teacher` needs the teacher as a model: the host path, with the same values."""
    teacher_shape = ("{vocab_size: 256, hidden_size: 32, intermediate_size: 32, intermediate_size_mlp: 64, "
                     "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, num_local_experts: 4, "
                     "interleave_moe_layer_step: 2, no_rope_layer_interval: 2, attention_chunk_size: 8, floor_scale: 8}")
    state = initial_state(from_run(source, "students.0.init=teacher", f"students.0.model={teacher_shape}"))
    for got, saved in zip(jax.tree.leaves(state.teacher.params), saved_teacher(source), strict=True):
        np.testing.assert_array_equal(np.asarray(got), saved)


def test_a_hf_teacher_is_converted_placed_and_the_students_start_as_with_any_teacher(source, tmp_path):
    """`teacher.source: hf` on the source's teacher exported to a transformers directory: the same
    values (the conversion is exact in float32), and the students of a scratch run's first state."""
    source_teacher = distill.resolve(distill.load_config(source / "config.yaml")).teacher.model
    hf_dir = to_hf(teacher.sources.teacher_from_run(source, source_teacher), tmp_path / "hf")
    state = initial_state(distill.load_config(SHARDED, ["teacher.source=hf", f"teacher.path={hf_dir}",
                                                                       "teacher.model={}", "teacher.warmup_steps=0"]))
    for got, saved in zip(jax.tree.leaves(state.teacher.params), saved_teacher(source), strict=True):
        np.testing.assert_array_equal(np.asarray(got), saved)
    scratch = initial_state(distill.load_config(SHARDED))
    for got, fresh in zip(jax.tree.leaves(state.students), jax.tree.leaves(scratch.students), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(fresh))


def test_a_teacher_checkpoint_changed_on_disk_is_refused_by_its_checksums(source, tmp_path):
    """8 bytes overwritten in the middle of each array data file of the source's checkpoint (sizes
    kept): reading the teacher recomputes the checksums and refuses it with one line."""
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    for path in (copy / "checkpoints" / "2" / "state" / "ocdbt.process_0" / "d").iterdir():
        data = bytearray(path.read_bytes())
        data[len(data) // 2:len(data) // 2 + 8] = bytes(b ^ 0x5A for b in data[len(data) // 2:len(data) // 2 + 8])
        path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=rf"teacher.path='{copy}': its checkpoint at step 2 is corrupted \(.*teacher"
                                          r"\.params\..*rerun that run's `distill run` command"):
        initial_state(from_run(copy))


@pytest.mark.parametrize("override, message", [
    ("teacher.model={hidden_size: 64}", r"other shapes: embed \(256, 64\) \(saved \(256, 32\)\)"),
    ("teacher.model={num_hidden_layers: 3}", r"it has no tail\.layers\.0\."),
])
def test_a_teacher_model_that_does_not_fit_the_checkpoint_is_refused(source, tmp_path, override, message):
    """From the checkpoint's metadata, before the run directory is made (a corrected config must
    not then meet a config.yaml of the refused one)."""
    cfg = from_run(source, override, f"run.dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=rf"teacher.path='{source}': its checkpoint's teacher does not match "
                                          rf"teacher.model: .*{message}"):
        distill.run(cfg)
    assert not (tmp_path / "run").exists()
