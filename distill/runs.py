"""Run directories outside training: their checkpoints read back as models or states, evaluated,
and a HF teacher imported as a run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import yaml
from flax import nnx

from distill import checkpoint, rundir
from distill.compile_cache import use_compilation_cache
from distill.config import Config, MeshConfig
from distill.data import build_data
from distill.errors import ConfigError
from distill.experiment import resolve
from distill.hf import from_hf
from distill.model import ModelConfig, Transformer, build_model
from distill.parallel import single_device_mesh
from distill.setup import Models, placement, step_plan
from distill.step import ModelState, StepPlan, TrainState, eval_metrics, eval_step
from teacher.cache import TeacherCache, with_entries
from teacher.sources import PARAMS


def checkpoint_tree(run_dir: str | Path, step: int | None = None) -> tuple[int, dict]:
    """(step, the saved state as nested dicts of numpy arrays) of the latest (or given) checkpoint."""
    return checkpoint.restore_tree(rundir.checkpoints_dir(run_dir), step, str(run_dir))


def restore_state(run_dir: str | Path, *, mesh: MeshConfig | None = None,
                  step: int | None = None) -> tuple[Config, StepPlan, TrainState, int]:
    """A run's checkpoint restored straight into its shardings on `mesh` (default: the run's own
    mesh section over this process's devices), which need not be the mesh that saved it.

    Returns (config, step plan, TrainState, step); each array lands on its devices as the
    model's rules say, without passing through one device.
    """
    cfg = rundir.run_config(run_dir)
    if mesh is not None:
        cfg = dataclasses.replace(cfg, mesh=mesh)
    placed = placement(resolve(cfg))
    state, step = checkpoint.restore_state(rundir.checkpoints_dir(run_dir), placed.abstract_state(), step, str(run_dir))
    return cfg, placed.plan, state, step


def model_with_params(cfg: ModelConfig, params_tree: dict, where: str) -> Transformer:
    """A model of config `cfg` holding the checkpointed parameters `params_tree`."""
    model = build_model(cfg)
    state = nnx.state(model, nnx.Param)
    try:
        nnx.replace_by_pure_dict(state, checkpoint.strip_value_keys(params_tree))
    except (KeyError, ValueError) as error:
        raise ConfigError(f"{where}: the checkpoint does not match the model config ({error})") from None
    nnx.update(model, state)
    return model


def load_models(run_dir: str | Path, step: int | None = None) -> tuple[Config, int, Transformer | None, dict]:
    """(config, step, teacher, {student name: student}) from a run directory's checkpoint; the
    teacher is None in a run that distilled from a cache (teacher.source=cache)."""
    exp = resolve(rundir.run_config(run_dir))
    step, tree = checkpoint_tree(run_dir, step)
    teacher = model_with_params(exp.teacher.model, tree["teacher"]["params"], f"{run_dir} teacher") \
        if exp.teacher.source.runs else None
    saved = tree["students"]
    students = {s.name: model_with_params(s.model, (saved[str(s.index)] if isinstance(saved, dict) else
                                                    saved[s.index])["params"], f"{run_dir} student {s.name}")
                for s in exp.students}
    return exp.config, step, teacher, students


def evaluate_run(run_dir: str | Path, *, max_batches: int | None = None, step: int | None = None) -> dict:
    """Validation metrics (bpb, top-1 agreement, KL) of a run's checkpoint on its validation split."""
    cfg, step, teacher, students = load_models(run_dir, step)
    use_compilation_cache(cfg.run.compilation_cache)
    exp = resolve(cfg)
    plan = step_plan(exp, Models(teacher, list(students.values())), single_device_mesh())
    teacher_params = {} if teacher is None else nnx.state(teacher, nnx.Param)
    state = TrainState(step=step, teacher=ModelState(teacher_params, None), target=None,
                       students=tuple(ModelState(nnx.state(m, nnx.Param), None) for m in students.values()),
                       skipped=None, last_skipped=None)
    data = build_data(cfg.data, seed=cfg.train.seed)
    cache = None if exp.teacher.source.runs else TeacherCache(cfg.teacher.path)
    evaluate = jax.jit(lambda s, b: eval_step(plan, s, b))
    sums: dict[str, float] = {}
    for i, batch in enumerate(data.validation_batches(max_batches)):
        for key, value in jax.device_get(evaluate(state, with_entries(cache, "eval", i, batch))).items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return {"step": step, **eval_metrics(sums)}


def import_hf(hf_dir: str | Path, out_dir: str | Path, *, allow_pickle: bool = False) -> Path:
    """Convert a HF directory once into a teacher run directory (config.yaml + checkpoint 0),
    usable as `teacher.source: run, teacher.path: OUT` without torch at training time."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is {'not empty' if out.is_dir() else 'a file'}; choose a new directory")
    model = from_hf(hf_dir, allow_pickle=allow_pickle)
    out.mkdir(parents=True, exist_ok=True)
    config = {"teacher": {"preset": None, "model": model.cfg.to_dict()}, "imported_from": str(Path(hf_dir).absolute())}
    (out / rundir.CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    state = {PARAMS[0]: {PARAMS[1]: nnx.state(model, nnx.Param)}}
    checkpoint.write_state(rundir.checkpoints_dir(out), 0, state, {"step": 0, "imported_from": str(hf_dir)})
    return out
