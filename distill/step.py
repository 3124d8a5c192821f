"""The co-distillation step: one pure function `(state, batch) -> (state', metrics)`.

1. Teacher forward, once per micro-batch. A trainable teacher keeps the VJP of that forward and
   later pulls back the gradient of its own loss (CE + router aux + optional mutual term), so the
   same forward serves the students and the teacher's update.
2. Each student: forward, per-token `(1 - a) * CE + a * KD(target teacher, student; T)` from
   `losses.distillation_loss` (a control student: plain CE), + router aux; gradients w.r.t. the
   student's parameters only. The teacher logits are `stop_gradient`: no student loss reaches the
   teacher.
3. optax updates per model; the distillation target (EMA or stale copy) follows the teacher.
Metrics come back as device arrays; the trainer reads them only at logging intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

import losses
from distill import onpolicy
from distill.config import LossConfig, OptimConfig, TeacherConfig
from distill.model import ModelOutput
from distill.model.sharding import ShardingContext, use_sharding

Batch = dict[str, jax.Array]  # tokens, labels, mask, segment_ids, positions: [rows, seq]
# (train_step takes them as micro-batches, [grad_accum, rows, seq]); with a cached teacher also
# teacher_indices, teacher_log_probs [..., k] and teacher_label_log_prob (teacher/cache.py)


@struct.dataclass
class ModelState:
    params: Any  # nnx.State of the model's nnx.Param variables
    opt_state: Any  # optax state; None for a frozen teacher


@struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps completed (teacher warm-up included)
    teacher: ModelState
    target: Any  # params the students distil from when teacher.target is ema/stale, else None
    students: tuple[ModelState, ...]
    skipped: jax.Array  # int32 [1 + students]: updates skipped for a non-finite gradient (teacher first)
    last_skipped: jax.Array  # int32 [1 + students]: the step of the latest one (-1: none)


@dataclass(frozen=True)
class StudentPlan:
    name: str
    graph: Any  # nnx.GraphDef
    tx: optax.GradientTransformation
    loss: LossConfig
    control: bool
    num_experts: int
    router_kd: bool  # router distillation active (equal MoE layer and expert counts)
    sharding: ShardingContext | None = None  # mesh + this student's logical-axis rules
    on_policy_rows: int = 0  # the first rows of every micro-batch the student writes itself (distill.onpolicy)


@dataclass(frozen=True)
class StepPlan:
    """Everything static about the step: graphs, optimizers, losses, teacher mode."""

    teacher_graph: Any  # None: a cached teacher (its top-k entries come with the batch)
    teacher_tx: optax.GradientTransformation | None  # None: frozen teacher
    teacher: TeacherConfig
    teacher_experts: int
    students: tuple[StudentPlan, ...]
    grad_accum: int
    teacher_sharding: ShardingContext | None = None  # mesh + the teacher's logical-axis rules
    debug_nonfinite_step: int | None = None  # testing hook: every gradient is NaN at this step
    seed: int = 0  # of the on-policy students' sampling (a key per step, micro-batch and student)


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   per_parameter: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """AdamW + warm-up/decay schedule + global-norm clipping; no weight decay on 1-D params (norms).
    `per_parameter` (MetaP's learning-rate multipliers) scales the final updates."""
    peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = peak * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end)
    elif cfg.schedule == "linear":
        schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                         optax.linear_schedule(peak, end, max(total_steps - warmup, 1))], [warmup])
    else:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                        [warmup])
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    parts = ([optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []) + [adamw]
    return optax.chain(*parts, *([per_parameter] if per_parameter else []))


def current_lr(opt_state) -> jax.Array:
    """The schedule's learning rate now (before any per-parameter multiplier)."""
    return next(s for s in opt_state if hasattr(s, "hyperparams")).hyperparams["learning_rate"]


def forward(graph, params, batch: Batch, sharding: ShardingContext | None = None) -> ModelOutput:
    """The model's forward, traced under its sharding context (activation hints, expert parallelism)."""
    with use_sharding(sharding):
        model = nnx.merge(graph, params)
        return model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                     images=batch.get("images"))  # an image-and-text batch (data.source=digits)


def _router_terms(router_logits, expert_indices, mask: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """(load balance, z-loss), summed over MoE layers (0 for a model without MoE layers)."""
    if router_logits.shape[0] == 0:
        return jnp.zeros(()), jnp.zeros(())
    token_mask = jnp.broadcast_to(mask.reshape(-1) > 0, router_logits.shape[:2])
    balance = losses.load_balancing_loss(router_logits, expert_indices, num_experts=num_experts, mask=token_mask)
    z = jax.vmap(losses.token_mean)(losses.router_z_loss(router_logits, mask=token_mask), token_mask)
    return jnp.sum(balance), jnp.sum(z)


def _expert_load(out: ModelOutput) -> jax.Array:
    """Fraction of assignments per expert, `[L_moe, E]`."""
    counts = out.expert_counts.astype(jnp.float32)
    return counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)


def _router_entropy(out: ModelOutput) -> jax.Array:
    if out.router_logits.shape[0] == 0:
        return jnp.zeros(())
    p = jax.nn.softmax(out.router_logits, axis=-1)
    return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))


def _accuracy_of(predicted: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    return losses.token_mean((predicted == labels).astype(jnp.float32), mask)


def _accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    return _accuracy_of(jnp.argmax(logits, -1), labels, mask > 0)


def cached_teacher(batch: Batch) -> losses.SparseTeacher:
    """The teacher of an offline cache: its top-k entries, carried by the batch."""
    return losses.SparseTeacher(batch["teacher_indices"], batch["teacher_log_probs"])


def _distillation_target(target, cfg: LossConfig):
    """What a student distils from: the teacher's logits, or its top `cfg.teacher_top_k` entries
    (of the live logits, or the first of a cache's) with `cfg.teacher_tail` for the rest."""
    k, tail = cfg.teacher_top_k, cfg.teacher_tail
    if isinstance(target, losses.SparseTeacher):
        return losses.SparseTeacher(target.indices[..., :k], target.log_probs[..., :k], tail)
    return target if k is None else losses.top_k_teacher(target, k, tail=tail)


def _teacher_judgement(target, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(log p_T(label), the teacher's top-1) per token, what difficulty filtering scores rows by."""
    if isinstance(target, losses.SparseTeacher):  # a cache holds the label's log-probability
        return batch["teacher_label_log_prob"], target.indices[..., 0]
    return -losses.cross_entropy(target, batch["labels"], mask=batch["mask"] > 0), jnp.argmax(target, -1)


def _with_student_rows(plan: StepPlan, state: TrainState, sp: StudentPlan, params, mb: Batch, target_logits,
                       target_router, key):
    """The micro-batch with its first `sp.on_policy_rows` rows replaced by the student's own
    continuations, and the distillation target's logits (and router logits) on them."""
    n, seq = sp.on_policy_rows, mb["tokens"].shape[1]
    # Sampled outside the student's sharding context: a decode step's few tokens (one per row) need
    # not split over the expert-parallel shards, and XLA places the small decode from the params.
    written = onpolicy.student_rows(nnx.merge(sp.graph, params), mb["tokens"][:n], sp.loss.on_policy, key)
    teacher_params = state.teacher.params if state.target is None else state.target
    scored = forward(plan.teacher_graph, teacher_params, written, plan.teacher_sharding)
    batch = {k: jnp.concatenate([written[k].astype(v.dtype), v[n:]]) if k in written else v for k, v in mb.items()}
    logits = jnp.concatenate([scored.logits, target_logits[n:]])
    router = jnp.concatenate([scored.router_logits, target_router[:, n * seq:]], axis=1)
    return batch, jax.lax.stop_gradient(logits), jax.lax.stop_gradient(router)


def _kd_term(student_logits, target, labels, mask, cfg: LossConfig) -> jax.Array:
    """The student's KD term alone, per token: what trains it on the rows it wrote."""
    kd = losses.KD_LOSSES[cfg.kd]
    args = (student_logits, target, labels) if cfg.kd == "dkd" else (student_logits, target)
    return kd(*args, temperature=cfg.temperature, mask=mask, **cfg.kd_kwargs)


def _data_loss(plan: StudentPlan, logits, target, labels, mask, student_step) -> tuple[jax.Array, dict]:
    """Per token on data rows: `(1 - a) * CE + a * KD`, or plain CE for a control."""
    cfg = plan.loss
    if plan.control:
        per_token = losses.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing, mask=mask)
        return per_token, {"ce": losses.token_mean(per_token, mask)}
    return losses.distillation_loss(logits, target, labels, step=student_step, weighting=cfg.weighting, kd=cfg.kd,
                                    kd_kwargs=cfg.kd_kwargs, temperature=cfg.temperature, mask=mask,
                                    label_smoothing=cfg.label_smoothing)


def _student_loss(params, plan: StudentPlan, batch: Batch, target_logits, target_router, student_step, judgement,
                  writing):
    out = forward(plan.graph, params, batch, plan.sharding)
    mask, labels, cfg = batch["mask"] > 0, batch["labels"], plan.loss
    n = plan.on_policy_rows  # rows [:n] the student wrote (KD only), rows [n:] data
    metrics, scores, stats, per_token = {}, None, {}, []
    if n:  # `writing`: False before on_policy.start_step, when rows [:n] are still data rows
        head_target = _distillation_target(target_logits[:n], cfg)
        written_loss = _kd_term(out.logits[:n], head_target, labels[:n], mask[:n], cfg)
        if cfg.on_policy.start_step:
            data_head, _ = _data_loss(plan, out.logits[:n], head_target, labels[:n], mask[:n], student_step)
            written_loss = jnp.where(writing, written_loss, data_head)
        metrics["on_policy_kd"] = jnp.where(writing, losses.token_mean(written_loss, mask[:n]), 0.0)
        metrics["on_policy_teacher_nll"] = jnp.where(writing, losses.token_mean(
            losses.cross_entropy(target_logits[:n], labels[:n], mask=mask[:n]), mask[:n]), 0.0)
        metrics["on_policy_writing"] = jnp.asarray(writing, jnp.float32)
        per_token.append(written_loss)
    data_target = _distillation_target(target_logits[n:] if n else target_logits, cfg)
    if n < labels.shape[0]:
        data_loss, stats = _data_loss(plan, out.logits[n:], data_target, labels[n:], mask[n:], student_step)
        per_token.append(data_loss)
        metrics["accuracy"] = _accuracy(out.logits[n:], labels[n:], batch["mask"][n:])
    per_token = jnp.concatenate(per_token)
    token_weights = mask
    if cfg.filter.active:  # the easiest rows of the micro-batch weigh cfg.filter.weight
        label_log_prob, top1 = judgement
        scores = losses.row_scores(cfg.filter.score, teacher_label_log_prob=label_log_prob, teacher_top1=top1,
                                   student_logits=out.logits, labels=labels, mask=mask)
        kept, filter_stats = losses.row_weights(scores, mask, cfg.filter)
        token_weights = mask * kept[:, None]
        metrics.update(filter_stats)
    main = losses.token_mean(per_token, token_weights)
    balance, z = _router_terms(out.router_logits, out.expert_indices, token_weights > 0, plan.num_experts)
    total = main + cfg.load_balance_weight * balance + cfg.router_z_weight * z
    metrics.update(loss=main, load_balance=balance, z_loss=z)
    if plan.router_kd:
        token_mask = jnp.broadcast_to((token_weights > 0).reshape(-1), out.router_logits.shape[:2])
        router_kd = jnp.sum(jax.vmap(losses.token_mean)(
            losses.router_distillation(out.router_logits, target_router, mask=token_mask), token_mask))
        total = total + cfg.router_kd_weight * router_kd
        metrics["router_kd"] = router_kd
    for key in ("ce", "kd", "alpha_mean", "alpha_p10", "alpha_p50", "alpha_p90", "teacher_wrong_frac"):
        if key in stats:
            metrics["alpha" if key == "alpha_mean" else key] = stats[key]
    if plan.control:  # the control's distance to the teacher, measured, never trained on
        logits = jax.lax.stop_gradient(out.logits)
        metrics["kd"] = losses.token_mean(
            losses.forward_kl(logits, data_target, temperature=cfg.temperature, mask=mask), mask)
        metrics["alpha"] = jnp.zeros(())
    metrics["router_entropy"] = _router_entropy(out)
    metrics["dropped_fraction"] = jnp.mean(out.dropped_fraction) if out.dropped_fraction.size else jnp.zeros(())
    return total, (metrics, _expert_load(out), jax.lax.stop_gradient(out.logits), scores)


def _teacher_loss(outputs, batch: Batch, cfg: TeacherConfig, num_experts: int, student_logits):
    logits, router_logits, expert_indices = outputs
    mask, labels = batch["mask"] > 0, batch["labels"]
    ce = losses.token_mean(losses.cross_entropy(logits, labels, mask=mask), mask)
    balance, z = _router_terms(router_logits, expert_indices, mask, num_experts)
    total = ce + cfg.load_balance_weight * balance + cfg.router_z_weight * z
    metrics = {"ce": ce, "load_balance": balance, "z_loss": z}
    if cfg.mutual_weight > 0 and student_logits:
        mutual = jnp.mean(jnp.stack([losses.token_mean(losses.forward_kl(logits, s, mask=mask), mask)
                                     for s in student_logits]))
        total = total + cfg.mutual_weight * mutual
        metrics["mutual"] = mutual
    metrics["loss"] = total
    return total, metrics


def _apply(tx, params, opt_state, grads):
    """The optimizer update, or none at all when the gradient is not finite (NaN/inf): parameters
    and optimizer state stay as they were. Returns (params, opt_state, updated)."""
    updates, new_opt_state = tx.update(grads, opt_state, params)
    finite = jnp.isfinite(optax.tree.norm(grads))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    return keep(optax.apply_updates(params, updates), params), keep(new_opt_state, opt_state), finite


def _target_after(plan: StepPlan, target, new_teacher_params, step):
    if plan.teacher.target == "ema":
        decay = plan.teacher.ema_decay
        return jax.tree.map(lambda t, p: decay * t + (1.0 - decay) * p, target, new_teacher_params)
    if plan.teacher.target == "stale":
        refresh = (step + 1) % plan.teacher.refresh_every == 0
        return jax.tree.map(lambda t, p: jnp.where(refresh, p, t), target, new_teacher_params)
    return None


def _sum_over_micro(tree):
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), tree)


def _shares(tokens: jax.Array) -> jax.Array:
    """Each micro-batch's share of the step's tokens."""
    return tokens / jnp.maximum(jnp.sum(tokens), 1.0)


def _data_tokens(mask: jax.Array) -> jax.Array:
    """[grad_accum]: the unmasked data tokens of each micro-batch."""
    return jnp.sum(mask, axis=tuple(range(1, mask.ndim)))


def _writes(sp: StudentPlan, student_step) -> jax.Array | bool:
    """Whether the student writes its on-policy rows at this step (off-policy before start_step)."""
    if not sp.on_policy_rows or not sp.loss.on_policy.start_step:
        return bool(sp.on_policy_rows)
    return student_step >= sp.loss.on_policy.start_step


# The rows a student's logged token mean runs over, when they are not all of them: an on-policy
# student's written rows or its data rows (the rest run over both, as its loss does).
_ROWS_OF_METRIC = {"on_policy_kd": "written", "on_policy_teacher_nll": "written", "on_policy_writing": "written",
                   **dict.fromkeys(("accuracy", "ce", "kd", "alpha", "teacher_wrong_frac"), "data")}


def _student_shares(sp: StudentPlan, mask: jax.Array, writing) -> dict[str, jax.Array]:
    """Each micro-batch's share of the tokens the student trains on ("all": what weighs its
    gradients), of its written tokens and of its data rows' tokens. Written rows count the tokens
    the student sampled, `seq + 1 - prompt_tokens` each (the mask `distill.onpolicy.student_rows`
    gives them), whatever the data rows they replace held; every micro-batch writes as many."""
    n = sp.on_policy_rows
    data_rows = _data_tokens(mask[:, n:])
    written = n * (mask.shape[-1] + 1 - sp.loss.on_policy.prompt_tokens)
    return {"all": _shares(jnp.where(writing, written + data_rows, _data_tokens(mask))), "data": _shares(data_rows),
            "written": _shares(jnp.ones_like(data_rows))}


def train_step(plan: StepPlan, state: TrainState, batch: Batch, *, with_students: bool = True,
               student_step_offset: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step of the teacher (if it trains) and, `with_students`, of every student.

    `batch` holds the global batch as micro-batches `[grad_accum, rows, seq]`. Each micro-batch's
    gradients and metrics are weighted by its share of the tokens a model trains on (an on-policy
    student's written rows count their sampled tokens), so accumulation equals one step on the
    whole batch (for the token-mean losses). `student_step_offset` (the teacher warm-up) is subtracted from the
    step for the students' weighting schedules.
    """
    teacher_trains = plan.teacher_tx is not None
    students = plan.students if with_students else ()
    student_step = state.step - student_step_offset

    writing = [_writes(sp, student_step) for sp in students]

    def micro(carry, xs):
        mb, weight, student_shares, micro_index = xs  # each model's share of its step's tokens in this one
        teacher_grads, student_grads = carry
        if plan.teacher_graph is None:
            t_logits = t_router = t_counts = None
        elif teacher_trains:
            def teacher_forward(params):
                out = forward(plan.teacher_graph, params, mb, plan.teacher_sharding)
                return (out.logits, out.router_logits), (out.expert_indices, out.expert_counts)
            (t_logits, t_router), pullback, (t_indices, t_counts) = jax.vjp(
                teacher_forward, state.teacher.params, has_aux=True)
        else:
            out = forward(plan.teacher_graph, state.teacher.params, mb, plan.teacher_sharding)
            t_logits, t_router, t_indices, t_counts = out.logits, out.router_logits, out.expert_indices, \
                out.expert_counts
        if plan.teacher_graph is None:
            target_logits, target_router = cached_teacher(mb), None
        elif state.target is not None and students:
            target_out = forward(plan.teacher_graph, state.target, mb, plan.teacher_sharding)
            target_logits, target_router = target_out.logits, target_out.router_logits
        else:
            target_logits, target_router = t_logits, t_router
        target_logits = jax.lax.stop_gradient(target_logits)
        target_router = jax.lax.stop_gradient(target_router)

        filtering = any(sp.loss.filter.active for sp in students)
        judgement = _teacher_judgement(target_logits, mb) if filtering else None
        new_student_grads, student_metrics, student_logits, row_scores, written = [], [], [], [], []
        for i, (sp, s_state, acc) in enumerate(zip(students, state.students, student_grads)):
            s_batch, s_target, s_router = mb, target_logits, target_router
            if sp.on_policy_rows:
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(plan.seed), state.step),
                                         micro_index * len(students) + i)
                write = lambda sp=sp, s_state=s_state, key=key: _with_student_rows(  # noqa: E731
                    plan, state, sp, s_state.params, mb, target_logits, target_router, key)
                if sp.loss.on_policy.start_step:  # off-policy (no sampling at all) before it
                    s_batch, s_target, s_router = jax.lax.cond(
                        writing[i], write, lambda: (mb, target_logits, target_router))
                else:
                    s_batch, s_target, s_router = write()
            grad_fn = jax.value_and_grad(_student_loss, has_aux=True)
            (_, (metrics, load, logits, scores)), grads = grad_fn(
                s_state.params, sp, s_batch, s_target, s_router, student_step, judgement, writing[i])
            shares = student_shares[i]
            new_student_grads.append(jax.tree.map(lambda a, g: a + shares["all"] * g, acc, grads))
            student_metrics.append(({k: shares[_ROWS_OF_METRIC.get(k, "all")] * v for k, v in metrics.items()},
                                    shares["all"] * load))
            student_logits.append(logits)
            row_scores.append(scores)
            written.append(jnp.append(s_batch["tokens"][0], s_batch["labels"][0, -1]) if sp.on_policy_rows else None)

        mask = mb["mask"] > 0
        if plan.teacher_graph is None:  # the cache holds the label's log-probability: the CE is exact
            teacher_load = None
            t_metrics = {"accuracy": _accuracy_of(mb["teacher_indices"][..., 0], mb["labels"], mask),
                         "ce": losses.token_mean(-mb["teacher_label_log_prob"], mask)}
        else:
            teacher_load = (t_counts / jnp.maximum(jnp.sum(t_counts, -1, keepdims=True), 1)).astype(jnp.float32)
            t_metrics = {"accuracy": _accuracy(t_logits, mb["labels"], mb["mask"])}
        if teacher_trains:
            loss_fn = lambda outs: _teacher_loss(  # noqa: E731
                (*outs, t_indices), mb, plan.teacher, plan.teacher_experts, student_logits)
            (_, loss_metrics), cotangent = jax.value_and_grad(loss_fn, has_aux=True)((t_logits, t_router))
            (grads,) = pullback(cotangent)
            teacher_grads = jax.tree.map(lambda a, g: a + weight * g, teacher_grads, grads)
            t_metrics.update(loss_metrics)
        elif t_logits is not None:
            t_metrics["ce"] = losses.token_mean(losses.cross_entropy(t_logits, mb["labels"], mask=mask), mask)
        return ((teacher_grads, tuple(new_student_grads)),
                (jax.tree.map(lambda x: weight * x, (t_metrics, teacher_load)) + (tuple(student_metrics),),
                 tuple(row_scores), tuple(written)))

    zeros = lambda params: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    init = (zeros(state.teacher.params) if teacher_trains else None,
            tuple(zeros(s.params) for s in state.students[:len(students)]))
    weights = _shares(_data_tokens(batch["mask"]))
    student_shares = tuple(_student_shares(sp, batch["mask"], w) for sp, w in zip(students, writing))
    (teacher_grads, student_grads), ((t_metrics, t_load, s_metrics), s_row_scores, s_written) = jax.lax.scan(
        micro, init, (batch, weights, student_shares, jnp.arange(batch["mask"].shape[0])))
    if plan.debug_nonfinite_step is not None:
        poison = jnp.where(state.step + 1 == plan.debug_nonfinite_step, jnp.nan, 1.0)
        teacher_grads, student_grads = jax.tree.map(lambda g: g * poison, (teacher_grads, student_grads))
    updated = [jnp.bool_(True)] * (1 + len(state.students))  # a model that does not step is not skipped
    metrics = {f"teacher/{k}": v for k, v in _sum_over_micro(t_metrics).items()}
    if t_load is not None:
        metrics["teacher/expert_load"] = jnp.sum(t_load, axis=0)

    teacher, target = state.teacher, state.target
    if teacher_trains:
        metrics["teacher/grad_norm"] = optax.tree.norm(teacher_grads)
        params, opt_state, updated[0] = _apply(plan.teacher_tx, teacher.params, teacher.opt_state, teacher_grads)
        teacher = ModelState(params=params, opt_state=opt_state)
        metrics["teacher/lr"] = current_lr(opt_state)
        if target is not None:
            target = _target_after(plan, target, params, state.step)

    new_students = list(state.students)
    for i, (sp, grads) in enumerate(zip(students, student_grads)):
        prefix = f"student/{sp.name}/"
        scalars, load = s_metrics[i]
        metrics.update({prefix + k: v for k, v in _sum_over_micro(scalars).items()})
        metrics[prefix + "expert_load"] = jnp.sum(load, axis=0)
        if s_row_scores[i] is not None:  # [grad_accum, rows]: the trainer logs the easiest and hardest rows
            metrics[prefix + "filter_row_scores"] = s_row_scores[i]
        if s_written[i] is not None:  # [seq + 1]: the trainer logs the last micro-batch's first written row
            metrics[prefix + "on_policy_written"] = s_written[i][-1]
        metrics[prefix + "grad_norm"] = optax.tree.norm(grads)
        params, opt_state, updated[1 + i] = _apply(sp.tx, state.students[i].params, state.students[i].opt_state, grads)
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


def eval_step(plan: StepPlan, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Summed validation statistics of one batch (the trainer adds them up over batches).

    `*/nats`: summed CE in nats; `tokens`: unmasked tokens; `student/<n>/agree`: tokens where the
    student's top-1 equals the teacher's; `student/<n>/kl`: summed KL(teacher || student), T = 1.
    """
    mask = batch["mask"] > 0
    total = lambda x: jnp.sum(jnp.where(mask, x, 0.0))  # noqa: E731
    if plan.teacher_graph is None:  # a cache: exact CE and top-1; the KL against its top-k, uniform tail
        teacher, teacher_top1 = cached_teacher(batch), batch["teacher_indices"][..., 0]
        teacher_nats = -batch["teacher_label_log_prob"]
    else:
        teacher = forward(plan.teacher_graph, state.teacher.params, batch, plan.teacher_sharding).logits
        teacher_top1 = jnp.argmax(teacher, -1)
        teacher_nats = losses.cross_entropy(teacher, batch["labels"], mask=mask)
    out = {"tokens": jnp.sum(mask.astype(jnp.float32)), "teacher/nats": total(teacher_nats)}
    for sp, s_state in zip(plan.students, state.students):
        logits = forward(sp.graph, s_state.params, batch, sp.sharding).logits
        prefix = f"student/{sp.name}/"
        out[prefix + "nats"] = total(losses.cross_entropy(logits, batch["labels"], mask=mask))
        out[prefix + "agree"] = total((jnp.argmax(logits, -1) == teacher_top1).astype(jnp.float32))
        out[prefix + "kl"] = total(losses.forward_kl(logits, teacher, mask=mask))
    return out


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Validation metrics from summed `eval_step` outputs: `eval/<model>/bpb`, agreement, KL.

    `bpb` is bits per token: bits per byte with the byte tokenizer (the run contract's tag), bits
    per token with any other tokenizer.
    """
    tokens = max(sums["tokens"], 1.0)
    metrics = {}
    for key, value in sums.items():
        if key.endswith("/nats"):
            model = key[: -len("/nats")]
            metrics[f"eval/{model}/bpb"] = value / tokens / math.log(2)
            metrics[f"eval/{model}/ce"] = value / tokens
        elif key.endswith("/agree"):
            metrics[f"eval/{key[: -len('/agree')]}/top1_agreement"] = value / tokens
        elif key.endswith("/kl"):
            metrics[f"eval/{key[: -len('/kl')]}/kl"] = value / tokens
    return metrics
