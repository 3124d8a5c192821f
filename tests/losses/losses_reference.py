"""Independent float64 numpy references for the losses tests (no JAX).

Written from the papers' formulas, in log space so that +-1e4 logits at T = 0.1 stay finite:
KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)) with 0 log 0 = 0, mixtures by np.logaddexp, DKD's
non-target distribution by masking the target logit, as the authors' code does.
"""

from __future__ import annotations

import numpy as np


def log_softmax(x):
    x = np.asarray(x, np.float64)
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return x - top - np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True))


def logsumexp(x, axis=-1):
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(top, axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def kl(logp, logq):
    """KL(P || Q) from log-probabilities, 0 log 0 = 0."""
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def log_mix(logp, logq, w):
    """log(w P + (1 - w) Q)."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log(w) + logp, np.log1p(-w) + logq)


def tempered(student, teacher, temperature):
    """(log p_T, log p_S) at temperature T."""
    return (log_softmax(np.asarray(teacher, np.float64) / temperature),
            log_softmax(np.asarray(student, np.float64) / temperature))


def forward_kl(student, teacher, temperature=1.0):
    logp, logq = tempered(student, teacher, temperature)
    return temperature**2 * kl(logp, logq)


def reverse_kl(student, teacher, temperature=1.0):
    logp, logq = tempered(student, teacher, temperature)
    return temperature**2 * kl(logq, logp)


def jsd(student, teacher, beta=0.5, temperature=1.0):
    logp, logq = tempered(student, teacher, temperature)
    logm = log_mix(logp, logq, beta)
    return temperature**2 * (beta * kl(logp, logm) + (1 - beta) * kl(logq, logm))


def skew_kl(student, teacher, lam=0.1, temperature=1.0):
    logp, logq = tempered(student, teacher, temperature)
    return temperature**2 * kl(logp, log_mix(logp, logq, lam))


def skew_reverse_kl(student, teacher, lam=0.1, temperature=1.0):
    logp, logq = tempered(student, teacher, temperature)
    return temperature**2 * kl(logq, log_mix(logq, logp, lam))


def tvd(student, teacher, temperature=1.0):
    logp, logq = tempered(student, teacher, temperature)
    return temperature**2 * 0.5 * np.sum(np.abs(np.exp(logp) - np.exp(logq)), axis=-1)


def dkd(student, teacher, labels, alpha=1.0, beta=8.0, temperature=1.0):
    s = np.asarray(student, np.float64) / temperature
    t = np.asarray(teacher, np.float64) / temperature
    gt = np.arange(s.shape[-1]) == np.asarray(labels)[..., None]
    logp, logq = log_softmax(t), log_softmax(s)

    def split(log_probs):
        return np.stack([logsumexp(np.where(gt, log_probs, -np.inf)), logsumexp(np.where(gt, -np.inf, log_probs))], -1)

    tckd = kl(split(logp), split(logq))
    nckd = kl(log_softmax(np.where(gt, -np.inf, t)), log_softmax(np.where(gt, -np.inf, s)))
    return temperature**2 * (alpha * tckd + beta * nckd)


REFERENCES = {
    "forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl, "tvd": tvd, "dkd": dkd,
}


def cross_entropy(logits, labels, label_smoothing=0.0, z_loss=0.0):
    x = np.asarray(logits, np.float64)
    logq = log_softmax(x)
    nll = -np.take_along_axis(logq, np.asarray(labels)[..., None], -1)[..., 0]
    finite = np.isfinite(x)
    uniform = -np.sum(np.where(finite, logq, 0.0), -1) / np.sum(finite, -1)
    return (1 - label_smoothing) * nll + label_smoothing * uniform + z_loss * logsumexp(x) ** 2


def dense_from_top_k(indices, log_probs, vocab, tail):
    """The teacher distribution a SparseTeacher stands for, as float64 log-probabilities."""
    p = np.zeros(indices.shape[:-1] + (vocab,))
    np.put_along_axis(p, indices, np.exp(np.asarray(log_probs, np.float64)), -1)
    in_top_k = np.zeros(p.shape, bool)
    np.put_along_axis(in_top_k, indices, True, -1)
    if tail == "uniform":
        rest = np.clip(1.0 - np.sum(p, -1, keepdims=True), 0.0, None)
        p = np.where(in_top_k, p, rest / (vocab - indices.shape[-1]))
    with np.errstate(divide="ignore"):
        return np.log(p / np.sum(p, -1, keepdims=True))
