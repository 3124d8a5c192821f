"""compiled_step / initial_state / random_batch: the step outside a run (benchmarks, notebooks)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

import distill
from distill.data import build_data
from distill.setup import compiled_step, initial_state, random_batch

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


def test_random_batch_has_the_layout_of_real_batches():
    cfg = distill.load_config(TINY, ["train.grad_accum=2"])
    real = next(build_data(cfg.data, seed=0).train_iterator())
    fake = random_batch(cfg)
    assert set(fake) == set(real)
    for key, value in real.items():
        assert fake[key].dtype == value.dtype and fake[key].shape == (2, value.shape[0] // 2, *value.shape[1:])
    np.testing.assert_array_equal(np.asarray(fake["labels"])[..., :-1], np.asarray(fake["tokens"])[..., 1:])


def test_initial_state_is_a_fresh_runs_and_the_step_trains_it():
    cfg = distill.load_config(TINY, ["teacher.warmup_steps=0"])
    state = initial_state(cfg)
    fresh = nnx.to_pure_dict(nnx.state(distill.build_model(distill.resolve(cfg).teacher.model, seed=cfg.train.seed), nnx.Param))
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(state.teacher.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    step, batch = compiled_step(cfg), random_batch(cfg)
    losses = []
    for _ in range(6):  # one fixed batch: every model's loss falls
        state, metrics = step(state, batch)
        losses.append([float(metrics[f"{m}/loss"]) for m in ("teacher", "student/distilled", "student/control")])
    assert int(state.step) == 6 and all(last < first for first, last in zip(losses[0], losses[-1]))
    teacher_only = compiled_step(cfg, with_students=False)
    _, metrics = teacher_only(state, batch)
    assert "teacher/loss" in metrics and not [k for k in metrics if k.startswith("student/")]
