"""Difficulty filtering: row scores against a float64 numpy reference, which rows are dropped,
their weights and statistics, and the config's checks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import losses
import losses_reference as ref
from losses import FilterConfig, row_scores, row_weights

ROWS, SEQ, VOCAB = 6, 7, 11


def batch(seed=0):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(ROWS, SEQ, VOCAB)) * 2
    teacher = rng.normal(size=(ROWS, SEQ, VOCAB)) * 2
    labels = rng.integers(0, VOCAB, (ROWS, SEQ))
    mask = rng.random((ROWS, SEQ)) > 0.2
    mask[4] = False  # a padding row
    return student, teacher, labels, mask


def reference(score, student, teacher, labels, mask):
    per_token = ref.SCORE_REFERENCES[score](student, teacher, labels)
    return (per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1)


@pytest.mark.parametrize("score", losses.SCORES)
def test_row_scores_match_the_float64_reference(score):
    student, teacher, labels, mask = batch()
    t_label = ref.label_log_prob(teacher, labels)
    got = row_scores(score, teacher_label_log_prob=jnp.asarray(t_label, jnp.float32),
                     teacher_top1=jnp.asarray(teacher.argmax(-1)), student_logits=jnp.asarray(student, jnp.float32),
                     labels=jnp.asarray(labels), mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), reference(score, student, teacher, labels, mask), atol=1e-5)


@pytest.mark.parametrize("fraction, weight", [(0.5, 0.0), (0.34, 0.25), (0.0, 0.0)])
def test_row_weights_drop_the_easiest_rows_but_never_padding(fraction, weight):
    _, _, _, mask = batch()
    scores = np.array([0.3, -1.0, 2.0, 0.1, -5.0, 0.7])  # row 4 (the lowest) is padding
    weights, stats = row_weights(jnp.asarray(scores, jnp.float32), jnp.asarray(mask), FilterConfig(
        score="teacher_loss", drop_fraction=fraction, weight=weight))
    drop = int(np.floor(fraction * ROWS))
    real = [r for r in np.argsort(scores) if mask[r].any()]
    dropped = np.zeros(ROWS, bool)
    dropped[real[:drop]] = True
    np.testing.assert_allclose(np.asarray(weights), np.where(dropped, weight, 1.0))
    tokens = mask.sum(-1)
    assert float(stats["filter_kept"]) == pytest.approx((np.where(dropped, weight, 1.0) * tokens).sum() / tokens.sum())
    if drop:
        assert float(stats["filter_threshold"]) == pytest.approx(scores[dropped].max())
        assert float(stats["filter_score_dropped"]) == pytest.approx(scores[dropped].mean())
    kept = ~dropped & mask.any(-1)
    assert float(stats["filter_score_kept"]) == pytest.approx(scores[kept].mean(), rel=1e-6)


def test_filter_config_checks_and_activity():
    assert not FilterConfig().active and FilterConfig(score="agreement").active
    assert not FilterConfig(score="agreement", weight=1.0).active
    assert all(FilterConfig(score=score).active for score in losses.SCORES) and "none" not in losses.SCORES
    for kwargs, message in [({"score": "loss"}, "FilterConfig.score: got 'loss'; allowed: 'none', 'teacher_loss'"),
                            ({"drop_fraction": 1.0}, r"FilterConfig.drop_fraction: got 1.0; must be in \[0, 1\)"),
                            ({"weight": -0.1}, r"FilterConfig.weight: got -0.1; must be in \[0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            FilterConfig(**kwargs)
