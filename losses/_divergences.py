"""The per-token KD family: the divergence of each KD term, their table `KD_TERMS` (forward and
reverse KL, generalized JSD, skew KLs, total variation, decoupled KD, ...) and the named public
functions.

Notation: p_T = softmax(teacher_logits / T), p_S = softmax(student_logits / T). Every term is
multiplied by T^2 (Hinton et al., 2015), is computed in float32 whatever the input dtype,
returns one value per token (0 where `mask` is False) and treats the teacher as a constant (no
gradient flows into `teacher_logits`). `teacher_logits` may be a dense array `[..., V_T]` or a
`SparseTeacher` (top-k of the offline cache). Vocabularies that differ only by padding columns
are aligned automatically; see `resolve_columns`.

A new term is a divergence function and its entry in `KD_TERMS`, here, with its references in
tests/losses/losses_reference.py; `distillation_loss`, the config, the docs table and the tests
read the table.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from losses._chunking import DEFAULT_CHUNK_SIZE
from losses._common import clamp_nonnegative, hyperparameter, kl_rows, log_mixture
from losses._dkd import dkd_divergence, dkd_params
from losses._kd import KDTerm
from losses._vocab import SparseTeacher

Teacher = jax.Array | SparseTeacher

_COMMON_ARGS = """
      temperature: T > 0; both logits are divided by it and the result multiplied by T^2. A
        runtime value: changing it does not recompile, and it may be traced (scheduled).
      mask: bool `[...]`, False for tokens that contribute nothing (padding); None keeps all.
      vocab_size: the real vocabulary; columns at and beyond it (padding) are ignored in both.
      vocab_map: int `[n]`, the teacher column of each student column (-1: none), for
        vocabularies that differ by more than padding (dense teachers only).
      chunk_size: tokens per chunk (peak memory O(chunk_size * vocab)); "auto" picks it from the
        vocabulary size; None computes all tokens at once (naive autodiff)."""


def _forward_kl(logp, logq, labels):
    del labels
    return clamp_nonnegative(kl_rows(logp, logq))


def _reverse_kl(logp, logq, labels):
    del labels
    return clamp_nonnegative(kl_rows(logq, logp))


def _jsd(logp, logq, labels, *, beta):
    del labels
    logm = log_mixture(logp, logq, beta)
    return clamp_nonnegative(beta * kl_rows(logp, logm) + (1.0 - beta) * kl_rows(logq, logm))


def _skew_kl(logp, logq, labels, *, lam):
    del labels
    return clamp_nonnegative(kl_rows(logp, log_mixture(logp, logq, lam)))


def _skew_reverse_kl(logp, logq, labels, *, lam):
    del labels
    return clamp_nonnegative(kl_rows(logq, log_mixture(logq, logp, lam)))


def _tvd(logp, logq, labels):
    del labels
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(logp) - jnp.exp(logq)), axis=-1)


def _head_share(logp, logq, mu):
    """AKL's weight of forward KL per row, g_head / (g_head + g_tail) (1/2 where p = q: both KLs
    vanish). A constant for the gradient, as in AKL.py, which detaches the student's probabilities."""
    p, q = jnp.exp(jax.lax.stop_gradient(logp)), jnp.exp(jax.lax.stop_gradient(logq))
    _, p_sorted, gap_sorted = jax.lax.sort((-p, p, jnp.abs(p - q)), dimension=-1, num_keys=1, is_stable=True)
    mass_ahead = jnp.concatenate([jnp.zeros_like(p_sorted[:, :1]), jnp.cumsum(p_sorted, axis=-1)[:, :-1]], axis=-1)
    g_head = jnp.sum(jnp.where(mass_ahead < mu, gap_sorted, 0.0), axis=-1)
    g_all = jnp.sum(gap_sorted, axis=-1)
    return jnp.where(g_all > 0, g_head / jnp.where(g_all > 0, g_all, 1.0), 0.5)


def _akl(logp, logq, labels, *, mu):
    """Adaptive KL (Wu et al., COLING 2025): w KL(p || q) + (1 - w) KL(q || p), w = g_head / (g_head +
    g_tail), g the summed |p - q| over the head (the fewest top teacher tokens whose mass reaches mu:
    the paper's definition, which its first author restates in songmzhang/DSKD#1; the released
    AKL.py's `cum_sum > mu` leaves the token that crosses mu in the tail) and over the tail (the
    rest). The weights carry no gradient."""
    del labels
    w = _head_share(logp, logq, mu)
    return clamp_nonnegative(w * kl_rows(logp, logq) + (1.0 - w) * kl_rows(logq, logp))


def _no_params() -> dict[str, Any]:
    return {}


def _jsd_params(beta=0.5) -> dict[str, Any]:
    try:
        return {"beta": hyperparameter("beta", beta, low=0.0, high=1.0, open_low=True, open_high=True)}
    except ValueError as err:
        raise ValueError(
            f"{err}. At 0 and 1 the generalized JSD is identically 0 (near them it behaves like "
            "beta * KL(p_T||p_S) and (1 - beta) * KL(p_S||p_T)); TRL substitutes forward KL at beta=0 "
            "and reverse KL at beta=1: use kd='forward_kl' or 'reverse_kl'"
        ) from None


def _akl_params(mu=0.5) -> dict[str, Any]:
    try:
        return {"mu": hyperparameter("mu", mu, low=0.0, high=1.0, open_low=True, open_high=True)}
    except ValueError as err:
        raise ValueError(f"{err} (at 0 AKL is reverse KL, at 1 forward KL: use kd='reverse_kl' or 'forward_kl')"
                         ) from None


def _skew_params(lam=0.1) -> dict[str, Any]:
    try:
        return {"lam": hyperparameter("lam", lam, low=0.0, high=1.0, open_high=True)}
    except ValueError as err:
        raise ValueError(f"{err} (at 1 the skew KL is identically 0)") from None


KD_TERMS: Mapping[str, KDTerm] = types.MappingProxyType({term.name: term for term in (
    KDTerm("forward_kl", _forward_kl, _no_params, "T² Σ_v p (log p − log q)",
           "Hinton et al. 2015, [arXiv:1503.02531](https://arxiv.org/abs/1503.02531)"),
    KDTerm("reverse_kl", _reverse_kl, _no_params, "T² Σ_v q (log q − log p)",
           "Gu et al., MiniLLM, ICLR 2024, [arXiv:2306.08543](https://arxiv.org/abs/2306.08543)"),
    KDTerm("jsd", _jsd, _jsd_params, "T² [β KL(p ‖ m) + (1 − β) KL(q ‖ m)], m = β p + (1 − β) q, 0 < β < 1",
           "Agarwal et al., GKD, ICLR 2024, eq. 1, [arXiv:2306.13649](https://arxiv.org/abs/2306.13649)"),
    KDTerm("skew_kl", _skew_kl, _skew_params, "T² KL(p ‖ λ p + (1 − λ) q), 0 ≤ λ < 1",
           "Ko et al., DistiLLM, ICML 2024, [arXiv:2402.03898](https://arxiv.org/abs/2402.03898)"),
    KDTerm("skew_reverse_kl", _skew_reverse_kl, _skew_params, "T² KL(q ‖ λ q + (1 − λ) p), 0 ≤ λ < 1",
           "Ko et al., DistiLLM, ICML 2024, [arXiv:2402.03898](https://arxiv.org/abs/2402.03898)"),
    KDTerm("tvd", _tvd, _no_params, "T² · ½ Σ_v |p − q|",
           "Wen et al., f-divergence KD, ACL 2023, [arXiv:2307.15190](https://arxiv.org/abs/2307.15190)"),
    KDTerm("dkd", dkd_divergence, dkd_params, "T² [α KL(b_p ‖ b_q) + β KL(p̂ ‖ q̂)], y the label",
           "Zhao et al., DKD, CVPR 2022, [arXiv:2203.08679](https://arxiv.org/abs/2203.08679)", needs_labels=True),
    KDTerm("akl", _akl, _akl_params,
           "T² [w KL(p ‖ q) + (1 − w) KL(q ‖ p)], w = g_head/(g_head + g_tail) (no gradient), g = Σ |p − q| over "
           "the head (the fewest top tokens of p whose mass reaches μ, 0 < μ < 1) and over the tail (the rest)",
           "Wu et al., AKL, COLING 2025, [arXiv:2404.02657](https://arxiv.org/abs/2404.02657)"),
)})
"""The KD terms by name, in the order of the docs table. `KD_TERMS[name](student_logits,
teacher_logits, labels, *, temperature, mask, vocab_size, vocab_map, chunk_size, **params)`
evaluates any of them per token (labels are read only by the terms that `needs_labels`);
`KD_TERMS[name].check_params(params)` validates a user's parameters."""


def forward_kl(student_logits: jax.Array, teacher_logits: Teacher, *, temperature: float = 1.0,
               mask: jax.Array | None = None, vocab_size: int | None = None, vocab_map=None,
               chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Forward KL, the classic KD term: T^2 * KL(p_T || p_S), mean-seeking.

    Its gradient with respect to the student logits is T * (p_S - p_T).

    Args:
      student_logits: `[..., V]`, any float dtype.
      teacher_logits: `[..., V_T]` or a `SparseTeacher`.{common}

    Returns:
      float32 `[...]`, one value per token.

    References:
      Hinton et al., Distilling the Knowledge in a Neural Network, 2015.
      https://arxiv.org/abs/1503.02531
    """
    return KD_TERMS["forward_kl"](student_logits, teacher_logits, temperature=temperature, mask=mask,
                                  vocab_size=vocab_size, vocab_map=vocab_map, chunk_size=chunk_size)


def reverse_kl(student_logits: jax.Array, teacher_logits: Teacher, *, temperature: float = 1.0,
               mask: jax.Array | None = None, vocab_size: int | None = None, vocab_map=None,
               chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Reverse KL: T^2 * KL(p_S || p_T), mode-seeking.

    Args:
      student_logits: `[..., V]`, any float dtype.
      teacher_logits: `[..., V_T]` or a `SparseTeacher`.{common}

    Returns:
      float32 `[...]`, one value per token.

    References:
      Gu et al., MiniLLM: Knowledge Distillation of Large Language Models, ICLR 2024.
      https://arxiv.org/abs/2306.08543
    """
    return KD_TERMS["reverse_kl"](student_logits, teacher_logits, temperature=temperature, mask=mask,
                                  vocab_size=vocab_size, vocab_map=vocab_map, chunk_size=chunk_size)


def jsd(student_logits: jax.Array, teacher_logits: Teacher, *, beta: float = 0.5, temperature: float = 1.0,
        mask: jax.Array | None = None, vocab_size: int | None = None, vocab_map=None,
        chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Generalized Jensen-Shannon divergence of GKD, times T^2.

    With m = beta * p_T + (1 - beta) * p_S:
    JSD(beta) = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m).
    `beta = 0.5` is the symmetric Jensen-Shannon divergence. Near beta = 0 it behaves like
    beta * KL(p_T || p_S) (forward), near 1 like (1 - beta) * KL(p_S || p_T) (reverse); at the
    endpoints it is identically 0, so they are rejected. For 0 < beta < 1 and T = 1 it is, per
    token, TRL's `GKDTrainer.generalized_jsd_loss(..., beta)` (current versions; TRL has no T^2
    and substitutes forward / reverse KL at beta = 0 / 1). See docs/losses.md.

    Args:
      student_logits: `[..., V]`, any float dtype.
      teacher_logits: `[..., V_T]` or a `SparseTeacher`.
      beta: teacher weight of the mixture, in (0, 1).{common}

    Returns:
      float32 `[...]`, one value per token.

    References:
      Agarwal et al., On-Policy Distillation of Language Models: Learning from Self-Generated
      Mistakes (GKD), ICLR 2024, eq. 1. https://arxiv.org/abs/2306.13649
    """
    return KD_TERMS["jsd"](student_logits, teacher_logits, beta=beta, temperature=temperature, mask=mask,
                           vocab_size=vocab_size, vocab_map=vocab_map, chunk_size=chunk_size)


def skew_kl(student_logits: jax.Array, teacher_logits: Teacher, *, lam: float = 0.1, temperature: float = 1.0,
            mask: jax.Array | None = None, vocab_size: int | None = None, vocab_map=None,
            chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Skew forward KL of DistiLLM: T^2 * KL(p_T || lam * p_T + (1 - lam) * p_S).

    lam = 0 is forward KL. DistiLLM's code returns the cross-entropy -sum p_T log m, which is this
    value plus the teacher's entropy (a constant: same gradient); this one is a true divergence
    (>= 0, 0 iff p_S = p_T).

    Args:
      student_logits: `[..., V]`, any float dtype.
      teacher_logits: `[..., V_T]` or a `SparseTeacher`.
      lam: skew, the teacher's weight in the mixture, in [0, 1); DistiLLM uses 0.1.{common}

    Returns:
      float32 `[...]`, one value per token.

    References:
      Ko et al., DistiLLM: Towards Streamlined Distillation for Large Language Models, ICML 2024.
      https://arxiv.org/abs/2402.03898
    """
    return KD_TERMS["skew_kl"](student_logits, teacher_logits, lam=lam, temperature=temperature, mask=mask,
                               vocab_size=vocab_size, vocab_map=vocab_map, chunk_size=chunk_size)


def skew_reverse_kl(student_logits: jax.Array, teacher_logits: Teacher, *, lam: float = 0.1,
                    temperature: float = 1.0, mask: jax.Array | None = None, vocab_size: int | None = None,
                    vocab_map=None, chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Skew reverse KL of DistiLLM: T^2 * KL(p_S || lam * p_S + (1 - lam) * p_T).

    lam = 0 is reverse KL.

    Args:
      student_logits: `[..., V]`, any float dtype.
      teacher_logits: `[..., V_T]` or a `SparseTeacher`.
      lam: skew, the student's weight in the mixture, in [0, 1); DistiLLM uses 0.1.{common}

    Returns:
      float32 `[...]`, one value per token.

    References:
      Ko et al., DistiLLM: Towards Streamlined Distillation for Large Language Models, ICML 2024.
      https://arxiv.org/abs/2402.03898
    """
    return KD_TERMS["skew_reverse_kl"](student_logits, teacher_logits, lam=lam, temperature=temperature, mask=mask,
                                       vocab_size=vocab_size, vocab_map=vocab_map, chunk_size=chunk_size)


def tvd(student_logits: jax.Array, teacher_logits: Teacher, *, temperature: float = 1.0,
        mask: jax.Array | None = None, vocab_size: int | None = None, vocab_map=None,
        chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Total variation distance: T^2 * 0.5 * sum_v |p_T(v) - p_S(v)|, in [0, T^2].

    Args:
      student_logits: `[..., V]`, any float dtype.
      teacher_logits: `[..., V_T]` or a `SparseTeacher`.{common}

    Returns:
      float32 `[...]`, one value per token.

    References:
      Wen et al., f-Divergence Minimization for Sequence-Level Knowledge Distillation, ACL 2023.
      https://arxiv.org/abs/2307.15190
    """
    return KD_TERMS["tvd"](student_logits, teacher_logits, temperature=temperature, mask=mask,
                           vocab_size=vocab_size, vocab_map=vocab_map, chunk_size=chunk_size)


def dkd(student_logits: jax.Array, teacher_logits: Teacher, labels: jax.Array, *, alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 1.0, mask: jax.Array | None = None, vocab_size: int | None = None,
        vocab_map=None, chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> jax.Array:
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
    return KD_TERMS["dkd"](student_logits, teacher_logits, labels, alpha=alpha, beta=beta, temperature=temperature,
                           mask=mask, vocab_size=vocab_size, vocab_map=vocab_map, chunk_size=chunk_size)


for _fn in (forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd):
    _fn.__doc__ = _fn.__doc__.format(common=_COMMON_ARGS)
del _fn
