"""Reading finished (or running) run directories: their config and the models of a checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from distill.config import Config, MeshConfig, build_config
from distill.model import ConfigError, Transformer, build_model


def run_config(run_dir: str | Path) -> Config:
    config_file = Path(run_dir) / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    return build_config(yaml.safe_load(config_file.read_text()))


def checkpoint_tree(run_dir: str | Path, step: int | None = None) -> tuple[int, dict]:
    """(step, the saved state as nested dicts of numpy arrays) of the latest (or given) checkpoint."""
    directory = (Path(run_dir) / "checkpoints").absolute()
    if not directory.is_dir():
        raise ConfigError(f"{run_dir}: the run has no checkpoints/ directory")
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{run_dir}: the run has no checkpoint yet")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored.state


def restore_state(run_dir: str | Path, *, mesh: MeshConfig | None = None, step: int | None = None):
    """A run's checkpoint restored straight into its shardings on `mesh` (default: the run's own
    mesh section over this process's devices), which need not be the mesh that saved it.

    Returns (config, step plan, TrainState, step); each array lands on its devices as the
    model's rules say, without passing through one device.
    """
    import jax

    from distill.parallel import make_mesh
    from distill.trainer import _build_models, _plan, abstract_state, state_shardings

    cfg = run_config(run_dir)
    if mesh is not None:
        cfg = dataclasses.replace(cfg, mesh=mesh)
    models = _build_models(cfg, abstract=True)
    plan = _plan(cfg, models, make_mesh(cfg.mesh))
    shapes = abstract_state(plan, models)
    target = jax.tree.map(lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          shapes, state_shardings(plan, shapes))
    directory = (Path(run_dir) / "checkpoints").absolute()
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{run_dir}: the run has no checkpoint yet")
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    return cfg, plan, state, step


def _strip_value_keys(tree):
    """orbax restores nnx.State leaves as {'value': array}; pure dicts hold the arrays themselves
    (as JAX arrays: a model holding numpy arrays cannot be called outside jit)."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return jnp.asarray(tree["value"])
        return {k: _strip_value_keys(v) for k, v in tree.items()}
    return tree


def model_with_params(cfg, params_tree: dict, where: str) -> Transformer:
    """A model of config `cfg` holding the checkpointed parameters `params_tree`."""
    model = build_model(cfg)
    state = nnx.state(model, nnx.Param)
    try:
        nnx.replace_by_pure_dict(state, _strip_value_keys(params_tree))
    except (KeyError, ValueError) as error:
        raise ConfigError(f"{where}: the checkpoint does not match the model config ({error})") from None
    nnx.update(model, state)
    return model


def load_models(run_dir: str | Path, step: int | None = None) -> tuple[Config, int, Transformer, dict]:
    """(config, step, teacher, {student name: student}) from a run directory's checkpoint; the
    teacher is None in a run that distilled from a cache (teacher.source=cache)."""
    cfg = run_config(run_dir)
    step, tree = checkpoint_tree(run_dir, step)
    teacher = None if cfg.teacher.source == "cache" else model_with_params(
        cfg.teacher_model(), tree["teacher"]["params"], f"{run_dir} teacher")
    students = {s.name: model_with_params(cfg.student_model(i), tree["students"][str(i)]["params"]
                                          if isinstance(tree["students"], dict) else tree["students"][i]["params"],
                                          f"{run_dir} student {s.name}")
                for i, s in enumerate(cfg.students)}
    return cfg, step, teacher, students


def evaluate_run(run_dir: str | Path, *, max_batches: int | None = None, step: int | None = None) -> dict:
    """Validation metrics (bpb, top-1 agreement, KL) of a run's checkpoint on its validation split."""
    import jax

    from distill.data import build_data
    from distill.parallel import single_device_mesh
    from distill.step import ModelState, TrainState, eval_metrics, eval_step
    from distill.trainer import Models, _plan
    from teacher.cache import TeacherCache

    cfg, step, teacher, students = load_models(run_dir, step)
    plan = _plan(cfg, Models(teacher, list(students.values())), single_device_mesh())
    teacher_params = {} if teacher is None else nnx.state(teacher, nnx.Param)
    state = TrainState(step=step, teacher=ModelState(teacher_params, None), target=None,
                       students=tuple(ModelState(nnx.state(m, nnx.Param), None) for m in students.values()),
                       skipped=None, last_skipped=None)
    data = build_data(cfg.data, seed=cfg.train.seed)
    cache = TeacherCache(cfg.teacher.path) if teacher is None else None
    evaluate = jax.jit(lambda s, b: eval_step(plan, s, b))
    sums: dict[str, float] = {}
    for i, batch in enumerate(data.validation_batches(max_batches)):
        if cache:
            batch = {**batch, **cache.entries("eval", i, batch["tokens"])}
        for key, value in jax.device_get(evaluate(state, batch)).items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return {"step": step, **eval_metrics(sums)}
