"""Difficulty filtering: score each sequence (a batch row) by how much there is left to learn from
it, and drop (or down-weight) the easiest fraction of every micro-batch from a student's loss.

Llama 4 removed more than half of its "easy" fine-tuning data, judged by a model. Here the judge
is the teacher of the step (re-scored every step as a co-trained teacher learns; fixed for a
frozen or cached one), and the scores (higher = harder, over a row's unmasked tokens) are the
entries of `SCORES`: the teacher's cross-entropy on the labels, how much worse the student does
than the teacher (the reducible part, as in RHO-1's excess loss, arXiv:2404.07965), and whether
the student already predicts what the teacher does.

No gradient flows through a score or a weight.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from losses._cross_entropy import cross_entropy
from losses._head import Head
from losses._vocab import top1


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    score: str = "none"  # how a row's difficulty is judged (a name in SCORES); none: no filtering
    drop_fraction: float = 0.5  # the easiest fraction of each micro-batch's rows, in [0, 1)
    weight: float = 0.0  # the loss weight those rows keep: 0 drops them, in (0, 1) down-weights

    def __post_init__(self):
        if self.score != "none" and self.score not in SCORES:
            raise ValueError(f"FilterConfig.score: got {self.score!r}; allowed: "
                             f"{', '.join(map(repr, ('none', *SCORES)))}")
        if not 0 <= self.drop_fraction < 1:
            raise ValueError(f"FilterConfig.drop_fraction: got {self.drop_fraction!r}; must be in [0, 1)")
        if not 0 <= self.weight <= 1:
            raise ValueError(f"FilterConfig.weight: got {self.weight!r}; must be in [0, 1]")

    @property
    def active(self) -> bool:
        return self.score != "none" and self.drop_fraction > 0 and self.weight < 1


def _row_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    w = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask, values, 0.0), axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)


@dataclasses.dataclass(frozen=True)
class Score:
    """A difficulty score of a row (higher = harder), a mean over its unmasked tokens.

    Attributes:
      name: its key in `SCORES` (`FilterConfig.score`).
      compute: `compute(teacher_ce=, student_logits=, labels=, teacher_top1=, mask=) -> [..., rows]`
        from `[..., rows, seq]` inputs: teacher_ce float32 -log p_T(y), student_logits logits or a
        `Head` (read chunk by chunk), mask bool; no gradient.
      formula: one line for the docs table.
    """

    name: str
    compute: Callable[..., jax.Array]
    formula: str


def _constant(student_logits: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(student_logits).astype(jnp.float32)


def _teacher_loss(*, teacher_ce, student_logits, labels, teacher_top1, mask) -> jax.Array:
    del student_logits, labels, teacher_top1
    return jax.lax.stop_gradient(_row_mean(teacher_ce, mask))


def _excess_loss(*, teacher_ce, student_logits, labels, teacher_top1, mask) -> jax.Array:
    del teacher_top1
    if isinstance(student_logits, Head):
        student_ce = cross_entropy(jax.lax.stop_gradient(student_logits), labels, mask=mask)
    else:
        student = _constant(student_logits)
        student_ce = -jnp.take_along_axis(jax.nn.log_softmax(student, axis=-1), labels[..., None], axis=-1)[..., 0]
    return _row_mean(student_ce - teacher_ce, mask)


def _agreement(*, teacher_ce, student_logits, labels, teacher_top1, mask) -> jax.Array:
    del teacher_ce, labels
    student_top1 = top1(jax.lax.stop_gradient(student_logits))
    return -_row_mean((student_top1 == teacher_top1).astype(jnp.float32), mask)


SCORES: Mapping[str, Score] = types.MappingProxyType({score.name: score for score in (
    Score("teacher_loss", _teacher_loss, "mean −log p_T(y): the teacher's cross-entropy"),
    Score("excess_loss", _excess_loss, "mean [−log q_S(y) + log p_T(y)]: how far the student is behind the teacher "
          "(RHO-1's excess loss, arXiv:2404.07965)"),
    Score("agreement", _agreement,
          "−mean [argmax q_S = argmax p_T]: rows the student already predicts like the teacher are easy"),
)})
"""The row scores by name; `FilterConfig.score` is one of them or "none" (no filtering)."""


def row_scores(score: str, *, teacher_label_log_prob: jax.Array, teacher_top1: jax.Array, student_logits: jax.Array,
               labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Difficulty of each row, `[..., rows]` from `[..., rows, seq]` inputs (higher = harder).

    Args:
      score: a name in `SCORES`.
      teacher_label_log_prob: float `[..., seq]`, log p_T(y) per token (T = 1).
      teacher_top1: int `[..., seq]`, the teacher's most probable token.
      student_logits: `[..., seq, V]`, or a `Head` (its logits are formed chunk by chunk).
      labels, mask: `[..., seq]`.
    """
    if score not in SCORES:
        raise ValueError(f"score: got {score!r}; allowed: {', '.join(map(repr, SCORES))}")
    mask = mask > 0
    teacher_ce = -teacher_label_log_prob.astype(jnp.float32)
    return SCORES[score].compute(teacher_ce=teacher_ce, student_logits=student_logits, labels=labels,
                                 teacher_top1=teacher_top1, mask=mask)


def row_weights(scores: jax.Array, mask: jax.Array, config: FilterConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weight of each row `[rows]`, statistics): the `floor(drop_fraction * rows)` lowest-scoring
    rows get `config.weight`, the rest 1. Rows without unmasked tokens (padding) are never among
    the dropped: they weigh nothing anyway.

    Statistics: `filter_kept` (the kept share of the unmasked tokens' weight), `filter_threshold`
    (the highest dropped score), `filter_score_dropped` / `filter_score_kept` (mean scores).
    """
    rows = scores.shape[-1]
    drop = math.floor(config.drop_fraction * rows)
    tokens = jnp.sum((mask > 0).astype(jnp.float32), axis=-1)
    real = tokens > 0
    dropped = jnp.zeros((rows,), bool).at[jnp.argsort(jnp.where(real, scores, jnp.inf))[:drop]].set(True) & real
    weights = jnp.where(dropped, config.weight, 1.0)
    mean_of = lambda select: jnp.sum(jnp.where(select, scores, 0.0)) / jnp.maximum(jnp.sum(select), 1)  # noqa: E731
    stats = {"filter_kept": jnp.sum(weights * tokens) / jnp.maximum(jnp.sum(tokens), 1.0),
             "filter_threshold": jnp.max(jnp.where(dropped, scores, -jnp.inf)) if drop else jnp.zeros(()),
             "filter_score_dropped": mean_of(dropped), "filter_score_kept": mean_of(~dropped & real)}
    return jax.lax.stop_gradient(weights), jax.lax.stop_gradient(stats)
