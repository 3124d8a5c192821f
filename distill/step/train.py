"""One optimizer step of the teacher and every student: `(state, batch) -> (state', metrics)`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from distill.optim import apply_finite, current_lr
from distill.step import averages
from distill.step.state import Batch, ModelState, TrainState, forward
from distill.step.student import StudentMicro, StudentPlan, Turn, student_loss, token_counts, with_written_rows, writes
from distill.step.teacher import Targets, TeacherPlan, distillation_targets, expert_load, target_params


@dataclass(frozen=True)
class StepPlan:
    """Everything static about the step: the teacher's and each student's graphs, optimizers and losses."""

    teacher: TeacherPlan
    students: tuple[StudentPlan, ...]
    grad_accum: int
    debug_nonfinite_step: int | None = None  # testing hook: every gradient is NaN at this step
    seed: int = 0  # of the on-policy students' sampling (a key per step, micro-batch and student)


class Gradients(NamedTuple):
    teacher: Any  # None when the teacher does not train
    students: tuple


class MicroBatch(NamedTuple):
    """What the scan over micro-batches reads: the rows, and how much each model's gradient and
    metrics weigh in this micro-batch."""

    batch: Batch
    index: jax.Array
    teacher_tokens: jax.Array
    student_tokens: tuple[dict[str, jax.Array], ...]


class MicroOutput(NamedTuple):
    teacher: averages.Sums
    students: tuple[averages.Sums, ...]
    row_scores: tuple  # per student: [rows] or None
    written: tuple  # per student: [seq + 1] or None


def train_step(plan: StepPlan, state: TrainState, batch: Batch, *, with_students: bool = True,
               student_step_offset: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step of the teacher (if it trains) and, `with_students`, of every student.

    `batch` holds the global batch as micro-batches `[grad_accum, rows, seq]`. Each micro-batch's
    gradients are weighted by its share of the tokens a model trains on (an on-policy student's
    written rows count their sampled tokens), so accumulation equals one step on the whole batch
    (for the token-mean losses); its metrics are sums and counts. `student_step_offset` (the
    teacher warm-up) is subtracted from the step for the students' weighting schedules.
    """
    students = plan.students if with_students else ()
    student_step = state.step - student_step_offset
    writing = tuple(writes(sp, student_step) for sp in students)
    mask = batch["mask"]
    micro_batches = MicroBatch(batch, jnp.arange(mask.shape[0]), averages.tokens_per_micro_batch(mask),
                               tuple(token_counts(sp, mask, w) for sp, w in zip(students, writing)))
    teacher_shares = averages.shares(micro_batches.teacher_tokens)
    student_shares = tuple(averages.shares(counts["all"]) for counts in micro_batches.student_tokens)

    def micro(grads: Gradients, xs: tuple[MicroBatch, jax.Array, tuple]):
        mb, teacher_share, shares = xs
        # 1. the teacher's pass, and what the students distil from
        teacher = plan.teacher.kind.run(plan.teacher, state.teacher.params, mb.batch)
        targets = distillation_targets(plan.teacher, state, mb.batch, teacher, bool(students),
                                       judge=any(sp.loss.filter.active for sp in students))
        # 2. each student's gradient
        learned, student_grads = [], []
        for i, (acc, share) in enumerate(zip(grads.students, shares)):
            turn = Turn(student_step, writing[i], mb.index * len(students) + i)
            s_grads, out = _student_gradients(plan, state, i, mb.batch, targets, turn)
            student_grads.append(jax.tree.map(lambda a, g: a + share * g, acc, s_grads))
            learned.append(out)
        # 3. the teacher's own gradient (its mutual term reads the students' logits)
        teacher_grads, teacher_metrics = plan.teacher.kind.learn(plan.teacher, teacher, mb.batch,
                                                                 [out.logits for out in learned])
        if teacher_grads is not None:
            teacher_grads = jax.tree.map(lambda a, g: a + teacher_share * g, grads.teacher, teacher_grads)
        if teacher.expert_counts is not None:
            teacher_metrics["expert_load"] = expert_load(teacher.expert_counts)
        return Gradients(teacher_grads, tuple(student_grads)), MicroOutput(
            averages.weighted(teacher_metrics, mb.teacher_tokens),
            tuple(_student_sums(out, counts) for out, counts in zip(learned, mb.student_tokens)),
            tuple(out.row_scores for out in learned), tuple(out.written for out in learned))

    zeros = lambda params: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    init = Gradients(zeros(state.teacher.params) if plan.teacher.tx is not None else None,
                     tuple(zeros(s.params) for s in state.students[:len(students)]))
    grads, outputs = jax.lax.scan(micro, init, (micro_batches, teacher_shares, student_shares))
    # 4. apply
    return _apply(plan, state, students, _poisoned(plan, state, grads), outputs)


def _student_gradients(plan: StepPlan, state: TrainState, index: int, mb: Batch, targets: Targets,
                       turn: Turn) -> tuple[Any, StudentMicro]:
    """Student `index`'s gradient on a micro-batch, first writing its on-policy rows if it has any
    (sampled with a key of its own: the step's, and its turn's stream)."""
    sp, params = plan.students[index], state.students[index].params
    if sp.on_policy_rows:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(plan.seed), state.step), turn.stream)
        score = lambda rows: forward(plan.teacher.graph, target_params(plan.teacher, state), rows,  # noqa: E731
                                     plan.teacher.sharding, fused_head=plan.teacher.fused_head)
        write = lambda: with_written_rows(sp, params, mb, targets, score, key)  # noqa: E731
        if sp.loss.on_policy.start_step:  # off-policy (no sampling at all) before it
            mb, targets = jax.lax.cond(turn.writing, write, lambda: (mb, targets))
        else:
            mb, targets = write()
    (_, out), grads = jax.value_and_grad(student_loss, has_aux=True)(params, sp, mb, targets, turn)
    return grads, out


def _student_sums(out: StudentMicro, counts: dict[str, jax.Array]) -> averages.Sums:
    """A student's metrics as sums and counts, each over the rows it is a mean over; its expert load
    over every token it trains on."""
    sums = {}
    for rows, metrics in out.metrics.items():
        sums.update(averages.weighted(metrics, counts[rows]))
    sums.update(averages.weighted({"expert_load": out.expert_load}, counts["all"]))
    return sums


def _poisoned(plan: StepPlan, state: TrainState, grads: Gradients) -> Gradients:
    """Testing hook (`train.debug_nonfinite_step`): every gradient is NaN at that step."""
    if plan.debug_nonfinite_step is None:
        return grads
    poison = jnp.where(state.step + 1 == plan.debug_nonfinite_step, jnp.nan, 1.0)
    return jax.tree.map(lambda g: g * poison, grads)


def _apply(plan: StepPlan, state: TrainState, students: tuple[StudentPlan, ...], grads: Gradients,
           outputs: MicroOutput) -> tuple[TrainState, dict[str, jax.Array]]:
    """Each model's optimizer update (skipped for a non-finite gradient), the distillation target's
    update, the skip counters, and the step's metrics."""
    updated = [jnp.bool_(True)] * (1 + len(state.students))  # a model that does not step is not skipped
    metrics = {f"teacher/{k}": v for k, v in averages.means(averages.over_micro_batches(outputs.teacher)).items()}
    teacher, target = state.teacher, state.target
    if plan.teacher.tx is not None:
        metrics["teacher/grad_norm"] = optax.tree.norm(grads.teacher)
        params, opt_state, updated[0] = apply_finite(plan.teacher.tx, teacher.params, teacher.opt_state, grads.teacher)
        teacher = ModelState(params=params, opt_state=opt_state)
        metrics["teacher/lr"] = current_lr(opt_state)
        if plan.teacher.target.separate:
            target = plan.teacher.target.follow(plan.teacher.config, target, params, state.step)
    new_students = list(state.students)
    for i, (sp, s_grads) in enumerate(zip(students, grads.students)):
        prefix = f"student/{sp.name}/"
        sums = averages.over_micro_batches(outputs.students[i])
        metrics.update({prefix + k: v for k, v in averages.means(sums).items()})
        if outputs.row_scores[i] is not None:  # [grad_accum, rows]: the trainer logs the easiest and hardest rows
            metrics[prefix + "filter_row_scores"] = outputs.row_scores[i]
        if outputs.written[i] is not None:  # [seq + 1]: the trainer logs the last micro-batch's first written row
            metrics[prefix + "on_policy_written"] = outputs.written[i][-1]
        metrics[prefix + "grad_norm"] = optax.tree.norm(s_grads)
        params, opt_state, updated[1 + i] = apply_finite(sp.tx, state.students[i].params,
                                                         state.students[i].opt_state, s_grads)
        new_students[i] = ModelState(params=params, opt_state=opt_state)
        metrics[prefix + "lr"] = current_lr(opt_state)
    skipped_now = ~jnp.stack(updated)
    skipped = state.skipped + skipped_now.astype(jnp.int32)
    last_skipped = jnp.where(skipped_now, state.step + 1, state.last_skipped)
    metrics["teacher/skipped_updates"] = skipped[0]
    for i, sp in enumerate(students):
        metrics[f"student/{sp.name}/skipped_updates"] = skipped[1 + i]
    new_state = TrainState(step=state.step + 1, teacher=teacher, target=target, students=tuple(new_students),
                           skipped=skipped, last_skipped=last_skipped)
    return new_state, metrics
