"""The loop around the step: set-up, resume, logging, evaluation, checkpoints, the final table."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh

from distill.checkpoint import CheckpointWriteError, Checkpoints, check_shapes, committed_steps, restore_target
from distill.config import Config, build_config, save_config
from distill.data import build_data
from distill.data.packing import BATCH_KEYS
from distill.guards import RunLock, StopSignals
from distill.run_logger import RunLogger
from distill.metap import base_config, scale_init, scale_learning_rates
from distill.errors import ConfigError
from distill.model import Transformer, build_model
from distill.model.sharding import ShardingContext
from distill.parallel import (batch_sharding, check_batch_divides, global_batch, initialize_distributed, make_mesh,
                              opt_state_shardings, param_shardings, process_row_block, replicated)
from distill.progress import Progress
from distill.runs import check_teacher_checkpoint, restore_teacher_params
from distill.step import ModelState, StepPlan, StudentPlan, TrainState, eval_metrics, eval_step, make_optimizer, \
    train_step
from student import init_from_teacher
from teacher.cache import TeacherCache, read_meta
from teacher.sources import load_teacher


@dataclass
class Models:
    teacher: object  # None: a cached teacher (teacher.source=cache)
    students: list


def _build_models(cfg: Config, *, abstract: bool = False, teacher: Transformer | None = None) -> Models:
    """The teacher and students with their initial weights; `abstract`: their shapes only;
    `teacher`: this one instead of loading the configured one."""
    seed = cfg.train.seed
    cached = cfg.teacher.source == "cache"
    if abstract:
        shape_of = lambda model_cfg: nnx.eval_shape(lambda: build_model(model_cfg, seed=seed))  # noqa: E731
        return Models(None if cached else shape_of(cfg.teacher_model()),
                      [shape_of(cfg.student_model(i)) for i in range(len(cfg.students))])
    if teacher is None and not cached:
        teacher = load_teacher(cfg.teacher.source, cfg.teacher.path, cfg.teacher_model(), seed)
    teacher_base = base_config(cfg.teacher_model(), (cfg.teacher.optim or cfg.optim).metap_base,
                               "teacher.optim.metap_base")
    if teacher_base and cfg.teacher.source == "scratch":
        scale_init(teacher, teacher_base)
    students = []
    for i, s in enumerate(cfg.students):
        # One seed for every student: students of the same architecture start from the same
        # weights, so distilled vs control (or one loss policy vs another) is a paired comparison.
        model = build_model(cfg.student_model(i), seed=seed + 1)
        if s.init == "teacher":
            init_from_teacher(model, teacher, layers=s.init_layers, experts=s.init_experts)
        elif base := base_config(model.cfg, cfg.student_optim(i).metap_base, f"students[{i}].optim.metap_base"):
            scale_init(model, base)
        students.append(model)
    return Models(teacher, students)


def _optimizer(optim, model_cfg, steps: int, where: str):
    """The model's optimizer, with MetaP's per-parameter learning rates when `optim.metap_base` is set."""
    base = base_config(model_cfg, optim.metap_base, where)
    return make_optimizer(optim, steps, scale_learning_rates(model_cfg, base) if base else None)


def abstract_state(plan: StepPlan, models: Models) -> TrainState:
    """Shapes and dtypes of the initial state (no weights computed), from abstract models."""
    def initial():
        teacher = None if models.teacher is None else build_model(models.teacher.cfg)
        return _initial_state(plan, Models(teacher, [build_model(m.cfg) for m in models.students]))
    return jax.eval_shape(initial)


def _plan(cfg: Config, models: Models, mesh: Mesh) -> StepPlan:
    steps = cfg.train.steps
    student_steps = steps - cfg.teacher_warmup()
    t_graph = None if models.teacher is None else nnx.split(models.teacher)[0]
    teacher_tx = _optimizer(cfg.teacher.optim or cfg.optim, cfg.teacher_model(), steps,
                            "teacher.optim.metap_base") if cfg.teacher.trains else None
    t_cfg = cfg.teacher_model()
    plans = []
    for i, (s, model) in enumerate(zip(cfg.students, models.students)):
        graph, _ = nnx.split(model)
        loss = cfg.student_loss(i)
        router_kd = loss.router_kd_weight > 0 and not s.control
        if router_kd and t_graph is None:
            raise ConfigError(f"students[{i}].loss.router_kd_weight={loss.router_kd_weight}: a cached teacher has no "
                              "router logits; set it to 0")
        if router_kd and (model.cfg.num_moe_layers != t_cfg.num_moe_layers
                          or model.cfg.num_local_experts != t_cfg.num_local_experts):
            raise ConfigError(f"students[{i}].loss.router_kd_weight={loss.router_kd_weight}: router distillation "
                              "needs the teacher's number of MoE layers and experts; set it to 0")
        plans.append(StudentPlan(name=s.name, graph=graph, tx=_optimizer(cfg.student_optim(i), model.cfg, student_steps,
                                                                      f"students[{i}].optim.metap_base"),
                                 loss=loss, control=s.control, num_experts=model.cfg.num_local_experts,
                                 router_kd=router_kd, sharding=ShardingContext(mesh, cfg.student_rules(i)),
                                 on_policy_rows=0 if s.control else loss.on_policy.rows(
                                     cfg.data.batch_size // cfg.train.grad_accum)))
    return StepPlan(teacher_graph=t_graph, teacher_tx=teacher_tx, teacher=cfg.teacher,
                    teacher_experts=t_cfg.num_local_experts, students=tuple(plans), grad_accum=cfg.train.grad_accum,
                    debug_nonfinite_step=cfg.train.debug_nonfinite_step, seed=cfg.train.seed,
                    teacher_sharding=ShardingContext(mesh, cfg.teacher_rules()))


def _initial_state(plan: StepPlan, models: Models) -> TrainState:
    t_params = {} if models.teacher is None else nnx.state(models.teacher, nnx.Param)
    teacher = ModelState(t_params, plan.teacher_tx.init(t_params) if plan.teacher_tx else None)
    target = jax.tree.map(jnp.copy, t_params) if plan.teacher_tx and plan.teacher.target != "live" else None
    student_params = [nnx.state(m, nnx.Param) for m in models.students]
    students = tuple(ModelState(p, sp.tx.init(p)) for sp, p in zip(plan.students, student_params))
    models = 1 + len(students)
    return TrainState(step=jnp.zeros((), jnp.int32), teacher=teacher, target=target, students=students,
                      skipped=jnp.zeros((models,), jnp.int32), last_skipped=jnp.full((models,), -1, jnp.int32))


def state_shardings(plan: StepPlan, state: TrainState) -> TrainState:
    """Where every array of the state lives: parameters by their model's rules, optimizer states
    like their parameters, the step counter replicated."""
    def model_sharding(model_state: ModelState, tx, context: ShardingContext, role: str) -> ModelState:
        params = param_shardings(model_state.params, context.rules, context.mesh, role)
        opt = None if model_state.opt_state is None else opt_state_shardings(tx, model_state.opt_state, params,
                                                                              context.mesh)
        return ModelState(params, opt)

    teacher = model_sharding(state.teacher, plan.teacher_tx, plan.teacher_sharding, "teacher")
    students = tuple(model_sharding(s, sp.tx, sp.sharding, f"students[{i}] ({sp.name})")
                     for i, (s, sp) in enumerate(zip(state.students, plan.students)))
    whole = replicated(plan.teacher_sharding.mesh)
    return TrainState(step=whole, teacher=teacher, target=None if state.target is None else teacher.params,
                      students=students, skipped=whole, last_skipped=whole)


def _without_placement(resolved: dict) -> dict:
    """The config minus where things live (mesh, sharding rules, run.dir): a run may resume on
    another mesh, or after its directory was moved."""
    kept = {k: v for k, v in resolved.items() if k != "mesh"}
    kept["run"] = {k: v for k, v in kept["run"].items() if k != "dir"}
    kept["teacher"] = {k: v for k, v in kept["teacher"].items() if k != "sharding"}
    kept["students"] = [{k: v for k, v in s.items() if k != "sharding"} for s in kept["students"]]
    return kept


def jit_step(plan: StepPlan, state_sharding, batch_sharding_, warmup: int, *, with_students: bool):
    """The step under `jax.jit` with explicit in/out shardings, the state's buffers donated."""
    fn = lambda s, b: train_step(plan, s, b, with_students=with_students, student_step_offset=warmup)  # noqa: E731
    return jax.jit(fn, in_shardings=(state_sharding, batch_sharding_), out_shardings=(state_sharding, None),
                   donate_argnums=(0,))


def _step_placement(cfg: Config):
    """(plan, state shapes, state shardings, micro-batch sharding, micro-batch shape) of `cfg`."""
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh_rules()
    models = _build_models(cfg, abstract=True)
    plan = _plan(cfg, models, mesh)
    shapes = abstract_state(plan, models)
    accum = cfg.train.grad_accum
    return (plan, shapes, state_shardings(plan, shapes), batch_sharding(mesh, rules, micro_batched=True),
            (accum, cfg.data.batch_size // accum, cfg.data.seq_len))


def _batch_specs(cfg: Config, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], type]]:
    """(shape, dtype) of each array of the step's batch; a cached teacher adds its top-k entries."""
    specs = {k: (shape, np.float32 if k == "mask" else np.int32) for k in BATCH_KEYS}
    if cfg.teacher.source == "cache":
        k = read_meta(cfg.teacher.path)["k"]
        specs.update(teacher_indices=((*shape, k), np.int32), teacher_log_probs=((*shape, k), np.float32),
                     teacher_label_log_prob=(shape, np.float32))
    return specs


def compiled_step(cfg: Config, *, with_students: bool = True):
    """The co-distillation step of `cfg` on its mesh (`with_students=False`: the teacher-only
    warm-up step), lowered and compiled from shapes alone (no weights, no data): `.as_text()` is
    the HLO whose collectives docs/sharding.md lists; calling it needs `initial_state` and a batch
    like `random_batch`'s."""
    plan, shapes, state_sharding, micro_sharding, batch_shape = _step_placement(cfg)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=micro_sharding)
             for k, (shape, dtype) in _batch_specs(cfg, batch_shape).items()}
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, state_sharding)
    step = jit_step(plan, state_sharding, micro_sharding, cfg.teacher_warmup(), with_students=with_students)
    return step.lower(state, batch).compile()


def initial_state(cfg: Config) -> TrainState:
    """The state a fresh run of `cfg` starts from, placed on its mesh (benchmarks, notebooks)."""
    plan, shapes, state_sharding, _, _ = _step_placement(cfg)
    return _placed_initial_state(cfg, plan, shapes, state_sharding)


def _placed_initial_state(cfg: Config, plan: StepPlan, shapes: TrainState, state_sharding) -> TrainState:
    """The initial state built in its shardings: no device holds a whole model, and no host either
    but for a teacher converted from a HF directory, or one a student copies from."""
    if cfg.teacher.source in ("scratch", "cache"):
        return jax.jit(lambda: _initial_state(plan, _build_models(cfg)), out_shardings=state_sharding)()
    if any(s.init == "teacher" for s in cfg.students):  # init_from_teacher copies from a whole model on the host
        return jax.device_put(_initial_state(plan, _build_models(cfg)), state_sharding)
    if cfg.teacher.source == "run":  # read shard by shard into its place
        teacher_params = restore_teacher_params(cfg.teacher.path, restore_target(shapes.teacher.params,
                                                                                  state_sharding.teacher.params))
    else:  # converted on the host, then placed
        teacher = load_teacher(cfg.teacher.source, cfg.teacher.path, cfg.teacher_model(), cfg.train.seed)
        teacher_params = jax.device_put(nnx.state(teacher, nnx.Param), state_sharding.teacher.params)
    # everything else initialised in its shardings around the placed teacher
    return jax.jit(lambda params: _initial_state(plan, _build_models(cfg, teacher=nnx.merge(plan.teacher_graph, params))),
                   out_shardings=state_sharding, donate_argnums=0)(teacher_params)  # no second teacher copy


def random_batch(cfg: Config, seed: int = 0) -> dict:
    """A batch of uniformly random tokens in the step's layout (one unpacked sequence per row); with
    a cached teacher, the top-k of random teacher logits."""
    _, _, _, micro_sharding, shape = _step_placement(cfg)
    rng = np.random.default_rng(seed)
    vocab = cfg.teacher_model().vocab_size  # students': the same
    ids = rng.integers(0, vocab, (*shape[:2], shape[2] + 1)).astype(np.int32)
    host = {"tokens": ids[..., :-1], "labels": ids[..., 1:], "mask": np.ones(shape, np.float32),
            "segment_ids": np.zeros(shape, np.int32), "positions": np.broadcast_to(np.arange(shape[2], dtype=np.int32),
                                                                                  shape).copy()}
    specs = _batch_specs(cfg, shape)
    if "teacher_indices" in specs:
        logits = rng.normal(size=(*shape, vocab))
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        top = np.argsort(-log_probs, axis=-1)[..., :specs["teacher_indices"][0][-1]]
        host.update(teacher_indices=top.astype(np.int32),
                    teacher_log_probs=np.take_along_axis(log_probs, top, -1).astype(np.float32),
                    teacher_label_log_prob=np.take_along_axis(log_probs, host["labels"][..., None], -1)[..., 0]
                    .astype(np.float32))
    return {k: jax.device_put(v, micro_sharding) for k, v in host.items()}


ON_CHANGED_CONFIG = ("refuse", "resume", "new")


def _prepare_run_dir(cfg: Config, on_changed_config: str) -> tuple[Path, bool, RunLock | None]:
    """Create or reuse the run directory and lock it; what happens when it holds a run of another
    config is `on_changed_config`'s choice (see `run`). Returns (dir, resuming?, the held lock).

    A run resumes under a different mesh or sharding rules, or from a moved directory, without
    asking (config.yaml then records the new values). With several processes, process 0 decides
    and writes; the others wait for it and take its answer (run.dir must be on a shared filesystem).
    """
    if on_changed_config not in ON_CHANGED_CONFIG:
        raise ConfigError(f"on_changed_config={on_changed_config!r}: choose one of {', '.join(ON_CHANGED_CONFIG)}")
    run_dir = cfg.run.path
    existing, lock = _prepare_as_writer(cfg, run_dir, on_changed_config) if jax.process_index() == 0 else (False, None)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        existing = bool(multihost_utils.broadcast_one_to_all(np.int32(existing)))
    return run_dir, existing, lock


def _prepare_as_writer(cfg: Config, run_dir: Path, on_changed_config: str) -> tuple[bool, RunLock]:
    config_file = run_dir / "config.yaml"
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if on_changed_config == "resume" and not config_file.is_file():
        raise ConfigError(f"--resume: run.dir={str(run_dir)!r} holds no run to resume (no config.yaml); "
                          "drop --resume to start a new run there")
    if occupied and not config_file.is_file() and on_changed_config != "new":
        raise ConfigError(f"run.dir={str(run_dir)!r} exists and is not a distill run directory; choose "
                          "another (or pass --force-new to move its contents aside)")
    if occupied and on_changed_config == "new":
        _move_aside(run_dir)
    if on_changed_config == "refuse" and config_file.is_file():
        _config_changes(cfg, run_dir, on_changed_config)  # refuse before touching anything (the lock file too)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    lock.acquire()  # before anything in the directory changes
    try:
        return _write_config(cfg, run_dir, on_changed_config), lock
    except BaseException:
        lock.release()
        raise


def _write_config(cfg: Config, run_dir: Path, on_changed_config: str) -> bool:
    """Write config.yaml for a new run, or check it against a previous run's; True: resume."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        save_config(cfg, config_file)
        return False
    previous, resolved, changed = _config_changes(cfg, run_dir, on_changed_config)  # again, under the lock
    if changed:  # resume under the new config; the old one stays beside it
        kept = _unused_path(run_dir / f"config.before-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        config_file.rename(kept)
        print(f"distill run: resuming {run_dir} under a changed config ({', '.join(changed[:6])}); the previous "
              f"config is {kept.name}", file=sys.stderr)
    if previous != resolved:
        save_config(cfg, config_file)
    return True


def _config_changes(cfg: Config, run_dir: Path, on_changed_config: str) -> tuple[dict, dict, list[str]]:
    """(the run's previous config, `cfg` as written, the keys `cfg` changes); refused unless resuming.

    The previous config is read as this version resolves it: a field added since the run was
    written takes its default there, so a new option alone does not make an old run "different"."""
    previous = yaml.safe_load((run_dir / "config.yaml").read_text())
    try:
        previous = yaml.safe_load(yaml.safe_dump(build_config(previous, {}).to_dict(), sort_keys=False))
    except ConfigError:  # it no longer loads (a field since removed): compare it as written
        pass
    resolved = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    changed = sorted(_diff_keys(_without_placement(previous), _without_placement(resolved)))
    if changed and on_changed_config != "resume":
        raise ConfigError(f"run.dir={str(run_dir)!r} holds a run with a different config (changed: "
                          f"{', '.join(changed[:6])}); pass --resume to continue it under the new config, "
                          "--force-new to move it aside and start anew, or choose another run.dir")
    return previous, resolved, changed


def finished_summary(cfg: Config) -> dict | None:
    """The summary of the completed run of exactly `cfg` (placement aside) in `cfg.run.dir`, or
    None when there is none (absent, unfinished, or another config): a script can skip it."""
    run_dir = cfg.run.path
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.yaml").is_file():
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("status") != "completed" or _config_changes(cfg, run_dir, "resume")[2]:
        return None
    return summary


def _unused_path(path: Path) -> Path:
    candidates = (path.with_name(f"{path.stem}-{n}{path.suffix}") for n in range(1, 10_000))
    return path if not path.exists() else next(p for p in candidates if not p.exists())


def _move_aside(run_dir: Path) -> None:
    """--force-new: the old run keeps all its files, renamed to a sibling directory; refused
    while another process holds the run."""
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        kept = _unused_path(run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
        run_dir.rename(kept)
    finally:
        lock.release()
    print(f"distill run: --force-new: the previous contents of {run_dir} are now in {kept}", file=sys.stderr)


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
        yield prefix.rstrip(".")


def _hparams(cfg: Config) -> dict:
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
        else:
            flat[prefix.rstrip(".")] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(cfg.to_dict(), "")
    return flat


def _micro_batches(batch: dict, accum: int) -> dict:
    """`[rows, seq]` -> `[accum, rows / accum, seq]`: the micro-batches of one step."""
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


def _log_filtered_rows(logger: RunLogger, step: int, tag: str, scores: np.ndarray, tokens: np.ndarray,
                       tokenizer, chars: int = 600) -> None:
    """What a student's difficulty filter did to this step's rows (this process's): a histogram of
    the row scores, and the text of the easiest row (filtered) and the hardest (kept)."""
    logger.log_histogram(step, tag, scores)
    flat_scores, flat_tokens = scores.reshape(-1), tokens.reshape(-1, tokens.shape[-1])
    shown = []
    for label, row in (("easiest row (among the dropped or down-weighted)", int(np.argmin(flat_scores))),
                       ("hardest row (kept)", int(np.argmax(flat_scores)))):
        text = tokenizer.decode(flat_tokens[row])[:chars].replace("`", "'")
        shown.append(f"**{label}**, score {flat_scores[row]:.3f}:\n\n```\n{text}\n```")
    logger.log_text(step, tag.replace("filter_row_scores", "filter_examples"), "\n\n".join(shown))


def _log_written_row(logger: RunLogger, step: int, tag: str, tokens: np.ndarray, prompt_tokens: int, tokenizer,
                     chars: int = 600) -> None:
    """A row an on-policy student wrote this step: its data prompt, then what it sampled."""
    prompt = tokenizer.decode(tokens[:prompt_tokens])[-chars:].replace("`", "'")
    written = tokenizer.decode(tokens[prompt_tokens:])[:chars].replace("`", "'")
    logger.log_text(step, tag, f"**prompt** (data):\n\n```\n{prompt}\n```\n\n**written by the student**:\n\n"
                               f"```\n{written}\n```")


def _scalars(metrics: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    host = jax.device_get(metrics)
    scalars = {k: float(v) for k, v in host.items() if np.ndim(v) == 0}
    arrays = {k: np.asarray(v) for k, v in host.items() if np.ndim(v) > 0}
    return scalars, arrays


def run(cfg: Config, *, stop_after: int | None = None, on_changed_config: str = "refuse") -> dict:
    """Run (or resume) one experiment; returns the summary also written to `summary.json`.

    `stop_after`: stop after this many steps of this invocation with a checkpoint (status
    "stopped"), as a preemption would; running again resumes.
    `on_changed_config`: when run.dir holds a run whose config differs from `cfg` (other than in
    placement): "refuse" (the default), "resume" (continue from its latest checkpoint under `cfg`,
    which must build the same shapes; CLI --resume) or "new" (move the old run to a sibling
    `<dir>.replaced-<time>` and start afresh; CLI --force-new).
    """
    started = time.time()
    initialize_distributed(cfg.mesh.distributed)
    mesh = make_mesh(cfg.mesh)
    rules = cfg.mesh_rules()
    accum = cfg.train.grad_accum
    check_batch_divides(cfg.data.batch_size, accum, mesh, rules)
    micro_sharding = batch_sharding(mesh, rules, micro_batched=True)
    micro_shape = (accum, cfg.data.batch_size // accum, cfg.data.seq_len)
    rows = process_row_block(micro_sharding, micro_shape, 1, jax.process_index())
    data = build_data(cfg.data, seed=cfg.train.seed)
    abstract_models = _build_models(cfg, abstract=True)
    for role, model_cfg in [("teacher", cfg.teacher_model())] + [(f"students[{i}]", cfg.student_model(i))
                                                                for i in range(len(cfg.students))]:
        if data.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"{role}.model.vocab_size={model_cfg.vocab_size}: the tokenizer has "
                              f"{data.vocab_size} tokens; the model needs at least as many")
    cache = TeacherCache(cfg.teacher.path) if cfg.teacher.source == "cache" else None
    if cache:
        cache.check_run(cfg)
    plan = _plan(cfg, abstract_models, mesh)
    shapes = abstract_state(plan, abstract_models)
    state_sharding = state_shardings(plan, shapes)
    saved = committed_steps(cfg.run.path / "checkpoints")
    if on_changed_config == "resume" and saved:  # before the run directory changes
        check_shapes(cfg.run.path / "checkpoints" / str(saved[-1]), shapes)
    if cfg.teacher.source == "run" and (not saved or on_changed_config == "new"):  # a fresh start reads it:
        check_teacher_checkpoint(cfg.teacher.path, shapes.teacher.params)      # refuse a misfit teacher.model now
    run_dir, existing, lock = _prepare_run_dir(cfg, on_changed_config)  # once the config places on this mesh
    try:
        # a resumed run reads its checkpoint into these; only a fresh one builds (or loads) its models
        start_state = (restore_target(shapes, state_sharding),
                       lambda: _placed_initial_state(cfg, plan, shapes, state_sharding))
        warmup = cfg.teacher_warmup()
        full_step = jit_step(plan, state_sharding, micro_sharding, warmup, with_students=True)
        teacher_step = jit_step(plan, state_sharding, micro_sharding, warmup, with_students=False) if warmup else None
        eval_sharding = batch_sharding(mesh, rules)
        evaluate = jax.jit(lambda s, b: eval_step(plan, s, b), in_shardings=(state_sharding, eval_sharding))
        return _loop(cfg, run_dir, existing, start_state, (data, cache), plan, (full_step, teacher_step, evaluate),
                     (micro_sharding, micro_shape, rows, eval_sharding), stop_after, started)
    finally:
        if lock:
            lock.release()


def _loop(cfg, run_dir, existing, start_state, sources, plan, compiled, placement, stop_after, started) -> dict:
    data, cache = sources  # the batches, and a cached teacher's entries for them (or None)
    full_step, teacher_step, evaluate = compiled
    micro_sharding, micro_shape, rows, eval_sharding = placement
    accum, warmup = cfg.train.grad_accum, cfg.teacher_warmup()
    checkpoints = Checkpoints(run_dir, keep=cfg.train.keep_checkpoints)
    per_process = rows.stop - rows.start
    shard = (rows.start // per_process, micro_shape[1] // per_process)
    iterator = data.train_iterator(*shard)

    def with_teacher(split: str, index: int, batch: dict, shard: tuple[int, int]) -> dict:
        """The batch, with a cached teacher's entries for it."""
        return {**batch, **cache.entries(split, index, batch["tokens"], *shard)} if cache else batch
    start = 0
    target, fresh_state = start_state  # the checkpoint's abstract state, and how to build a new one
    restored = checkpoints.restore_latest(target) if existing else None
    if restored is not None:
        state, meta = restored
        iterator.restore(meta["data"])
        start = int(meta["step"])
    else:
        state = fresh_state()
    eval_shape = (cfg.data.batch_size, cfg.data.seq_len)
    eval_rows = process_row_block(eval_sharding, eval_shape, 0, jax.process_index())
    eval_per_process = eval_rows.stop - eval_rows.start
    eval_shard = (eval_rows.start // eval_per_process, eval_shape[0] // eval_per_process)
    validation = data.validation_batches(cfg.train.eval_batches or None, shard_index=eval_shard[0],
                                         shard_count=eval_shard[1])

    def run_eval() -> dict[str, float]:
        sums: dict[str, float] = {}
        for i, batch in enumerate(validation):
            batch = with_teacher("eval", i, batch, eval_shard)
            out = jax.device_get(evaluate(state, global_batch(batch, eval_sharding, eval_shape)))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return eval_metrics(sums)

    names = ["teacher"] + [s.name for s in cfg.students]
    skipped_before = np.asarray(jax.device_get(state.skipped))

    def nonfinite_report() -> str | None:
        """None, or what was skipped since the last look (a small device read at log/checkpoint steps)."""
        nonlocal skipped_before
        skipped, last = (np.asarray(x) for x in jax.device_get((state.skipped, state.last_skipped)))
        new = [f"{names[i]} (step {last[i]}, {skipped[i]} so far)" for i in np.flatnonzero(skipped > skipped_before)]
        skipped_before = skipped
        return f"non-finite gradient, update skipped: {', '.join(new)}" if new else None

    steps = cfg.train.steps
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    logger = RunLogger(run_dir, hparams=_hparams(cfg), enabled=jax.process_index() == 0,
                       resume_step=start if restored is not None else None)
    progress = Progress(total=steps, start=start, enabled=jax.process_index() == 0)
    if start == 0:
        logger.log_text(0, "config", yaml.safe_dump(cfg.to_dict(), sort_keys=False), preformatted=True)
    last_eval: dict[str, float] = {}
    status = "completed"
    previous = run_dir / "summary.json"
    trained_before = json.loads(previous.read_text()).get("train_seconds", 0.0) if restored and previous.exists() else 0.0
    loop_started = window_start = time.time()
    loop_ended = None  # re-evaluating a finished run is not training time
    window_steps = 0
    try:
        with StopSignals() as signals:
            for step in range(start, steps):
                host_batch = _micro_batches(with_teacher("train", step, next(iterator), shard), accum)
                batch = global_batch(host_batch, micro_sharding, micro_shape)
                step_fn = teacher_step if step < warmup else full_step
                state, metrics = step_fn(state, batch)
                window_steps += 1
                done = step + 1
                checkpoint_due = done % cfg.train.checkpoint_every == 0 or done == steps
                if done % cfg.train.log_every == 0 or checkpoint_due:
                    problem = nonfinite_report()
                    if problem and cfg.train.on_nonfinite == "stop":
                        last = checkpoints.latest_step()
                        print(f"distill run: {problem}; train.on_nonfinite=stop, so the run stops at step {done} "
                              f"without saving: the last checkpoint (step {last}) is intact. Fix the cause, or "
                              "resume with train.on_nonfinite=skip", file=sys.stderr)
                        status = "nonfinite"
                        break
                    if problem:
                        progress.message(f"step {done}: warning: {problem}")
                if done % cfg.train.log_every == 0 or done == steps:
                    scalars, arrays = _scalars(metrics)
                    elapsed = time.time() - window_start
                    scalars["perf/tokens_per_second"] = window_steps * tokens_per_step / max(elapsed, 1e-9)
                    scalars["perf/step_seconds"] = elapsed / window_steps
                    window_start, window_steps = time.time(), 0
                    for tag in [t for t in arrays if t.endswith("/filter_row_scores")]:
                        _log_filtered_rows(logger, done, tag, arrays.pop(tag)[:, rows], host_batch["tokens"],
                                           data.tokenizer)
                    for i, s in enumerate(cfg.students):
                        written = arrays.pop(f"student/{s.name}/on_policy_written", None)
                        if written is not None and scalars[f"student/{s.name}/on_policy_writing"]:  # start_step
                            _log_written_row(logger, done, f"student/{s.name}/on_policy_written", written,
                                             cfg.student_loss(i).on_policy.prompt_tokens, data.tokenizer)
                    for tag, values in arrays.items():
                        for layer, load in enumerate(values if values.ndim == 2 else [values]):
                            logger.log_histogram(done, f"{tag}/layer{layer}", load)
                        if values.size:
                            scalars[f"{tag}_max"] = float(values.max() * values.shape[-1])
                    logger.log(done, scalars)
                    progress.update(done, scalars)
                if done % cfg.train.eval_every == 0 or done == steps:
                    last_eval = run_eval()
                    logger.log(done, last_eval)
                    progress.note(done, last_eval)
                stopping = stop_after is not None and done - start >= stop_after and done < steps
                if checkpoint_due or stopping or signals.status:
                    checkpoints.save(done, state, {"step": done, "data": iterator.state()})
                if signals.status and done < steps:
                    status = signals.status
                    print(f"\ndistill run: {status} at step {done}: checkpoint saved; run the same command to "
                          "resume", file=sys.stderr)
                    break
                if stopping:
                    status = "stopped"
                    break
            loop_ended = time.time()
            if not last_eval and status == "completed":  # a finished run started again: report its final state
                last_eval = run_eval()
            checkpoints.wait()  # a failed final save is reported here, not hidden in close()
    except CheckpointWriteError as error:
        status = "save_failed"
        print(f"\ndistill run: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception:
        status = "failed"
        raise
    finally:
        checkpoints.close()
        progress.close()
        train_seconds = trained_before + ((loop_ended or time.time()) - loop_started if start < steps else 0.0)
        summary = _summary(cfg, status, last_eval, time.time() - started, train_seconds, start)
        if jax.process_index() == 0:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.finish({k: v for k, v in last_eval.items()})
        logger.close()
    if jax.process_index() == 0:
        print(format_table(summary))
    return summary


def _summary(cfg: Config, status: str, last_eval: dict, wall: float, train_seconds: float, resumed_from: int) -> dict:
    """`wall_seconds`: this command; `train_seconds`: the training loop (steps, evaluations,
    checkpoints) summed over every command that trained this run directory and wrote a summary."""
    models = {"teacher": last_eval.get("eval/teacher/bpb")}
    for s in cfg.students:
        models[s.name] = last_eval.get(f"eval/student/{s.name}/bpb")
    return {"status": status, "run_dir": str(cfg.run.path), "steps": cfg.train.steps, "resumed_from": resumed_from,
            "wall_seconds": wall, "train_seconds": train_seconds, "bpb": models, "controls": [s.name for s in cfg.students if s.control],
            "final": last_eval}


def control_for(student: str, controls: list[str]) -> str | None:
    """The control a student is compared with: the one named after it (`x` -> `x-control`), else
    the first control."""
    named = [c for c in controls if c.startswith(student)]
    return named[0] if named else (controls[0] if controls else None)


def format_table(summary: dict) -> str:
    """Validation bits per byte of every model, and each distilled student against its control."""
    bpb = summary["bpb"]
    controls = [name for name in summary["controls"] if bpb.get(name) is not None]
    several = len(controls) > 1
    width = max([20, *(len(name) + 1 for name in bpb)])
    lines = [f"{'model':<{width}} {'val bpb':>9}  vs control", "-" * (width + 24)]
    for name, value in bpb.items():
        cell = "" if value is None else f"{value:9.4f}"
        versus = ""
        if controls and name not in controls and name != "teacher" and value is not None:
            control = control_for(name, controls)
            ref = bpb[control]
            versus = f"{(value - ref) / ref * 100:+.1f}% ({'better' if value < ref else 'worse'})"
            versus += f" vs {control}" if several else ""
        lines.append(f"{name:<{width}} {cell:>9}  {versus}")
    return "\n".join(lines)


