"""Validation: summed statistics of a batch (`eval_step`) and the metrics they give (`eval_metrics`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import losses
from distill.step.state import Batch, TrainState, forward
from distill.step.train import StepPlan


def eval_step(plan: StepPlan, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Summed validation statistics of one batch (the trainer adds them up over batches).

    `*/nats`: summed CE in nats; `tokens`: unmasked tokens; `student/<n>/agree`: tokens where the
    student's top-1 equals the teacher's; `student/<n>/kl`: summed KL(teacher || student), T = 1.
    """
    mask = batch["mask"] > 0
    total = lambda x: jnp.sum(jnp.where(mask, x, 0.0))  # noqa: E731
    teacher, teacher_top1, teacher_nats = plan.teacher.kind.evaluate(plan.teacher, state.teacher.params, batch)
    out = {"tokens": jnp.sum(mask.astype(jnp.float32)), "teacher/nats": total(teacher_nats)}
    for sp, s_state in zip(plan.students, state.students):
        logits = forward(sp.graph, s_state.params, batch, sp.sharding, fused_head=sp.loss.fused_head).logits
        prefix = f"student/{sp.name}/"
        out[prefix + "nats"] = total(losses.cross_entropy(logits, batch["labels"], mask=mask))
        out[prefix + "agree"] = total((losses.top1(logits) == teacher_top1).astype(jnp.float32))
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
