"""MetaP (distill/metap.py): the multiplier table, the optimizer and init scaling it drives, the
coordinate check that makes a learning rate transfer across widths, and the config switch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import distill
from distill.errors import ConfigError
from distill.metap import multipliers, scale_init, scale_learning_rates
from distill.model import build_model
from distill.model.layout import param_path
from distill.optim import OptimConfig, make_optimizer
from student.presets import STUDENT_PRESETS

TINY = Path(__file__).parent / "configs" / "tiny.yaml"
BASE = dataclasses.replace(STUDENT_PRESETS["cpu-student-tiny"], hidden_size=32, intermediate_size=32,
                           intermediate_size_mlp=64, num_attention_heads=2, num_key_value_heads=1)


def widen(m: int, depth: int = 1):
    return dataclasses.replace(BASE, hidden_size=32 * m, intermediate_size=32 * m, intermediate_size_mlp=64 * m,
                               num_attention_heads=2 * m, num_key_value_heads=m,
                               num_hidden_layers=BASE.num_hidden_layers * depth)


def test_multipliers_follow_mup_for_adam_and_the_depth_rule():
    assert set(multipliers(BASE, BASE).values()) == {(1.0, 1.0)}
    table = multipliers(widen(4, depth=2), BASE)
    assert table["embed"] == (1.0, 1.0) and table["final_norm/weight"] == (1.0, 1.0)  # input-like, vector
    assert table["lm_head"] == (0.25, 0.25)  # output-like: fan-out (vocabulary) fixed
    moe = next(p for p in table if p.endswith("feed_forward/router"))
    assert table[moe] == (0.25, 0.25)  # output-like: fan-out (experts) fixed
    q = next(p for p in table if p.endswith("attention/q"))
    assert table[q] == pytest.approx((0.5, 0.25))  # hidden: m^-1/2, 1/m
    o = next(p for p in table if p.endswith("attention/o"))
    assert table[o] == pytest.approx((0.5 * 2 ** -0.5, 0.25))  # and written into the residual: depth^-1/2
    assert len(table) > len(multipliers(BASE, BASE))  # twice the layers, each matched to its base layer


def test_learning_rate_multipliers_scale_each_parameters_adam_update_exactly():
    cfg = widen(2)
    params = nnx.state(build_model(cfg, seed=0), nnx.Param)
    grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)), params)
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant")
    plain, scaled = make_optimizer(optim, 10), make_optimizer(optim, 10, scale_learning_rates(cfg, BASE))
    u_plain, _ = plain.update(grads, plain.init(params), params)
    u_scaled, _ = scaled.update(grads, scaled.init(params), params)
    table = multipliers(cfg, BASE)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(u_plain), jax.tree.leaves(u_scaled)):
        key = param_path(path)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a) * table[key][1], rtol=1e-6, err_msg=key)


def test_init_multipliers_scale_the_standard_deviations():
    cfg = widen(4)
    plain, scaled = build_model(cfg, seed=0), build_model(cfg, seed=0)
    scale_init(scaled, BASE)
    table = multipliers(cfg, BASE)
    ours = dict(zip(table, jax.tree.leaves(nnx.state(scaled, nnx.Param))))
    theirs = dict(zip(table, jax.tree.leaves(nnx.state(plain, nnx.Param))))
    for path, (init, _) in table.items():
        np.testing.assert_allclose(np.asarray(ours[path]), np.asarray(theirs[path]) * init, rtol=1e-6, err_msg=path)
    assert float(jnp.std(ours["lm_head"])) == pytest.approx(BASE.initializer_range / 4, rel=0.05)


def _logit_change(cfg, metap: bool, steps: int = 3) -> float:
    """std of the change in logits after a few Adam steps at one learning rate (muP's coordinate check)."""
    model = build_model(cfg, seed=0)
    if metap:
        scale_init(model, BASE)
    graph, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", clip_norm=None,
                                    weight_decay=0.0), 10, scale_learning_rates(cfg, BASE) if metap else None)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 65)), jnp.int32)

    def loss(p):
        logits = nnx.merge(graph, p)(tokens[:, :-1]).logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)), logits

    _, before = loss(params)
    grad = jax.jit(jax.grad(loss, has_aux=True))
    state = tx.init(params)
    for _ in range(steps):
        grads, _ = grad(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return float(jnp.std(loss(params)[1] - before))


def test_coordinate_check_the_update_size_stops_growing_with_width():
    """Standard parametrisation: the logits move ~9x more at 8x the width (the learning rate that
    suits the narrow model blows the wide one up); MetaP: about the same at every width."""
    standard = [_logit_change(widen(m), metap=False) for m in (1, 8)]
    metap = [_logit_change(widen(m), metap=True) for m in (1, 8)]
    assert standard[0] == pytest.approx(metap[0], rel=1e-6)  # the base: nothing changes
    assert standard[1] / standard[0] > 4
    assert 0.5 < metap[1] / metap[0] < 1.5


def test_the_config_switch_and_its_errors(tmp_path):
    cfg = distill.load_config(TINY, ["students.0.optim={metap_base: {hidden_size: 8, intermediate_size: 8, "
                                     "intermediate_size_mlp: 16}}", f"run.dir={tmp_path / 'run'}",
                                     "train.steps=4", "teacher.warmup_steps=0"])
    summary = distill.run(cfg)
    assert summary["status"] == "completed" and np.isfinite(summary["bpb"]["distilled"])
    with pytest.raises(ConfigError, match=r"students\[0\].optim.metap_base.hidden_sizes: unknown"):
        distill.run(distill.load_config(TINY, ["students.0.optim={metap_base: {hidden_sizes: 8}}",
                                               f"run.dir={tmp_path / 'bad'}"]))
    with pytest.raises(ConfigError, match="the base model has no parameter like"):
        distill.run(distill.load_config(TINY, ["students.0.optim={metap_base: {tie_word_embeddings: true}}",
                                               f"run.dir={tmp_path / 'bad'}"]))
    assert not (tmp_path / "bad").exists()
