"""Where a teacher comes from: one registry entry per `teacher.source`.

Each source says which architecture the teacher has (`model_fields`: the ModelConfig fields it
fixes, before `teacher.model`'s overrides), how to build the model with its weights on the host
(`host_model`), and how to place its weights straight into their shardings (`placed_params`:
None means the teacher is initialised inside the jitted function that builds the first state).
A source with `runs=False` (the offline logit cache) has no model at all: its top-k entries come
with the batches.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
from flax import nnx

from distill import checkpoint, rundir
from distill.config import TeacherConfig
from distill.configtools import from_dict
from distill.errors import ConfigError
from distill.hf import config_from_hf, from_hf
from distill.model import ModelConfig, Transformer, build_model
from distill.model.presets import lookup
from teacher.cache import read_meta
from teacher.presets import TEACHER_PRESETS

PARAMS = ("teacher", "params")
"""Where a run's checkpoint keeps the teacher's parameters."""
HF_RUNTIME_FIELDS = ("dtype", "param_dtype", "dispatch", "scan_layers", "remat", "capacity_factor", "dispatch_tile")
"""`teacher.model` fields a converted HF teacher takes from the run config (the rest are the checkpoint's)."""


@dataclass(frozen=True)
class TeacherSource:
    model_fields: Callable[[TeacherConfig], dict]
    host_model: Callable[[TeacherConfig, ModelConfig, int], Transformer] | None  # None: no model (cache)
    placed_params: Callable[[TeacherConfig, ModelConfig, int, object], nnx.State] | None = None

    @property
    def runs(self) -> bool:
        """Whether the teacher runs a forward pass (a cache does not)."""
        return self.host_model is not None


def teacher_model_config(teacher: TeacherConfig) -> ModelConfig:
    """The teacher's `ModelConfig`: what its source fixes, with `teacher.model` (e.g. `dtype:
    bfloat16` for a frozen teacher) applied last."""
    base = SOURCES[teacher.source].model_fields(teacher)
    return from_dict(ModelConfig, {**base, **teacher.model}, "teacher.model")


# ----------------------------------------------------------------------------- scratch

def _preset_fields(teacher: TeacherConfig) -> dict:
    return lookup(TEACHER_PRESETS, teacher.preset, "teacher", {}).to_dict() if teacher.preset else {}


def _fresh(teacher: TeacherConfig, cfg: ModelConfig, seed: int) -> Transformer:
    return build_model(cfg, seed=seed)


# ----------------------------------------------------------------------------- another run

def _run_fields(teacher: TeacherConfig) -> dict:
    where = f"teacher.path={teacher.path!r}"
    raw = rundir.read_config_tree(teacher.path, where)
    if "teacher" not in raw:
        raise ConfigError(f"{where}: its {rundir.CONFIG_FILE} has no teacher section")
    return teacher_model_config(from_dict(TeacherConfig, raw["teacher"], f"{teacher.path}: teacher")).to_dict()


def restore_teacher_params(run_dir: str | Path, target, step: int | None = None) -> nnx.State:
    """The teacher parameters of a run's latest (or given) checkpoint as an `nnx.State` shaped like
    `target`, whose leaves are `jax.ShapeDtypeStruct`s with a sharding: each array is read straight
    into its shards on their devices, in the target's dtype. Nothing else of the checkpoint (the
    students, the optimizer moments) is read, and no process holds a whole model it does not need."""
    where = f"teacher.path={str(run_dir)!r}"
    directory = rundir.checkpoints_dir(run_dir)
    with checkpoint.read_only(directory, step, where) as (manager, step):
        _check_teacher_shapes(directory, step, target, where)
        try:
            restored = checkpoint.restore_subtree(manager, step, PARAMS, nnx.to_pure_dict(target), where)
        except (KeyError, ValueError) as error:
            raise ConfigError(f"{where}: its checkpoint's teacher does not match teacher.model ({error})") from None
    params = jax.tree.map(lambda leaf: leaf, target)
    nnx.replace_by_pure_dict(params, restored)
    return params


def check_teacher_checkpoint(run_dir: str | Path, target) -> None:
    """ConfigError unless a run's latest checkpoint holds a teacher of `target`'s shapes, from its
    metadata alone (what `restore_teacher_params` checks before reading)."""
    where = f"teacher.path={str(run_dir)!r}"
    directory = rundir.checkpoints_dir(run_dir)
    with checkpoint.read_only(directory, None, where) as (_, step):
        _check_teacher_shapes(directory, step, target, where)


def _check_teacher_shapes(directory: Path, step: int, target, where: str) -> None:
    """ConfigError naming the first arrays of `target` the checkpoint lacks or holds in another
    shape (a damaged checkpoint, whose metadata does not read, is left to the restore)."""
    try:
        saved = checkpoint.saved_shapes(directory, step, PARAMS)
    except (KeyError, TypeError):  # no teacher there: the restore reports it
        return
    if saved is None:
        return
    needed = checkpoint.shapes_by_path(nnx.to_pure_dict(target))
    missing = [path for path in needed if path not in saved]
    other = [f"{path} {needed[path]} (saved {saved[path]})" for path in needed
             if path in saved and needed[path] != saved[path]]
    if missing or other:
        first = lambda paths: ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")  # noqa: E731
        raise ConfigError(f"{where}: its checkpoint's teacher does not match teacher.model: "
                          + "; ".join(filter(None, [missing and f"it has no {first(missing)}",
                                                    other and f"other shapes: {first(other)}"]))
                          + ". Leave teacher.model's architecture to that run's config")


def teacher_from_run(run_dir: str | Path, cfg: ModelConfig) -> Transformer:
    """The teacher of another run on the default device (a run reads it into its shardings
    instead, unless a student copies it)."""
    graph, shapes = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)
    return nnx.merge(graph, restore_teacher_params(run_dir, target))


def _run_host_model(teacher: TeacherConfig, cfg: ModelConfig, seed: int) -> Transformer:
    return teacher_from_run(teacher.path, cfg)


def _run_placed(teacher: TeacherConfig, cfg: ModelConfig, seed: int, target) -> nnx.State:
    return restore_teacher_params(teacher.path, target)  # shard by shard into its place


# ----------------------------------------------------------------------------- a Hugging Face directory

def _hf_fields(teacher: TeacherConfig) -> dict:
    config_file = Path(teacher.path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"teacher.path={teacher.path!r}: no config.json; expected a Hugging Face save_pretrained "
                          "directory")
    return config_from_hf(json.loads(config_file.read_text())).to_dict()


def _hf_host_model(teacher: TeacherConfig, cfg: ModelConfig, seed: int) -> Transformer:
    return from_hf(teacher.path, **{k: v for k, v in cfg.to_dict().items() if k in HF_RUNTIME_FIELDS})


def _hf_placed(teacher: TeacherConfig, cfg: ModelConfig, seed: int, target) -> nnx.State:
    """Converted on the host, then placed."""
    shardings = jax.tree.map(lambda leaf: leaf.sharding, target)
    return jax.device_put(nnx.state(_hf_host_model(teacher, cfg, seed), nnx.Param), shardings)


# ----------------------------------------------------------------------------- an offline logit cache

def _cache_fields(teacher: TeacherConfig) -> dict:
    return read_meta(teacher.path)["teacher_model"]


SOURCES: dict[str, TeacherSource] = {
    "scratch": TeacherSource(_preset_fields, _fresh),
    "run": TeacherSource(_run_fields, _run_host_model, _run_placed),
    "hf": TeacherSource(_hf_fields, _hf_host_model, _hf_placed),
    "cache": TeacherSource(_cache_fields, None),
}
"""`teacher.source` -> where the teacher's architecture and weights come from."""


def load_teacher(teacher: TeacherConfig, cfg: ModelConfig, seed: int) -> Transformer:
    """The teacher model with its weights on the host: fresh (seeded), from a run, or from a HF directory."""
    source = SOURCES[teacher.source]
    if not source.runs:
        raise ConfigError(f"teacher.source={teacher.source!r}: holds no model to load")
    return source.host_model(teacher, cfg, seed)
