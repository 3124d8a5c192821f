"""The student's distillation loss in one call: CE on the hard labels and a KD term mixed per
token by the dynamic weight a, with the statistics to log; one fused chunked pass."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from losses._chunking import DEFAULT_CHUNK_SIZE, map_tokens
from losses._common import hyperparameter, may_be_nonzero, token_mask
from losses._cross_entropy import ce_terms
from losses._divergences import KD_TERMS
from losses._kd import KDRow, KDTerm, check_teacher
from losses._reduce import token_mean
from losses._vocab import Columns, SparseTeacher, resolve_columns
from losses.weighting import DIFFICULTIES, StatsRow, WeightingConfig, alpha_from_stats, alpha_stats


def _kd_term(kd: str) -> KDTerm:
    if kd not in KD_TERMS:
        raise ValueError(f"kd: got {kd!r}; allowed: {', '.join(map(repr, KD_TERMS))}")
    return KD_TERMS[kd]


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array | SparseTeacher, labels: jax.Array, *,
                      step, weighting: WeightingConfig, kd: str = "forward_kl",
                      kd_kwargs: Mapping[str, Any] | None = None, temperature: float = 1.0,
                      mask: jax.Array | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                      vocab_size: int | None = None, vocab_map=None,
                      chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token (1 - a) * CE(hard) + a * KD (+ z-loss), and the statistics to log.

    CE, the KD term and the teacher statistics that drive a are computed in one chunked pass
    (the student's log-softmax is shared); a has no gradient, nor has the teacher.

    Args:
      student_logits: `[..., V]`, any float dtype.
      teacher_logits: `[..., V_T]` or a `SparseTeacher`.
      labels: int `[...]`, the next tokens; labels < 0 are ignored like `mask`.
      step: the integer training step (may be traced), for the schedule of a.
      weighting: the soft/hard weighting policy.
      kd: a name in `KD_TERMS`.
      kd_kwargs: the KD term's own parameters (e.g. {"beta": 0.5} for "jsd").
      temperature: T > 0 of the KD term (CE and the difficulty statistics use T = 1).
      mask: bool `[...]`; None keeps all tokens.
      label_smoothing: eps of the CE term.
      z_loss: weight of logsumexp(student_logits)^2, added outside the mixture (a does not scale
        a regulariser).
      vocab_size, vocab_map, chunk_size: as for the KD terms.

    Returns:
      `(per_token_loss, stats)`: float32 `[...]`, 0 on masked tokens; and a dict of float32
      scalars: "loss", "ce", "kd" (token means of the unweighted terms), "z_loss" (when
      z_loss > 0), "alpha_mean", "alpha_p10", "alpha_p50", "alpha_p90", "teacher_accuracy",
      "teacher_wrong_frac" (argmax != label), "teacher_entropy" (normalised, mean), "tokens".
      Reduce per_token_loss with `token_mean` or `sequence_mean`.
    """
    term = _kd_term(kd)
    params = term.check_params(kd_kwargs)
    temperature = hyperparameter("temperature", temperature, low=0.0, open_low=True)
    label_smoothing = hyperparameter("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = hyperparameter("z_loss", z_loss, low=0.0)
    lead = student_logits.shape[:-1]
    if labels.shape != lead:
        raise ValueError(f"labels {labels.shape} must have the leading shape of student_logits {student_logits.shape}")
    cols = resolve_columns(student_logits.shape[-1], check_teacher(student_logits, teacher_logits),
                           vocab_size=vocab_size, vocab_map=vocab_map)
    stats = StatsRow(cols, with_divergence=DIFFICULTIES[weighting.difficulty].needs_divergence)
    row = DistillationRow(KDRow(term, cols), stats, Columns(cols.size), smoothing=may_be_nonzero(label_smoothing),
                          z=may_be_nonzero(z_loss))
    rows = {"teacher": teacher_logits, "labels": labels, "mask": token_mask(lead, mask, labels)}
    consts = {"temperature": temperature, "params": params, "label_smoothing": label_smoothing, "z_loss": z_loss}
    return _distillation(row, weighting, chunk_size, student_logits, rows, consts, step)


@dataclasses.dataclass(frozen=True)
class DistillationRow:
    """One pass per chunk: CE, the KD term and the teacher statistics share the student's and the
    teacher's rows (XLA merges the common log-softmax work)."""

    kd: KDRow
    stats: StatsRow
    ce_cols: Columns
    smoothing: bool
    z: bool

    def __call__(self, student: jax.Array, rows: dict[str, Any], consts: dict[str, Any]) -> dict[str, jax.Array]:
        smoothing = consts["label_smoothing"] if self.smoothing else None
        ce, lse = ce_terms(student, rows["labels"], rows["mask"], self.ce_cols, smoothing)
        out = {"ce": ce, "kd": self.kd(student, rows, consts), **self.stats(student, rows)}
        if self.z:
            out["z_loss"] = consts["z_loss"] * lse**2
        return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _distillation(row: DistillationRow, weighting: WeightingConfig, chunk_size: int | None, student_logits,
                  rows: dict[str, Any], consts: dict[str, Any], step) -> tuple[jax.Array, dict[str, jax.Array]]:
    keep = rows["mask"]
    terms = map_tokens(row, student_logits, rows, consts, chunk_size=chunk_size)
    alpha = alpha_from_stats(weighting, step, terms, keep)
    loss = (1.0 - alpha) * terms["ce"] + alpha * terms["kd"]
    if row.z:
        loss = loss + terms["z_loss"]
    stats = {
        "loss": token_mean(loss, keep),
        "ce": token_mean(terms["ce"], keep),
        "kd": token_mean(terms["kd"], keep),
        **alpha_stats(alpha, keep),
        "teacher_accuracy": token_mean(terms["teacher_correct"], keep),
        "teacher_wrong_frac": token_mean(1.0 - terms["teacher_correct"], keep),
        "teacher_entropy": token_mean(terms["teacher_entropy"], keep),
        "tokens": jnp.sum(keep).astype(jnp.float32),
    }
    if row.z:
        stats["z_loss"] = token_mean(terms["z_loss"], keep)
    return loss, jax.lax.stop_gradient(stats)
