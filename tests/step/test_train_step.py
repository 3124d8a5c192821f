"""The pure step on a tiny config: loss mixing, control isolation, teacher targets, accumulation."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distill
import losses
from distill.data import build_data
from distill.parallel import single_device_mesh
from distill.setup import build_models, fresh_state, step_plan
from distill.step import eval_metrics, eval_step, train_step

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def setup(**overrides):
    cfg = distill.load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])
    exp = distill.resolve(cfg)
    models = build_models(exp)
    plan = step_plan(exp, models, single_device_mesh())
    state = fresh_state(plan, models)
    data = build_data(cfg.data, seed=cfg.train.seed)
    batch = next(data.train_iterator())
    micro = {k: jnp.asarray(v.reshape(cfg.train.grad_accum, -1, *v.shape[1:])) for k, v in batch.items()}
    return cfg, models, plan, state, micro


def step(plan, state, batch, **kw):
    return jax.jit(lambda s, b: train_step(plan, s, b, **kw))(state, batch)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_loss_is_ce_at_alpha_0_and_kd_at_alpha_1(alpha):
    _, _, plan, state, batch = setup(**{"loss.weighting.alpha": alpha, "loss.weighting.alpha_end": alpha})
    _, metrics = step(plan, state, batch)
    expected = metrics["student/distilled/ce"] if alpha == 0.0 else metrics["student/distilled/kd"]
    np.testing.assert_allclose(metrics["student/distilled/loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["student/distilled/alpha"], alpha)


@pytest.mark.parametrize("kd", sorted(losses.KD_TERMS))
def test_every_kd_term_of_the_registry_trains_through_the_step(kd):
    """The step reads the KD term from `losses.KD_TERMS` (labels for those that need them): at a = 1 a
    student's loss is the term's token mean on the teacher's and its own logits."""
    _, models, plan, state, batch = setup(**{"loss.kd": kd, "loss.weighting.alpha": 1.0,
                                             "loss.weighting.alpha_end": 1.0})
    _, metrics = step(plan, state, batch)
    mb = {k: v[0] for k, v in batch.items()}
    run = lambda model: model(mb["tokens"], positions=mb["positions"], segment_ids=mb["segment_ids"]).logits  # noqa: E731
    mask = mb["mask"] > 0
    kd_value = losses.token_mean(losses.KD_TERMS[kd](run(models.students[0]), run(models.teacher), mb["labels"],
                                                     mask=mask), mask)
    np.testing.assert_allclose(metrics["student/distilled/kd"], kd_value, rtol=2e-5)
    np.testing.assert_allclose(metrics["student/distilled/loss"], kd_value, rtol=2e-5)


def test_control_student_loss_is_plain_ce_and_ignores_the_teacher():
    cfg, models, plan, state, batch = setup(**{"optim.warmup_steps": 0})  # a first step with lr > 0
    new_state, metrics = step(plan, state, batch)
    out = models.students[1](batch["tokens"][0], positions=batch["positions"][0], segment_ids=batch["segment_ids"][0])
    mask = batch["mask"][0] > 0
    ce = losses.token_mean(losses.cross_entropy(out.logits, batch["labels"][0], mask=mask), mask)
    np.testing.assert_allclose(metrics["student/control/loss"], ce, rtol=1e-5)
    # A different teacher changes the distilled student's update, never the control's.
    other = state.replace(teacher=state.teacher.replace(
        params=jax.tree.map(lambda p: p + 0.1, state.teacher.params)))
    other_state, _ = step(plan, other, batch)
    for a, b in zip(leaves(new_state.students[1].params), leaves(other_state.students[1].params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(new_state.students[0].params),
                                                         leaves(other_state.students[0].params)))


def test_teacher_is_not_updated_by_student_losses():
    """Student losses add nothing to the teacher's gradient (its logits are stop-gradient)."""
    _, _, plan, state, batch = setup()
    _, with_students = step(plan, state, batch)
    _, teacher_only = step(plan, state, batch, with_students=False)
    np.testing.assert_allclose(with_students["teacher/grad_norm"], teacher_only["teacher/grad_norm"], rtol=1e-6)


def test_mutual_term_moves_the_teacher():
    _, _, plan, state, batch = setup(**{"teacher.mutual_weight": 0.5})
    _, with_students = step(plan, state, batch)
    _, teacher_only = step(plan, state, batch, with_students=False)
    assert with_students["teacher/mutual"] > 0
    assert abs(float(with_students["teacher/grad_norm"]) - float(teacher_only["teacher/grad_norm"])) > 1e-6


@pytest.mark.parametrize("target", ["ema", "stale"])
def test_distillation_target_follows_the_teacher(target):
    _, _, plan, state, batch = setup(**{"teacher.target": target, "teacher.ema_decay": 0.5,
                                        "teacher.refresh_every": 2})
    s1, _ = step(plan, state, batch)
    s2, _ = step(plan, s1, batch)
    if target == "ema":
        expected = jax.tree.map(lambda t, p: 0.5 * t + 0.5 * p, state.target, s1.teacher.params)
        for a, b in zip(leaves(s1.target), leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    else:
        for a, b in zip(leaves(s1.target), leaves(state.teacher.params), strict=True):  # not refreshed at step 1
            np.testing.assert_array_equal(a, b)
        for a, b in zip(leaves(s2.target), leaves(s2.teacher.params), strict=True):  # refreshed at step 2
            np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_matches_one_big_batch():
    # The load-balancing loss is not a token mean (a product of batch statistics): switched off here.
    no_balance = {"loss.load_balance_weight": 0, "teacher.load_balance_weight": 0}
    _, _, plan1, state1, batch1 = setup(**no_balance)
    _, _, plan2, state2, _ = setup(**no_balance, **{"train.grad_accum": 2})
    batch1["mask"] = batch1["mask"].at[0, 0, :20].set(0.0)  # unequal token shares: the weighting matters
    batch2 = {k: v.reshape(2, -1, *v.shape[2:]) for k, v in batch1.items()}
    assert batch2["mask"][0].sum() != batch2["mask"][1].sum()
    _, m1 = step(plan1, state1, batch1)
    _, m2 = step(plan2, state2, batch2)
    for key in ("teacher/ce", "teacher/grad_norm", "student/distilled/ce", "student/distilled/kd",
                "student/distilled/grad_norm", "student/control/grad_norm"):
        np.testing.assert_allclose(m1[key], m2[key], rtol=2e-5, err_msg=key)


def test_eval_metrics_are_bits_per_byte():
    _, _, plan, state, batch = setup()
    flat = {k: v[0] for k, v in batch.items()}
    sums = {k: float(v) for k, v in jax.device_get(eval_step(plan, state, flat)).items()}
    metrics = eval_metrics(sums)
    np.testing.assert_allclose(metrics["eval/teacher/bpb"], sums["teacher/nats"] / sums["tokens"] / np.log(2))
    assert 0 <= metrics["eval/student/control/top1_agreement"] <= 1
    assert metrics["eval/student/distilled/kl"] >= 0


def test_difficulty_filter_trains_the_student_on_the_hardest_rows_only():
    """drop_fraction 0.5, weight 0 by teacher loss equals no filter on a batch whose easiest half of
    rows (by the teacher's float64 cross-entropy, computed here) is masked out."""
    filtered = {"students.0.loss": "{weighting: {alpha: 0.5}, filter: {score: teacher_loss, drop_fraction: 0.5}}",
                "optim.warmup_steps": 0, "teacher.warmup_steps": 0}
    _, models, plan, state, batch = setup(**filtered)
    out = models.teacher(batch["tokens"][0], positions=batch["positions"][0], segment_ids=batch["segment_ids"][0])
    logits = np.asarray(out.logits, np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = log_z - np.take_along_axis(logits, np.asarray(batch["labels"][0])[..., None], -1)[..., 0]
    mask = np.asarray(batch["mask"][0]) > 0
    row_ce = (ce * mask).sum(-1) / mask.sum(-1)
    hardest = np.argsort(row_ce)[len(row_ce) // 2:]
    new_state, metrics = step(plan, state, batch)
    assert float(metrics["student/distilled/filter_kept"]) == pytest.approx(
        mask[hardest].sum() / mask.sum(), rel=1e-6)
    assert float(metrics["student/distilled/filter_threshold"]) == pytest.approx(np.sort(row_ce)[1], rel=1e-4)

    _, _, plain_plan, plain_state, _ = setup(**{**filtered, "students.0.loss": "{weighting: {alpha: 0.5}}"})
    kept = np.zeros_like(mask)
    kept[hardest] = mask[hardest]
    masked = {**batch, "mask": jnp.asarray(kept[None].astype(np.float32))}
    plain_state, plain = step(plain_plan, plain_state, masked)
    np.testing.assert_allclose(metrics["student/distilled/loss"], plain["student/distilled/loss"], rtol=1e-5)
    for a, b in zip(leaves(new_state.students[0].params), leaves(plain_state.students[0].params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
