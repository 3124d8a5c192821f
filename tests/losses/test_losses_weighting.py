"""The dynamic soft/hard weight a: config validation, schedules, difficulty formulas, properties."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import losses
import losses_reference as ref
from losses import WeightingConfig

VOCAB = 37
EVERY_FIELD = {"alpha": 0.9, "alpha_end": 0.1, "warmup_steps": 5, "schedule_steps": 20, "boundaries": (10, 20),
               "values": (0.2, 0.5, 0.8), "entropy_low": 0.6, "entropy_high": 0.9, "label_prob_power": 2.0,
               "confidence": 0.3, "divergence_scale": 0.5}
"""A value for every field a schedule or a difficulty policy reads: valid for each of them."""


def allowed(registry):
    return re.escape(", ".join(map(repr, registry)))


def logits(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(0.0, scale, shape).astype(np.float32)


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "cosin"}, r"WeightingConfig.schedule: got 'cosin'; allowed: " + allowed(losses.SCHEDULES)),
    ({"difficulty": "entropy"}, r"WeightingConfig.difficulty: got 'entropy'; allowed: " + allowed(losses.DIFFICULTIES)),
    ({"granularity": "batch"}, r"WeightingConfig.granularity: got 'batch'; allowed: 'token', 'sequence'"),
    ({"alpha": 1.5}, r"WeightingConfig.alpha: got 1.5; must be in \[0.0, 1.0\]"),
    ({"alpha_end": -0.1}, r"WeightingConfig.alpha_end: got -0.1"),
    ({"schedule": "linear"}, r"WeightingConfig.schedule_steps: got 0; must be an int >= 1"),
    ({"warmup_steps": 2.5}, r"WeightingConfig.warmup_steps: got 2.5; must be an int >= 0"),
    ({"schedule": "step", "boundaries": (10,), "values": (0.1,)}, r"WeightingConfig.values: got 1 values for 1"),
    ({"schedule": "step", "boundaries": (10, 5), "values": (0, 0, 0)}, r"WeightingConfig.boundaries: got \(10, 5\)"),
    ({"schedule": "step", "boundaries": (10,), "values": (0, 1.2)}, r"WeightingConfig.values\[1\]: got 1.2"),
    ({"entropy_low": 0.6, "entropy_high": 0.5}, r"WeightingConfig.entropy_high: got 0.5; must be in \(0.6, 1.0\]"),
    ({"label_prob_power": 0}, r"WeightingConfig.label_prob_power: got 0"),
    ({"confidence": 2}, r"WeightingConfig.confidence: got 2"),
    ({"divergence_scale": 0.0}, r"WeightingConfig.divergence_scale: got 0.0"),
    ({"alpha": "0.5"}, r"WeightingConfig.alpha: got '0.5'; must be a number"),
])
def test_config_errors_name_field_value_and_allowed(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        WeightingConfig(**kwargs)


@pytest.mark.parametrize("schedule", losses.SCHEDULES)
def test_config_checks_the_fields_each_schedule_reads(schedule):
    reads = losses.SCHEDULES[schedule].fields
    for field, bad, message in [("schedule_steps", 0, "schedule_steps: got 0; must be an int >= 1"),
                                ("values", (0.5,), "values: got 1 values for 2 boundaries")]:
        fields = {**EVERY_FIELD, field: bad}
        if field in reads:
            with pytest.raises(ValueError, match=message):
                WeightingConfig(schedule=schedule, **fields)
        else:
            WeightingConfig(schedule=schedule, **fields)


def test_config_is_frozen_hashable_and_accepts_yaml_lists():
    config = WeightingConfig(schedule="step", boundaries=[10], values=[0.1, 0.9])
    assert config.boundaries == (10,) and config.values == (0.1, 0.9)
    assert hash(config) == hash(WeightingConfig(schedule="step", boundaries=(10,), values=(0.1, 0.9)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.alpha = 0.3


@pytest.mark.parametrize("config, step, expected", [
    (WeightingConfig(alpha=0.3), 12345, 0.3),
    (WeightingConfig(alpha=0.8, warmup_steps=10), 0, 0.0),
    (WeightingConfig(alpha=0.8, warmup_steps=10), 5, 0.4),
    (WeightingConfig(alpha=0.8, warmup_steps=10), 100, 0.8),
    (WeightingConfig(schedule="linear", alpha=0.2, alpha_end=1.0, schedule_steps=100), 50, 0.6),
    (WeightingConfig(schedule="linear", alpha=0.2, alpha_end=1.0, schedule_steps=100), 200, 1.0),
    (WeightingConfig(schedule="cosine", alpha=1.0, alpha_end=0.0, warmup_steps=20, schedule_steps=100), 10, 0.5),
    (WeightingConfig(schedule="cosine", alpha=1.0, alpha_end=0.0, warmup_steps=20, schedule_steps=100), 20, 1.0),
    (WeightingConfig(schedule="cosine", alpha=1.0, alpha_end=0.0, warmup_steps=20, schedule_steps=100), 70, 0.5),
    (WeightingConfig(schedule="cosine", alpha=1.0, alpha_end=0.0, warmup_steps=20, schedule_steps=100), 120, 0.0),
    (WeightingConfig(schedule="step", boundaries=(10, 20), values=(0.0, 0.5, 1.0)), 9, 0.0),
    (WeightingConfig(schedule="step", boundaries=(10, 20), values=(0.0, 0.5, 1.0)), 10, 0.5),
    (WeightingConfig(schedule="step", boundaries=(10, 20), values=(0.0, 0.5, 1.0)), 25, 1.0),
])
def test_schedules(config, step, expected):
    np.testing.assert_allclose(float(losses.schedule_alpha(config, step)), expected, atol=1e-6)
    np.testing.assert_allclose(float(jax.jit(losses.schedule_alpha, static_argnums=0)(config, step)), expected,
                               atol=1e-6)


def numpy_alpha(config, steps):
    ramp = np.clip(steps / config.warmup_steps, 0, 1) if config.warmup_steps else 1.0
    return np.clip(ramp * ref.SCHEDULE_REFERENCES[config.schedule](config, steps), 0, 1)


@pytest.mark.parametrize("schedule", losses.SCHEDULES)
def test_schedules_take_an_array_of_steps(schedule):
    config = WeightingConfig(schedule=schedule, **EVERY_FIELD)
    steps = np.array([[0, 3, 5], [9, 10, 15], [20, 25, 12345]])
    expected = [[float(losses.schedule_alpha(config, int(s))) for s in row] for row in steps]
    np.testing.assert_allclose(np.asarray(losses.schedule_alpha(config, steps)), expected, atol=1e-6)
    np.testing.assert_allclose(expected, numpy_alpha(config, steps), atol=1e-6)


def numpy_difficulty(config, student, teacher, labels, mask):
    g = np.where(mask, ref.DIFFICULTY_REFERENCES[config.difficulty](config, student, teacher, labels), 0.0)
    if config.granularity == "sequence":
        g = np.broadcast_to(g.sum(-1, keepdims=True) / np.maximum(mask.sum(-1, keepdims=True), 1), g.shape)
    return np.where(mask, g, 0.0)


@pytest.mark.parametrize("difficulty", losses.DIFFICULTIES)
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_difficulty_formulas(difficulty, granularity):
    config = WeightingConfig(difficulty=difficulty, granularity=granularity, **EVERY_FIELD)
    student, teacher = logits(0, (3, 6, VOCAB), 2.0), logits(1, (3, 6, VOCAB), 2.0)
    labels = np.random.default_rng(2).integers(0, VOCAB, (3, 6))
    labels[:, 0] = np.argmax(teacher[:, 0], -1)  # some tokens where the teacher is right
    mask = np.ones((3, 6), bool)
    mask[1, 4:] = False
    mask[2] = False
    alpha = losses.compute_alpha(config, step=7, student_logits=student, teacher_logits=teacher, labels=labels,
                                 mask=mask)
    expected = numpy_alpha(config, np.array(7)) * numpy_difficulty(config, student, teacher, labels, mask)
    np.testing.assert_allclose(np.asarray(alpha), expected, rtol=1e-5, atol=1e-6)


configs = st.builds(
    WeightingConfig,
    schedule=st.just("linear"), alpha=st.sampled_from([0.0, 0.4, 1.0]), alpha_end=st.just(1.0),
    warmup_steps=st.sampled_from([0, 5]), schedule_steps=st.just(10),
    difficulty=st.sampled_from(list(losses.DIFFICULTIES)), granularity=st.sampled_from(losses.GRANULARITIES),
)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(config=configs, step=st.integers(0, 30), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([0.1, 3.0, 1e4]))
def test_alpha_is_in_unit_interval_zero_on_masked_tokens_and_carries_no_gradient(config, step, seed, scale):
    student, teacher = logits(seed, (2, 5, 16), scale), logits(seed + 1, (2, 5, 16), scale)
    labels = np.random.default_rng(seed).integers(0, 16, (2, 5))
    mask = np.random.default_rng(seed + 2).random((2, 5)) < 0.7

    def total(s, t):
        a = losses.compute_alpha(config, step=step, student_logits=s, teacher_logits=t, labels=labels, mask=mask)
        return jnp.sum(a * jnp.sum(s * t, -1)), a

    (_, alpha), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(jnp.asarray(student),
                                                                                jnp.asarray(teacher))
    alpha = np.asarray(alpha)
    assert np.all((alpha >= 0) & (alpha <= 1)) and np.all(alpha[~mask] == 0)
    # d/ds sum(a * <s, t>) is a * t exactly when a has no gradient (likewise for t).
    np.testing.assert_allclose(np.asarray(grads[0]), alpha[..., None] * teacher, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[1]), alpha[..., None] * student, rtol=1e-6)


def test_sparse_teacher_statistics_equal_dense_at_full_k():
    config = WeightingConfig(difficulty="teacher_entropy")
    student, teacher = logits(3, (4, VOCAB)), logits(4, (4, VOCAB))
    labels = np.random.default_rng(5).integers(0, VOCAB, (4,))
    dense = losses.compute_alpha(config, step=0, student_logits=student, teacher_logits=teacher, labels=labels)
    sparse = losses.compute_alpha(config, step=0, student_logits=student,
                                  teacher_logits=losses.top_k_teacher(teacher, VOCAB), labels=labels)
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), rtol=1e-5)
