"""Independent references for the losses tests (no JAX): one per entry of every registry of the
`losses` package, by name (a test fails for an entry without one).

- `REFERENCES`: each KD term in float64 numpy, written from the papers' formulas, in log space so
  that +-1e4 logits at T = 0.1 stay finite: KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)) with
  0 log 0 = 0, mixtures by np.logaddexp, DKD's non-target distribution by masking the target
  logit, as the authors' code does.
- `TORCH_REFERENCES`: each KD term again from torch ops (values and autograd gradients).
- `DIFFICULTY_REFERENCES`, `SCHEDULE_REFERENCES`, `SCORE_REFERENCES`: the weighting policies,
  schedules and filtering scores in float64 numpy.

Every KD reference takes (student, teacher[, labels], **params, temperature=1.0), labels for
the terms that read them (`KDTerm.needs_labels`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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


def akl(student, teacher, mu=0.5, temperature=1.0):
    """Adaptive KL as the paper defines it (Wu et al., arXiv:2404.02657): the head is the first M
    tokens of p sorted descending, M the smallest with sum_{j <= M} p_j >= mu; the weights are
    constants for the gradient (the authors' AKL.py detaches the student's probabilities)."""
    logp, logq = tempered(student, teacher, temperature)
    order = np.argsort(-logp, axis=-1, kind="stable")
    p_sorted = np.exp(np.take_along_axis(logp, order, -1))
    gap = np.abs(p_sorted - np.exp(np.take_along_axis(logq, order, -1)))
    last_head = np.argmax(np.cumsum(p_sorted, -1) >= mu, -1)
    head = np.arange(p_sorted.shape[-1]) <= last_head[..., None]
    g_head, g_tail = np.sum(np.where(head, gap, 0.0), -1), np.sum(np.where(head, 0.0, gap), -1)
    total = np.where(g_head + g_tail > 0, g_head + g_tail, 1.0)  # p = q: both KLs vanish, any weights
    return temperature**2 * (g_head / total * kl(logp, logq) + g_tail / total * kl(logq, logp))


REFERENCES = {
    "forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl, "tvd": tvd, "dkd": dkd, "akl": akl,
}


def torch_kl(log_target, log_input):
    """KL(target || input) per row: torch's kl_div takes its arguments the other way round."""
    return F.kl_div(log_input, log_target, reduction="none", log_target=True).sum(-1)


def torch_mix(log_a, log_b, w):
    """log(w A + (1 - w) B)."""
    return torch.logsumexp(torch.stack([log_a + np.log(w), log_b + np.log1p(-w)]), 0)


def torch_tempered(student, teacher, temperature):
    """(log p_T, log p_S) at temperature T."""
    return F.log_softmax(teacher / temperature, -1), F.log_softmax(student / temperature, -1)


def torch_forward_kl(student, teacher, temperature=1.0):
    logp, logq = torch_tempered(student, teacher, temperature)
    return temperature**2 * torch_kl(logp, logq)


def torch_reverse_kl(student, teacher, temperature=1.0):
    logp, logq = torch_tempered(student, teacher, temperature)
    return temperature**2 * torch_kl(logq, logp)


def torch_jsd(student, teacher, beta=0.5, temperature=1.0):
    """TRL GKDTrainer.generalized_jsd_loss's formula for 0 < beta < 1."""
    logp, logq = torch_tempered(student, teacher, temperature)
    logm = torch_mix(logp, logq, beta)
    return temperature**2 * (beta * torch_kl(logp, logm) + (1 - beta) * torch_kl(logq, logm))


def torch_skew_kl(student, teacher, lam=0.1, temperature=1.0):
    logp, logq = torch_tempered(student, teacher, temperature)
    return temperature**2 * torch_kl(logp, torch_mix(logp, logq, lam))


def torch_skew_reverse_kl(student, teacher, lam=0.1, temperature=1.0):
    logp, logq = torch_tempered(student, teacher, temperature)
    return temperature**2 * torch_kl(logq, torch_mix(logq, logp, lam))


def torch_tvd(student, teacher, temperature=1.0):
    logp, logq = torch_tempered(student, teacher, temperature)
    return temperature**2 * 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def torch_dkd(student, teacher, labels, alpha=1.0, beta=8.0, temperature=1.0):
    """As the authors' mdistiller code (masking the target logit with -1000), per row, with the
    binary split in log space (their probability-space version is inf at T = 0.1)."""
    s, t = student / temperature, teacher / temperature
    logp, logq = F.log_softmax(t, -1), F.log_softmax(s, -1)
    gt = F.one_hot(torch.as_tensor(labels), s.shape[-1]).bool()

    def split(log_probs):  # log of (target mass, non-target mass)
        return torch.stack([log_probs.masked_fill(~gt, -torch.inf).logsumexp(-1),
                            log_probs.masked_fill(gt, -torch.inf).logsumexp(-1)], -1)

    tckd = torch_kl(split(logp), split(logq))
    nckd = torch_kl(F.log_softmax(t - 1000.0 * gt, -1), F.log_softmax(s - 1000.0 * gt, -1))
    return temperature**2 * (alpha * tckd + beta * nckd)


def torch_akl(student, teacher, mu=0.5, temperature=1.0):
    """As the authors' AKL.py (get_ratio: the teacher's probabilities sorted, the student's detached,
    a tail mask from the cumulative sum), with the paper's head: a token is in the tail when the
    mass before it already reaches mu (AKL.py's `cum_sum > mu` moves the crossing token there)."""
    logp, logq = torch_tempered(student, teacher, temperature)
    p_sorted, idx = logp.exp().sort(dim=-1, descending=True, stable=True)
    errors = (p_sorted - logq.exp().detach().gather(-1, idx)).abs()
    tail = torch.roll(p_sorted.cumsum(-1), 1, -1) >= mu
    tail[..., 0] = False
    g_head, g_tail = errors.masked_fill(tail, 0.0).sum(-1), errors.masked_fill(~tail, 0.0).sum(-1)
    return temperature**2 * (g_head / (g_head + g_tail) * torch_kl(logp, logq)
                             + g_tail / (g_head + g_tail) * torch_kl(logq, logp))


TORCH_REFERENCES = {
    "forward_kl": torch_forward_kl, "reverse_kl": torch_reverse_kl, "jsd": torch_jsd, "skew_kl": torch_skew_kl,
    "skew_reverse_kl": torch_skew_reverse_kl, "tvd": torch_tvd, "dkd": torch_dkd, "akl": torch_akl,
}


def difficulty_none(config, student, teacher, labels):
    return np.ones(np.shape(labels))


def difficulty_teacher_entropy(config, student, teacher, labels):
    logp = log_softmax(teacher)
    h = -np.sum(np.exp(logp) * logp, -1) / np.log(np.shape(teacher)[-1])
    return np.clip((h - config.entropy_low) / (config.entropy_high - config.entropy_low), 0, 1)


def difficulty_teacher_label_prob(config, student, teacher, labels):
    p_label = np.exp(np.take_along_axis(log_softmax(teacher), labels[..., None], -1)[..., 0])
    return (1 - p_label) ** config.label_prob_power


def difficulty_teacher_correctness(config, student, teacher, labels):
    p = np.exp(log_softmax(teacher))
    return np.where((np.argmax(p, -1) != labels) & (p.max(-1) >= config.confidence), 0.0, 1.0)


def difficulty_divergence(config, student, teacher, labels):
    return 1 - np.exp(-kl(log_softmax(teacher), log_softmax(student)) / config.divergence_scale)


DIFFICULTY_REFERENCES = {
    "none": difficulty_none, "teacher_entropy": difficulty_teacher_entropy,
    "teacher_label_prob": difficulty_teacher_label_prob, "teacher_correctness": difficulty_teacher_correctness,
    "divergence": difficulty_divergence,
}
"""g per token (dense teacher, every column finite), before masking and the sequence average."""


def _progress(config, step):
    return np.clip((np.asarray(step, np.float64) - config.warmup_steps) / config.schedule_steps, 0.0, 1.0)


def schedule_fixed(config, step):
    return np.full(np.shape(step), config.alpha)


def schedule_linear(config, step):
    return config.alpha + (config.alpha_end - config.alpha) * _progress(config, step)


def schedule_cosine(config, step):
    return config.alpha_end + (config.alpha - config.alpha_end) * (1 + np.cos(np.pi * _progress(config, step))) / 2


def schedule_step(config, step):
    return np.asarray(config.values, np.float64)[np.searchsorted(config.boundaries, step, side="right")]


SCHEDULE_REFERENCES = {
    "fixed": schedule_fixed, "linear": schedule_linear, "cosine": schedule_cosine, "step": schedule_step,
}
"""base(step) for an int array of steps, before the warm-up ramp."""


def label_log_prob(logits, labels):
    return np.take_along_axis(log_softmax(logits), np.asarray(labels)[..., None], -1)[..., 0]


def score_teacher_loss(student, teacher, labels):
    return -label_log_prob(teacher, labels)


def score_excess_loss(student, teacher, labels):
    return -label_log_prob(student, labels) + label_log_prob(teacher, labels)


def score_agreement(student, teacher, labels):
    return -(np.argmax(student, -1) == np.argmax(teacher, -1)).astype(np.float64)


SCORE_REFERENCES = {
    "teacher_loss": score_teacher_loss, "excess_loss": score_excess_loss, "agreement": score_agreement,
}
"""Per token; a row's score is their mean over its unmasked tokens."""


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
