"""Reading finished (or running) run directories: their config and the models of a checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from distill.checkpoint import restore_target
from distill.config import Config, MeshConfig, build_config
from distill.errors import ConfigError
from distill.model import Transformer, build_model


def run_config(run_dir: str | Path) -> Config:
    config_file = Path(run_dir) / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    return build_config(yaml.safe_load(config_file.read_text()))


@contextlib.contextmanager
def _checkpoint_at(run_dir: str | Path, step: int | None, where: str):
    """(a read-only manager of the run's checkpoints, the latest step or `step`); a ConfigError
    that starts with `where` when the run has none."""
    directory = (Path(run_dir) / "checkpoints").absolute()
    if not directory.is_dir():
        raise ConfigError(f"{where}: the run has no checkpoints/ directory")
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{where}: the run has no checkpoint yet")
        yield manager, step


def checkpoint_tree(run_dir: str | Path, step: int | None = None) -> tuple[int, dict]:
    """(step, the saved state as nested dicts of numpy arrays) of the latest (or given) checkpoint."""
    with _checkpoint_at(run_dir, step, str(run_dir)) as (manager, step):
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored.state


def restore_state(run_dir: str | Path, *, mesh: MeshConfig | None = None, step: int | None = None):
    """A run's checkpoint restored straight into its shardings on `mesh` (default: the run's own
    mesh section over this process's devices), which need not be the mesh that saved it.

    Returns (config, step plan, TrainState, step); each array lands on its devices as the
    model's rules say, without passing through one device.
    """
    from distill.parallel import make_mesh
    from distill.trainer import _build_models, _plan, abstract_state, state_shardings

    cfg = run_config(run_dir)
    if mesh is not None:
        cfg = dataclasses.replace(cfg, mesh=mesh)
    models = _build_models(cfg, abstract=True)
    plan = _plan(cfg, models, make_mesh(cfg.mesh))
    shapes = abstract_state(plan, models)
    target = restore_target(shapes, state_shardings(plan, shapes))
    with _checkpoint_at(run_dir, step, str(run_dir)) as (manager, step):
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    return cfg, plan, state, step


def restore_teacher_params(run_dir: str | Path, target, step: int | None = None):
    """The teacher parameters of a run's latest (or given) checkpoint as an `nnx.State` shaped like
    `target`, whose leaves are `jax.ShapeDtypeStruct`s with a sharding: each array is read straight
    into its shards on their devices, in the target's dtype. Nothing else of the checkpoint (the
    students, the optimizer moments) is read, and no process holds a whole model it does not need."""
    where = f"teacher.path={str(run_dir)!r}"
    item = {"teacher": {"params": jax.tree.map(lambda leaf: {"value": leaf}, nnx.to_pure_dict(target))}}
    with _checkpoint_at(run_dir, step, where) as (manager, step):
        _check_teacher_shapes(run_dir, step, target, where)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
        except (KeyError, ValueError) as error:
            raise ConfigError(f"{where}: its checkpoint's teacher does not match teacher.model ({error})") from None
    params = jax.tree.map(lambda leaf: leaf, target)
    nnx.replace_by_pure_dict(params, _strip_value_keys(restored.state["teacher"]["params"]))
    return params


def check_teacher_checkpoint(run_dir: str | Path, target) -> None:
    """ConfigError unless a run's latest checkpoint holds a teacher of `target`'s shapes, from its
    metadata alone (what `restore_teacher_params` checks before reading)."""
    where = f"teacher.path={str(run_dir)!r}"
    with _checkpoint_at(run_dir, None, where) as (_, step):
        _check_teacher_shapes(run_dir, step, target, where)


def _check_teacher_shapes(run_dir: str | Path, step: int, target, where: str) -> None:
    """ConfigError naming the first arrays of `target` the checkpoint lacks or holds in another
    shape (a damaged checkpoint, whose metadata does not read, is left to the restore)."""
    try:
        metadata = ocp.StandardCheckpointer().metadata(Path(run_dir).absolute() / "checkpoints" / str(step) / "state")
        saved = _shapes_by_path(getattr(metadata, "item_metadata", metadata)["teacher"]["params"])
    except Exception:  # noqa: BLE001 - unreadable metadata: the restore reports the damage
        return
    needed = _shapes_by_path(nnx.to_pure_dict(target))
    missing = [path for path in needed if path not in saved]
    other = [f"{path} {needed[path]} (saved {saved[path]})" for path in needed
             if path in saved and needed[path] != saved[path]]
    if missing or other:
        first = lambda paths: ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")  # noqa: E731
        raise ConfigError(f"{where}: its checkpoint's teacher does not match teacher.model: "
                          + "; ".join(filter(None, [missing and f"it has no {first(missing)}",
                                                    other and f"other shapes: {first(other)}"]))
                          + ". Leave teacher.model's architecture to that run's config")


def _shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
    """'groups.0.layers.1.attention.q' -> shape, for a nested dict of arrays (the 'value' level dropped)."""
    return {".".join(str(getattr(key, "key", key)) for key in path if getattr(key, "key", None) != "value"):
            tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


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
