"""Set-up: from a resolved experiment to a step that runs on its mesh.

`placement(exp)` gives everything the step needs and where it lives: the `StepPlan` (graphs,
optimizers, losses, teacher kind), the state's shapes and shardings, the batch's sharding.
`placed_initial_state` builds the first state in those shardings; `jit_step` and `jit_eval` are
the step and the evaluation under `jax.jit` with explicit in/out shardings. The trainer, the
benchmarks, `distill.runs` and the tests all build the step here.

    exp = distill.resolve(cfg)
    placed = placement(exp)
    state = placed_initial_state(exp, placed)
    step = jit_step(placed, exp.teacher_warmup, with_students=True)
    state, metrics = step(state, random_batch(cfg))
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from distill.config import Config
from distill.data.packing import BATCH_KEYS
from distill.experiment import Experiment, resolve
from distill.metap import scale_init, scale_learning_rates
from distill.model import ModelConfig, Transformer, build_model
from distill.model.sharding import ShardingContext
from distill.optim import OptimConfig, make_optimizer
from distill.parallel import batch_sharding, make_mesh, opt_state_shardings, param_shardings, replicated
from distill.step import (OBJECTIVES, TARGETS, TEACHER_KINDS, ModelState, StepPlan, StudentPlan, TeacherPlan,
                          TrainState, eval_step, train_step)
from student import init_from_teacher
from teacher.cache import read_meta


@dataclass
class Models:
    teacher: Transformer | None  # None: a cached teacher (teacher.source=cache)
    students: list[Transformer]


def build_models(exp: Experiment, *, abstract: bool = False, teacher: Transformer | None = None) -> Models:
    """The teacher and students with their initial weights; `abstract`: their shapes only;
    `teacher`: this one instead of loading the configured one."""
    seed, runs = exp.config.train.seed, exp.teacher.source.runs
    if abstract:
        shape_of = lambda model_cfg: nnx.eval_shape(lambda: build_model(model_cfg, seed=seed))  # noqa: E731
        return Models(shape_of(exp.teacher.model) if runs else None, [shape_of(s.model) for s in exp.students])
    if teacher is None and runs:
        teacher = exp.teacher.source.host_model(exp.teacher.config, exp.teacher.model, seed)
    if exp.teacher.metap_base and exp.teacher.config.source == "scratch":
        scale_init(teacher, exp.teacher.metap_base)
    students = []
    for s in exp.students:
        # One seed for every student: students of the same architecture start from the same
        # weights, so distilled vs control (or one loss policy vs another) is a paired comparison.
        model = build_model(s.model, seed=seed + 1)
        if s.config.init == "teacher":
            init_from_teacher(model, teacher, layers=s.config.init_layers, experts=s.config.init_experts)
        elif s.metap_base:
            scale_init(model, s.metap_base)
        students.append(model)
    return Models(teacher, students)


def optimizer(optim: OptimConfig, model: ModelConfig, base: ModelConfig | None,
              steps: int) -> optax.GradientTransformation:
    """The model's optimizer, with MetaP's per-parameter learning rates when it has a MetaP base."""
    return make_optimizer(optim, steps, scale_learning_rates(model, base) if base else None)


def step_plan(exp: Experiment, models: Models, mesh: Mesh) -> StepPlan:
    cfg, teacher = exp.config, exp.teacher
    steps = cfg.train.steps
    graph = None if models.teacher is None else nnx.split(models.teacher)[0]
    trains = teacher.source.runs and teacher.trains
    kind = "co_trained" if trains else "frozen" if teacher.source.runs else "cached"
    teacher_plan = TeacherPlan(
        kind=TEACHER_KINDS[kind], target=TARGETS[teacher.config.target if trains else "live"], graph=graph,
        tx=optimizer(teacher.optim, teacher.model, teacher.metap_base, steps) if trains else None,
        config=teacher.config, num_experts=teacher.model.num_local_experts,
        sharding=ShardingContext(mesh, teacher.rules), fused_head=cfg.loss.fused_head)
    micro_rows = cfg.data.batch_size // cfg.train.grad_accum
    students = tuple(StudentPlan(
        name=s.name, graph=nnx.split(model)[0],
        tx=optimizer(s.optim, s.model, s.metap_base, steps - exp.teacher_warmup), loss=s.loss,
        objective=OBJECTIVES["control" if s.control else "distilled"], num_experts=s.model.num_local_experts,
        router_kd=s.loss.router_kd_weight > 0 and not s.control, sharding=ShardingContext(mesh, s.rules),
        on_policy_rows=0 if s.control else s.loss.on_policy.rows(micro_rows))
        for s, model in zip(exp.students, models.students))
    return StepPlan(teacher=teacher_plan, students=students, grad_accum=cfg.train.grad_accum,
                    debug_nonfinite_step=cfg.train.debug_nonfinite_step, seed=cfg.train.seed)


def fresh_state(plan: StepPlan, models: Models) -> TrainState:
    """The state of a fresh run from its models' weights."""
    params = {} if models.teacher is None else nnx.state(models.teacher, nnx.Param)
    teacher = ModelState(params, plan.teacher.tx.init(params) if plan.teacher.tx else None)
    target = jax.tree.map(jnp.copy, params) if plan.teacher.target.separate else None
    student_params = [nnx.state(m, nnx.Param) for m in models.students]
    students = tuple(ModelState(p, sp.tx.init(p)) for sp, p in zip(plan.students, student_params))
    count = 1 + len(students)
    return TrainState(step=jnp.zeros((), jnp.int32), teacher=teacher, target=target, students=students,
                      skipped=jnp.zeros((count,), jnp.int32), last_skipped=jnp.full((count,), -1, jnp.int32))


def abstract_state(plan: StepPlan, models: Models) -> TrainState:
    """Shapes and dtypes of the initial state (no weights computed), from abstract models."""
    def initial():
        teacher = None if models.teacher is None else build_model(models.teacher.cfg)
        return fresh_state(plan, Models(teacher, [build_model(m.cfg) for m in models.students]))
    return jax.eval_shape(initial)


def state_shardings(plan: StepPlan, state: TrainState) -> TrainState:
    """Where every array of the state lives: parameters by their model's rules, optimizer states
    like their parameters, the step counter replicated."""
    def model_sharding(model_state: ModelState, tx, context: ShardingContext, role: str) -> ModelState:
        params = param_shardings(model_state.params, context.rules, context.mesh, role)
        opt = None if model_state.opt_state is None else opt_state_shardings(tx, model_state.opt_state, params,
                                                                              context.mesh)
        return ModelState(params, opt)

    teacher = model_sharding(state.teacher, plan.teacher.tx, plan.teacher.sharding, "teacher")
    students = tuple(model_sharding(s, sp.tx, sp.sharding, f"students[{i}] ({sp.name})")
                     for i, (s, sp) in enumerate(zip(state.students, plan.students)))
    whole = replicated(plan.teacher.sharding.mesh)
    return TrainState(step=whole, teacher=teacher, target=None if state.target is None else teacher.params,
                      students=students, skipped=whole, last_skipped=whole)


@dataclass(frozen=True)
class Placement:
    """The step of an experiment on its mesh: the plan, the state's shapes and shardings, and the
    shardings and shapes of its batches."""

    plan: StepPlan
    shapes: TrainState  # jax.ShapeDtypeStruct leaves
    state_sharding: TrainState  # NamedSharding leaves
    micro_sharding: NamedSharding  # a training batch, [grad_accum, rows, seq]
    micro_shape: tuple[int, int, int]
    eval_sharding: NamedSharding  # a validation batch, [rows, seq]

    @property
    def mesh(self) -> Mesh:
        return self.micro_sharding.mesh

    def abstract_state(self) -> TrainState:
        """The state's shapes with their shardings: what a checkpoint is read into."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.shapes,
                            self.state_sharding)


def placement(exp: Experiment, mesh: Mesh | None = None) -> Placement:
    """Where the step of `exp` runs: on `mesh` (default: the mesh section over every device)."""
    mesh = make_mesh(exp.config.mesh) if mesh is None else mesh
    models = build_models(exp, abstract=True)
    plan = step_plan(exp, models, mesh)
    shapes = abstract_state(plan, models)
    accum = exp.config.train.grad_accum
    return Placement(plan, shapes, state_shardings(plan, shapes),
                     batch_sharding(mesh, exp.mesh_rules, micro_batched=True),
                     (accum, exp.config.data.batch_size // accum, exp.config.data.seq_len),
                     batch_sharding(mesh, exp.mesh_rules))


def placed_initial_state(exp: Experiment, placed: Placement) -> TrainState:
    """The initial state built in its shardings: no device holds a whole model, and no host either
    but for a teacher converted from a HF directory, or one a student copies from."""
    plan, shardings, source = placed.plan, placed.state_sharding, exp.teacher.source
    if source.placed_params is None:  # initialised in its shardings, or no teacher model at all (a cache)
        return jax.jit(lambda: fresh_state(plan, build_models(exp)), out_shardings=shardings)()
    if any(s.config.init == "teacher" for s in exp.students):  # init_from_teacher copies from a whole model
        return jax.device_put(fresh_state(plan, build_models(exp)), shardings)
    target = placed.abstract_state().teacher.params
    params = source.placed_params(exp.teacher.config, exp.teacher.model, exp.config.train.seed, target)
    # everything else initialised in its shardings around the placed teacher, with no second teacher copy
    return jax.jit(lambda params: fresh_state(plan, build_models(exp, teacher=nnx.merge(plan.teacher.graph, params))),
                   out_shardings=shardings, donate_argnums=0)(params)


def jit_step(placed: Placement, warmup: int, *, with_students: bool):
    """The step under `jax.jit` with explicit in/out shardings, the state's buffers donated."""
    plan = placed.plan
    fn = lambda s, b: train_step(plan, s, b, with_students=with_students, student_step_offset=warmup)  # noqa: E731
    return jax.jit(fn, in_shardings=(placed.state_sharding, placed.micro_sharding),
                   out_shardings=(placed.state_sharding, None), donate_argnums=(0,))


def jit_eval(placed: Placement):
    """Summed validation statistics of a batch (`distill.step.eval_step`) under `jax.jit`."""
    plan = placed.plan
    return jax.jit(lambda s, b: eval_step(plan, s, b), in_shardings=(placed.state_sharding, placed.eval_sharding))


def batch_specs(exp: Experiment, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], type]]:
    """(shape, dtype) of each array of the step's batch; a cached teacher adds its top-k entries."""
    specs = {k: (shape, np.float32 if k == "mask" else np.int32) for k in BATCH_KEYS}
    if not exp.teacher.source.runs:
        k = read_meta(exp.config.teacher.path)["k"]
        specs.update(teacher_indices=((*shape, k), np.int32), teacher_log_probs=((*shape, k), np.float32),
                     teacher_label_log_prob=(shape, np.float32))
    return specs


# ----------------------------------------------------------------------------- from a config, for benchmarks and tests

def compiled_step(cfg: Config, *, with_students: bool = True):
    """The co-distillation step of `cfg` on its mesh (`with_students=False`: the teacher-only
    warm-up step), lowered and compiled from shapes alone (no weights, no data): `.as_text()` is
    the HLO whose collectives docs/sharding.md lists; calling it needs `initial_state` and a batch
    like `random_batch`'s."""
    exp = resolve(cfg)
    placed = placement(exp)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=placed.micro_sharding)
             for k, (shape, dtype) in batch_specs(exp, placed.micro_shape).items()}
    step = jit_step(placed, exp.teacher_warmup, with_students=with_students)
    return step.lower(placed.abstract_state(), batch).compile()


def initial_state(cfg: Config) -> TrainState:
    """The state a fresh run of `cfg` starts from, placed on its mesh (benchmarks, notebooks)."""
    exp = resolve(cfg)
    return placed_initial_state(exp, placement(exp))


def random_batch(cfg: Config, seed: int = 0) -> dict:
    """A batch of uniformly random tokens in the step's layout (one unpacked sequence per row); with
    a cached teacher, the top-k of random teacher logits."""
    exp = resolve(cfg)
    placed = placement(exp)
    shape = placed.micro_shape
    rng = np.random.default_rng(seed)
    vocab = exp.teacher.model.vocab_size  # students': the same
    ids = rng.integers(0, vocab, (*shape[:2], shape[2] + 1)).astype(np.int32)
    host = {"tokens": ids[..., :-1], "labels": ids[..., 1:], "mask": np.ones(shape, np.float32),
            "segment_ids": np.zeros(shape, np.int32),
            "positions": np.broadcast_to(np.arange(shape[2], dtype=np.int32), shape).copy()}
    specs = batch_specs(exp, shape)
    if "teacher_indices" in specs:
        logits = rng.normal(size=(*shape, vocab))
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        top = np.argsort(-log_probs, axis=-1)[..., :specs["teacher_indices"][0][-1]]
        host.update(teacher_indices=top.astype(np.int32),
                    teacher_log_probs=np.take_along_axis(log_probs, top, -1).astype(np.float32),
                    teacher_label_log_prob=np.take_along_axis(log_probs, host["labels"][..., None], -1)[..., 0]
                    .astype(np.float32))
    return {k: jax.device_put(v, placed.micro_sharding) for k, v in host.items()}
