"""A student's part of a step: its rows (data, or written by itself), its loss and its gradient.

Per token on data rows the loss is its `Objective`'s: `(1 - a) * CE + a * KD(target, student; T)`
(`losses.distillation_loss`) for a distilled student, plain CE for a control (which never sees the
teacher; its distance to it is measured, not trained on). On rows an on-policy student wrote, the
KD term alone. Then, as configured: difficulty filtering weighs its rows, router terms and router
distillation are added. Metrics come grouped by the rows they are means over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import losses
from distill import onpolicy
from distill.config import LossConfig
from distill.model import ModelOutput
from distill.model.sharding import ShardingContext
from distill.step.averages import tokens_per_micro_batch
from distill.step.state import Batch, forward
from distill.step.teacher import Targets, accuracy, expert_load, router_terms


@dataclass(frozen=True)
class Objective:
    data_loss: Callable  # (plan, logits, target, labels, mask, student step) -> (per-token loss, statistics)
    measured: Callable  # (plan, logits, target, mask) -> metrics measured on its data rows, not trained on


@dataclass(frozen=True)
class StudentPlan:
    name: str
    graph: Any  # nnx.GraphDef
    tx: optax.GradientTransformation
    loss: LossConfig
    objective: Objective  # OBJECTIVES["distilled"] or OBJECTIVES["control"]
    num_experts: int
    router_kd: bool  # router distillation active (equal MoE layer and expert counts)
    sharding: ShardingContext | None = None  # mesh + this student's logical-axis rules
    on_policy_rows: int = 0  # the first rows of every micro-batch the student writes itself (distill.onpolicy)


class StudentMicro(NamedTuple):
    """A student on one micro-batch."""

    metrics: dict[str, dict[str, jax.Array]]  # rows ("all", "data", "written") -> name -> mean over them
    expert_load: jax.Array  # [L_moe, E]
    logits: Any  # stop-gradient logits or losses.Head, for the teacher's mutual term
    row_scores: jax.Array | None  # [rows]: difficulty filtering's scores
    written: jax.Array | None  # [seq + 1]: the first row it wrote (on-policy)


class Turn(NamedTuple):
    """Where a student stands at this step."""

    step: jax.Array  # its own steps so far (the teacher's warm-up not counted): its weighting schedule's step
    writing: jax.Array | bool  # it writes its on-policy rows now (not before on_policy.start_step)
    stream: jax.Array  # which of the step's sampling keys is its own (micro-batch and student)


STATISTICS = ("ce", "kd", "alpha_p10", "alpha_p50", "alpha_p90", "teacher_wrong_frac")
"""The statistics of `losses.distillation_loss` a distilled student logs (and `alpha_mean` as `alpha`)."""


def _kd_term(logits, target, labels, mask, cfg: LossConfig) -> jax.Array:
    """The KD term alone, per token (its registry entry uses the labels if it needs them)."""
    return losses.KD_TERMS[cfg.kd](logits, target, labels, temperature=cfg.temperature, mask=mask, **cfg.kd_kwargs)


def _distillation_target(target, cfg: LossConfig):
    """What a student distils from: the teacher's logits, or its top `cfg.teacher_top_k` entries
    (of the live logits, or the first of a cache's) with `cfg.teacher_tail` for the rest."""
    k, tail = cfg.teacher_top_k, cfg.teacher_tail
    if isinstance(target, losses.SparseTeacher):
        return losses.SparseTeacher(target.indices[..., :k], target.log_probs[..., :k], tail)
    return target if k is None else losses.top_k_teacher(target, k, tail=tail)


# ----------------------------------------------------------------------------- objectives

def _distilled_loss(plan: StudentPlan, logits, target, labels, mask, student_step):
    cfg = plan.loss
    per_token, stats = losses.distillation_loss(
        logits, target, labels, step=student_step, weighting=cfg.weighting, kd=cfg.kd, kd_kwargs=cfg.kd_kwargs,
        temperature=cfg.temperature, mask=mask, label_smoothing=cfg.label_smoothing)
    return per_token, {"alpha": stats["alpha_mean"], **{key: stats[key] for key in STATISTICS}}


def _control_loss(plan: StudentPlan, logits, target, labels, mask, student_step):
    per_token = losses.cross_entropy(logits, labels, label_smoothing=plan.loss.label_smoothing, mask=mask)
    return per_token, {"ce": losses.token_mean(per_token, mask)}


def _nothing_measured(plan: StudentPlan, logits, target, mask) -> dict:
    return {}


def _distance_to_teacher(plan: StudentPlan, logits, target, mask) -> dict:
    """The control's distance to the teacher, measured, never trained on."""
    logits = jax.lax.stop_gradient(logits)
    kd = losses.forward_kl(logits, target, temperature=plan.loss.temperature, mask=mask)
    return {"kd": losses.token_mean(kd, mask), "alpha": jnp.zeros(())}


OBJECTIVES: dict[str, Objective] = {
    "distilled": Objective(_distilled_loss, _nothing_measured),
    "control": Objective(_control_loss, _distance_to_teacher),
}


# ----------------------------------------------------------------------------- rows

def writes(plan: StudentPlan, student_step) -> jax.Array | bool:
    """Whether the student writes its on-policy rows at this step (off-policy before start_step)."""
    if not plan.on_policy_rows or not plan.loss.on_policy.start_step:
        return bool(plan.on_policy_rows)
    return student_step >= plan.loss.on_policy.start_step


def token_counts(plan: StudentPlan, mask: jax.Array, writing) -> dict[str, jax.Array]:
    """[grad_accum] per row group: the tokens the student trains on in each micro-batch ("all": what
    weighs its gradients), its data rows' tokens ("data") and its written rows ("written", one per
    micro-batch: their metrics are means over micro-batches). Written rows count the tokens the
    student sampled, `seq + 1 - prompt_tokens` each (the mask `distill.onpolicy.student_rows` gives
    them), whatever the data rows they replace held; every micro-batch writes as many."""
    n = plan.on_policy_rows
    data_rows = tokens_per_micro_batch(mask[:, n:])
    written = n * (mask.shape[-1] + 1 - plan.loss.on_policy.prompt_tokens)
    return {"all": jnp.where(writing, written + data_rows, tokens_per_micro_batch(mask)), "data": data_rows,
            "written": jnp.ones_like(data_rows)}


def with_written_rows(plan: StudentPlan, params, mb: Batch, targets: Targets, score: Callable,
                      key) -> tuple[Batch, Targets]:
    """The micro-batch with its first `plan.on_policy_rows` rows replaced by the student's own
    continuations, and the distillation target's logits (and router logits) on them; `score` runs
    the target on a batch."""
    n, seq = plan.on_policy_rows, mb["tokens"].shape[1]
    # Sampled outside the student's sharding context: a decode step's few tokens (one per row) need
    # not split over the expert-parallel shards, and XLA places the small decode from the params.
    written = onpolicy.student_rows(nnx.merge(plan.graph, params), mb["tokens"][:n], plan.loss.on_policy, key)
    scored = score(written)
    batch = {k: jnp.concatenate([written[k].astype(v.dtype), v[n:]]) if k in written else v for k, v in mb.items()}
    logits = _concatenate_rows(scored.logits, targets.logits[n:])
    router = jnp.concatenate([scored.router_logits, targets.router_logits[:, n * seq:]], axis=1)
    return batch, Targets(jax.lax.stop_gradient(logits), jax.lax.stop_gradient(router), targets.judgement)


def _concatenate_rows(first, rest):
    """Logits (or `losses.Head`s of the same weight: the target's) of two sets of rows, as one."""
    if isinstance(first, losses.Head):
        return losses.Head(jnp.concatenate([first.hidden, rest.hidden]), rest.weight)
    return jnp.concatenate([first, rest])


# ----------------------------------------------------------------------------- the loss

def _written_rows_loss(plan: StudentPlan, out: ModelOutput, batch: Batch, target_logits, turn: Turn):
    """(per-token loss, metrics) on the rows the student wrote: its KD term alone (while it writes)."""
    n, cfg, writing = plan.on_policy_rows, plan.loss, turn.writing
    mask, labels = batch["mask"][:n] > 0, batch["labels"][:n]
    head_target = _distillation_target(target_logits[:n], cfg)
    loss = _kd_term(out.logits[:n], head_target, labels, mask, cfg)
    if cfg.on_policy.start_step:  # before it, rows [:n] are still data rows
        data_head, _ = plan.objective.data_loss(plan, out.logits[:n], head_target, labels, mask, turn.step)
        loss = jnp.where(writing, loss, data_head)
    metrics = {"on_policy_kd": jnp.where(writing, losses.token_mean(loss, mask), 0.0),
               "on_policy_teacher_nll": jnp.where(writing, losses.token_mean(
                   losses.cross_entropy(target_logits[:n], labels, mask=mask), mask), 0.0),
               "on_policy_writing": jnp.asarray(writing, jnp.float32)}
    return loss, metrics


def _filter_weights(plan: StudentPlan, out: ModelOutput, batch: Batch, judgement):
    """(the token weights of the student's loss, filter metrics, row scores): the easiest rows of
    the micro-batch weigh `filter.weight` (difficulty filtering), the others 1."""
    mask, cfg = batch["mask"] > 0, plan.loss.filter
    if not cfg.active:
        return mask, {}, None
    label_log_prob, top1 = judgement
    scores = losses.row_scores(cfg.score, teacher_label_log_prob=label_log_prob, teacher_top1=top1,
                               student_logits=out.logits, labels=batch["labels"], mask=mask)
    kept, stats = losses.row_weights(scores, mask, cfg)
    return mask * kept[:, None], stats, scores


def _router_kd(out: ModelOutput, target_router, token_weights) -> jax.Array:
    token_mask = jnp.broadcast_to((token_weights > 0).reshape(-1), out.router_logits.shape[:2])
    return jnp.sum(jax.vmap(losses.token_mean)(
        losses.router_distillation(out.router_logits, target_router, mask=token_mask), token_mask))


def _router_entropy(out: ModelOutput) -> jax.Array:
    if out.router_logits.shape[0] == 0:
        return jnp.zeros(())
    p = jax.nn.softmax(out.router_logits, axis=-1)
    return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))


def student_loss(params, plan: StudentPlan, batch: Batch, targets: Targets,
                 turn: Turn) -> tuple[jax.Array, StudentMicro]:
    """The student's loss on a micro-batch (rows [:on_policy_rows] it wrote, the rest data), and what
    to log of it."""
    target_logits = targets.logits
    out = forward(plan.graph, params, batch, plan.sharding, fused_head=plan.loss.fused_head)
    mask, labels, cfg, n = batch["mask"] > 0, batch["labels"], plan.loss, plan.on_policy_rows
    metrics = {"all": {}, "data": {}, "written": {}}
    per_token = []
    if n:
        written_loss, metrics["written"] = _written_rows_loss(plan, out, batch, target_logits, turn)
        per_token.append(written_loss)
    data_target = _distillation_target(target_logits[n:] if n else target_logits, cfg)
    if n < labels.shape[0]:
        data_loss, metrics["data"] = plan.objective.data_loss(plan, out.logits[n:], data_target, labels[n:], mask[n:],
                                                              turn.step)
        per_token.append(data_loss)
        metrics["data"]["accuracy"] = accuracy(out.logits[n:], labels[n:], batch["mask"][n:])
    token_weights, metrics["all"], scores = _filter_weights(plan, out, batch, targets.judgement)
    main = losses.token_mean(jnp.concatenate(per_token), token_weights)
    balance, z = router_terms(out.router_logits, out.expert_indices, token_weights > 0, plan.num_experts)
    total = main + cfg.load_balance_weight * balance + cfg.router_z_weight * z
    metrics["all"].update(loss=main, load_balance=balance, z_loss=z)
    if plan.router_kd:
        router_kd = _router_kd(out, targets.router_logits, token_weights)
        total = total + cfg.router_kd_weight * router_kd
        metrics["all"]["router_kd"] = router_kd
    metrics["data"].update(plan.objective.measured(plan, out.logits, data_target, mask))
    metrics["all"]["router_entropy"] = _router_entropy(out)
    metrics["all"]["dropped_fraction"] = (jnp.mean(out.dropped_fraction) if out.dropped_fraction.size
                                          else jnp.zeros(()))
    written = jnp.append(batch["tokens"][0], batch["labels"][0, -1]) if n else None
    return total, StudentMicro(metrics, expert_load(out.expert_counts), jax.lax.stop_gradient(out.logits),
                               scores, written)
