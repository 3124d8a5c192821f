"""Decoupled knowledge distillation (DKD), adapted from classification to per-token LM targets: its
per-row divergence and parameters (the term is `KD_TERMS["dkd"]`, the public function `dkd`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from losses._common import clamp_nonnegative, hyperparameter, kl_rows


def _log1m_target(logp: jax.Array, is_target: jax.Array) -> jax.Array:
    """log(1 - p[target]) as logsumexp over the other columns (exact when p[target] ~ 1)."""
    return jax.nn.logsumexp(jnp.where(is_target, -jnp.inf, logp), axis=-1)


def _binary_kl(log_a: jax.Array, log_1ma: jax.Array, log_b: jax.Array, log_1mb: jax.Array) -> jax.Array:
    pair_p = jnp.stack([log_a, log_1ma], axis=-1)
    pair_q = jnp.stack([log_b, log_1mb], axis=-1)
    return kl_rows(pair_p, pair_q)


def dkd_divergence(logp, logq, labels, *, alpha, beta):
    """alpha * TCKD + beta * NCKD per row, the label as the target class."""
    is_target = jnp.arange(logp.shape[-1]) == labels[:, None]
    # Masked rows carry label 0 here (KDRow); a kept label >= vocab gives NaN, loudly.
    lp_t = jnp.take_along_axis(logp, labels[:, None], axis=-1, mode="fill", fill_value=jnp.nan)[:, 0]
    lq_t = jnp.take_along_axis(logq, labels[:, None], axis=-1, mode="fill", fill_value=jnp.nan)[:, 0]
    tckd = _binary_kl(lp_t, _log1m_target(logp, is_target), lq_t, _log1m_target(logq, is_target))
    # Non-target distributions: renormalised over the other columns (log_softmax is shift-invariant,
    # so this is softmax of the non-target logits, as in the reference code's "- 1000 * gt_mask").
    logp_nt = jax.nn.log_softmax(jnp.where(is_target, -jnp.inf, logp), axis=-1)
    logq_nt = jax.nn.log_softmax(jnp.where(is_target, -jnp.inf, logq), axis=-1)
    nckd = kl_rows(logp_nt, logq_nt)
    return clamp_nonnegative(alpha * tckd + beta * nckd)


def dkd_params(alpha=1.0, beta=8.0) -> dict[str, Any]:
    """DKD's parameters: the weights of TCKD and NCKD, both >= 0."""
    return {"alpha": hyperparameter("alpha", alpha, low=0.0), "beta": hyperparameter("beta", beta, low=0.0)}
