"""The teacher's part of a step: its pass over a micro-batch, what the students distil from, and
its own update.

How the teacher takes part is a `TeacherKind` (`TEACHER_KINDS`): "co_trained" (its forward keeps a
VJP, and after the students it pulls back the gradient of its own loss: CE on the labels + router
terms + an optional mutual term towards the students), "frozen" (a forward, no gradient) or
"cached" (no forward: its top-k entries come with the batch). What the students distil from is a
`Target` (`TARGETS`): the live teacher, or a separate copy of its parameters that follows it as an
exponential moving average ("ema") or is refreshed every so many steps ("stale").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import losses
from distill.config import TeacherConfig
from distill.model.sharding import ShardingContext
from distill.step.state import Batch, TrainState, forward


class TeacherPass(NamedTuple):
    """The teacher on one micro-batch. `logits` is a `losses.SparseTeacher` for a cached teacher,
    which has no router or expert counts; `pullback` maps a cotangent of (logits, router logits)
    to parameter gradients for a co-trained teacher, else None."""

    logits: Any
    router_logits: jax.Array | None
    expert_indices: jax.Array | None
    expert_counts: jax.Array | None
    pullback: Callable | None


@dataclass(frozen=True)
class TeacherKind:
    run: Callable[[TeacherPlan, Any, Batch], TeacherPass]  # (plan, params, micro-batch) -> its pass
    learn: Callable  # (plan, its pass, micro-batch, students' logits) -> (gradients or None, metrics)
    evaluate: Callable  # (plan, params, batch) -> (what students are compared with, top-1, nats per token)


@dataclass(frozen=True)
class Target:
    separate: bool  # a copy of the teacher's parameters in TrainState.target
    follow: Callable  # (teacher config, target, the teacher's new parameters, step) -> the new target


@dataclass(frozen=True)
class TeacherPlan:
    kind: TeacherKind
    target: Target
    graph: Any  # nnx.GraphDef; None for a cached teacher
    tx: optax.GradientTransformation | None  # None: the teacher does not train
    config: TeacherConfig  # its loss weights, mutual weight, EMA decay, refresh interval
    num_experts: int
    sharding: ShardingContext | None = None  # mesh + the teacher's logical-axis rules
    fused_head: bool = False  # its forward returns a losses.Head, not logits (the run's loss.fused_head)


def cached_teacher(batch: Batch) -> losses.SparseTeacher:
    """The teacher of an offline cache: its top-k entries, carried by the batch."""
    return losses.SparseTeacher(batch["teacher_indices"], batch["teacher_log_probs"])


def accuracy_of(predicted: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    return losses.token_mean((predicted == labels).astype(jnp.float32), mask)


def accuracy(logits, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Top-1 accuracy of logits or a `losses.Head`."""
    return accuracy_of(losses.top1(logits), labels, mask > 0)


def router_terms(router_logits, expert_indices, mask: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """(load balance, z-loss), summed over MoE layers (0 for a model without MoE layers)."""
    if router_logits.shape[0] == 0:
        return jnp.zeros(()), jnp.zeros(())
    token_mask = jnp.broadcast_to(mask.reshape(-1) > 0, router_logits.shape[:2])
    balance = losses.load_balancing_loss(router_logits, expert_indices, num_experts=num_experts, mask=token_mask)
    z = jax.vmap(losses.token_mean)(losses.router_z_loss(router_logits, mask=token_mask), token_mask)
    return jnp.sum(balance), jnp.sum(z)


def expert_load(counts: jax.Array) -> jax.Array:
    """Fraction of assignments per expert, `[L_moe, E]`, from assignment counts."""
    counts = counts.astype(jnp.float32)
    return counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)


# ----------------------------------------------------------------------------- kinds

def _forward_pass(plan: TeacherPlan, params, mb: Batch) -> TeacherPass:
    out = forward(plan.graph, params, mb, plan.sharding, fused_head=plan.fused_head)
    return TeacherPass(out.logits, out.router_logits, out.expert_indices, out.expert_counts, None)


def _differentiable_pass(plan: TeacherPlan, params, mb: Batch) -> TeacherPass:
    def teacher_forward(params):
        out = forward(plan.graph, params, mb, plan.sharding, fused_head=plan.fused_head)
        return (out.logits, out.router_logits), (out.expert_indices, out.expert_counts)
    (logits, router), pullback, (indices, counts) = jax.vjp(teacher_forward, params, has_aux=True)
    return TeacherPass(logits, router, indices, counts, pullback)


def _cached_pass(plan: TeacherPlan, params, mb: Batch) -> TeacherPass:
    return TeacherPass(cached_teacher(mb), None, None, None, None)


def _teacher_loss(outputs, batch: Batch, cfg: TeacherConfig, num_experts: int, student_logits):
    logits, router_logits, expert_indices = outputs
    mask, labels = batch["mask"] > 0, batch["labels"]
    ce = losses.token_mean(losses.cross_entropy(logits, labels, mask=mask), mask)
    balance, z = router_terms(router_logits, expert_indices, mask, num_experts)
    total = ce + cfg.load_balance_weight * balance + cfg.router_z_weight * z
    metrics = {"ce": ce, "load_balance": balance, "z_loss": z}
    if cfg.mutual_weight > 0 and student_logits:
        mutual = jnp.mean(jnp.stack([losses.token_mean(losses.forward_kl(logits, s, mask=mask), mask)
                                     for s in student_logits]))
        total = total + cfg.mutual_weight * mutual
        metrics["mutual"] = mutual
    metrics["loss"] = total
    return total, metrics


def _learn_co_trained(plan: TeacherPlan, teacher: TeacherPass, mb: Batch, student_logits):
    metrics = {"accuracy": accuracy(teacher.logits, mb["labels"], mb["mask"])}
    loss_fn = lambda outs: _teacher_loss(  # noqa: E731
        (*outs, teacher.expert_indices), mb, plan.config, plan.num_experts, student_logits)
    (_, loss_metrics), cotangent = jax.value_and_grad(loss_fn, has_aux=True)((teacher.logits, teacher.router_logits))
    (grads,) = teacher.pullback(cotangent)
    return grads, {**metrics, **loss_metrics}


def _learn_frozen(plan: TeacherPlan, teacher: TeacherPass, mb: Batch, student_logits):
    mask = mb["mask"] > 0
    return None, {"accuracy": accuracy(teacher.logits, mb["labels"], mb["mask"]),
                  "ce": losses.token_mean(losses.cross_entropy(teacher.logits, mb["labels"], mask=mask), mask)}


def _learn_cached(plan: TeacherPlan, teacher: TeacherPass, mb: Batch, student_logits):
    """The cache holds the label's log-probability: the CE is exact."""
    mask = mb["mask"] > 0
    return None, {"accuracy": accuracy_of(mb["teacher_indices"][..., 0], mb["labels"], mask),
                  "ce": losses.token_mean(-mb["teacher_label_log_prob"], mask)}


def _evaluate_model(plan: TeacherPlan, params, batch: Batch):
    logits = forward(plan.graph, params, batch, plan.sharding, fused_head=plan.fused_head).logits
    return logits, losses.top1(logits), losses.cross_entropy(logits, batch["labels"], mask=batch["mask"] > 0)


def _evaluate_cached(plan: TeacherPlan, params, batch: Batch):
    """Exact CE and top-1; students are compared with its top-k (uniform tail)."""
    return cached_teacher(batch), batch["teacher_indices"][..., 0], -batch["teacher_label_log_prob"]


TEACHER_KINDS: dict[str, TeacherKind] = {
    "co_trained": TeacherKind(_differentiable_pass, _learn_co_trained, _evaluate_model),
    "frozen": TeacherKind(_forward_pass, _learn_frozen, _evaluate_model),
    "cached": TeacherKind(_cached_pass, _learn_cached, _evaluate_cached),
}


# ----------------------------------------------------------------------------- targets

def _stays_live(cfg: TeacherConfig, target, params, step):
    return None


def _moving_average(cfg: TeacherConfig, target, params, step):
    decay = cfg.ema_decay
    return jax.tree.map(lambda t, p: decay * t + (1.0 - decay) * p, target, params)


def _refreshed(cfg: TeacherConfig, target, params, step):
    refresh = (step + 1) % cfg.refresh_every == 0
    return jax.tree.map(lambda t, p: jnp.where(refresh, p, t), target, params)


TARGETS: dict[str, Target] = {
    "live": Target(False, _stays_live),
    "ema": Target(True, _moving_average),
    "stale": Target(True, _refreshed),
}


def target_params(plan: TeacherPlan, state: TrainState):
    """The parameters the students distil from."""
    return state.target if plan.target.separate else state.teacher.params


class Targets(NamedTuple):
    """What the students distil from on a micro-batch, without gradient."""

    logits: Any  # [rows, seq, V], a losses.Head, or a losses.SparseTeacher
    router_logits: jax.Array | None  # [L_moe, rows * seq, E]; None for a cached teacher
    judgement: tuple | None  # (log p_T(label), top-1) per token when a student filters rows by difficulty


def distillation_targets(plan: TeacherPlan, state: TrainState, mb: Batch, teacher: TeacherPass,
                         with_students: bool, judge: bool) -> Targets:
    """The teacher's own pass, or the separate target's forward; with `judge`, its judgement of the rows."""
    if plan.target.separate and with_students:
        out = forward(plan.graph, state.target, mb, plan.sharding, fused_head=plan.fused_head)
        logits, router = out.logits, out.router_logits
    else:
        logits, router = teacher.logits, teacher.router_logits
    logits, router = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(router)
    return Targets(logits, router, teacher_judgement(logits, mb) if judge else None)


def teacher_judgement(target, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(log p_T(label), the teacher's top-1) per token, what difficulty filtering scores rows by."""
    if isinstance(target, losses.SparseTeacher):  # a cache holds the label's log-probability
        return batch["teacher_label_log_prob"], target.indices[..., 0]
    return -losses.cross_entropy(target, batch["labels"], mask=batch["mask"] > 0), losses.top1(target)
