"""Decoupled knowledge distillation (DKD), adapted from classification to per-token LM targets."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from losses._chunking import DEFAULT_CHUNK_SIZE
from losses._common import clamp_nonnegative, kl_rows, hyperparameter
from losses._kd import KDKind, kd_per_token
from losses._vocab import SparseTeacher


def _log1m_target(logp: jax.Array, is_target: jax.Array) -> jax.Array:
    """log(1 - p[target]) as logsumexp over the other columns (exact when p[target] ~ 1)."""
    return jax.nn.logsumexp(jnp.where(is_target, -jnp.inf, logp), axis=-1)


def _binary_kl(log_a: jax.Array, log_1ma: jax.Array, log_b: jax.Array, log_1mb: jax.Array) -> jax.Array:
    pair_p = jnp.stack([log_a, log_1ma], axis=-1)
    pair_q = jnp.stack([log_b, log_1mb], axis=-1)
    return kl_rows(pair_p, pair_q)


def _dkd(logp, logq, labels, *, alpha, beta):
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


def _dkd_params(alpha=1.0, beta=8.0) -> dict[str, Any]:
    return {"alpha": hyperparameter("alpha", alpha, low=0.0), "beta": hyperparameter("beta", beta, low=0.0)}


DKD = KDKind(_dkd, _dkd_params)


def dkd(student_logits: jax.Array, teacher_logits: jax.Array | SparseTeacher, labels: jax.Array, *,
        alpha: float = 1.0, beta: float = 8.0, temperature: float = 1.0, mask: jax.Array | None = None,
        vocab_size: int | None = None, vocab_map=None,
        chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Decoupled KD per token: T^2 * (alpha * TCKD + beta * NCKD), the label as target class.

    With y the label, b = (p(y), 1 - p(y)) the binary target/non-target split and p^ the
    distribution over the other columns renormalised:
    TCKD = KL(b_T || b_S), NCKD = KL(p^_T || p^_S). Forward KL is exactly
    TCKD + (1 - p_T(y)) * NCKD; DKD decouples the two and weights NCKD by a constant beta instead
    of the teacher's own non-target mass.

    Args:
      student_logits: `[..., V]`, any float dtype.
      teacher_logits: `[..., V_T]` or a `SparseTeacher`.
      labels: int `[...]`, the target class of each token; labels < 0 are ignored like `mask`.
      alpha: weight of the target-class term (paper: 1.0).
      beta: weight of the non-target term (paper: 8.0 on CIFAR-100; tune for LMs).
      temperature: T > 0 (a runtime value, may be traced).
      mask: bool `[...]`, False for tokens that contribute nothing; None keeps all.
      vocab_size: the real vocabulary; padding columns at and beyond it are ignored.
      vocab_map: int `[n]`, the teacher column of each student column (-1: none).
      chunk_size: tokens per chunk, "auto" (from the vocabulary size) or None (all at once).

    Returns:
      float32 `[...]`, one value per token (NaN for a kept token whose label is >= vocab).

    References:
      Zhao et al., Decoupled Knowledge Distillation, CVPR 2022. https://arxiv.org/abs/2203.08679
    """
    return kd_per_token(DKD, student_logits, teacher_logits, labels=labels, params=_dkd_params(alpha, beta),
                        temperature=temperature, mask=mask, vocab_size=vocab_size, vocab_map=vocab_map,
                        chunk_size=chunk_size)
