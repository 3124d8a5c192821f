"""MoE auxiliary losses: Switch load balancing, router z-loss, router distillation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import losses
import losses_reference as ref


def router(seed, shape):
    return np.random.default_rng(seed).normal(0.0, 2.0, shape).astype(np.float32)


def transformers_balance(router_logits, top_k, num_experts):
    """transformers' `load_balancing_loss_func` (Mixtral, Llama 4) for one unmasked layer."""
    weights = torch.softmax(torch.tensor(router_logits), -1)
    _, selected = torch.topk(weights, top_k, -1)
    expert_mask = torch.nn.functional.one_hot(selected, num_experts).float()
    tokens_per_expert = expert_mask.mean(0)
    return float(num_experts * (tokens_per_expert * weights.mean(0).unsqueeze(0)).sum())


def test_load_balancing_matches_numpy_and_transformers():
    logits = router(0, (2, 50, 8))
    chosen = np.argsort(-logits, -1)[..., :2]
    mask = np.ones((2, 50), bool)
    mask[1, 30:] = False
    got = np.asarray(losses.load_balancing_loss(logits, chosen, num_experts=8, mask=mask))
    assert got.shape == (2,)
    for b, n in ((0, 50), (1, 30)):
        probs = np.exp(ref.log_softmax(logits[b, :n]))
        fraction = np.bincount(chosen[b, :n].ravel(), minlength=8) / (n * 2)
        np.testing.assert_allclose(got[b], 8 * np.sum(fraction * probs.mean(0)), rtol=1e-5)
    np.testing.assert_allclose(2 * got[0], transformers_balance(logits[0], 2, 8), rtol=1e-5)


def test_load_balancing_extremes_and_masking():
    uniform = np.zeros((16, 4), np.float32)
    balanced = np.arange(16).reshape(16, 1) % 4
    np.testing.assert_allclose(float(losses.load_balancing_loss(uniform, balanced, num_experts=4)), 1.0, rtol=1e-6)
    collapsed = np.tile(np.array([[30.0, 0, 0, 0]], np.float32), (16, 1))
    np.testing.assert_allclose(float(losses.load_balancing_loss(collapsed, np.zeros((16, 1), int), num_experts=4)),
                               4.0, rtol=1e-5)
    assert float(losses.load_balancing_loss(collapsed, np.zeros((16, 1), int), num_experts=4,
                                            mask=np.zeros(16, bool))) == 0.0
    with pytest.raises(ValueError, match="num_experts"):
        losses.load_balancing_loss(uniform, balanced, num_experts=8)


def test_router_z_loss():
    logits = router(1, (3, 10, 6))
    mask = np.arange(10) < 7
    got = np.asarray(losses.router_z_loss(logits, mask=np.broadcast_to(mask, (3, 10))))
    np.testing.assert_allclose(got[:, :7], ref.logsumexp(logits[:, :7].astype(np.float64)) ** 2, rtol=1e-5)
    assert np.all(got[:, 7:] == 0)


def test_router_distillation_same_expert_count():
    student, teacher = router(2, (20, 8)), router(3, (20, 8))
    got = losses.router_distillation(student, teacher, temperature=2.0)
    np.testing.assert_allclose(np.asarray(got), ref.forward_kl(student, teacher, 2.0), rtol=1e-5)
    grad = jax.grad(lambda t: jnp.sum(losses.router_distillation(student, t)))(jnp.asarray(teacher))
    assert np.all(np.asarray(grad) == 0)


def test_router_distillation_merges_mapped_experts():
    student, teacher = router(4, (20, 4)), router(5, (20, 8))
    expert_map = np.array([0, 0, 1, 1, 2, 2, 3, -1])
    got = losses.router_distillation(student, teacher, expert_map=expert_map, mask=np.arange(20) < 15)
    p = np.exp(ref.log_softmax(teacher.astype(np.float64)))
    merged = np.stack([p[:, 0] + p[:, 1], p[:, 2] + p[:, 3], p[:, 4] + p[:, 5], p[:, 6]], -1)
    merged /= merged.sum(-1, keepdims=True)
    expected = ref.kl(np.log(merged), ref.log_softmax(student))
    np.testing.assert_allclose(np.asarray(got)[:15], expected[:15], rtol=1e-5)
    assert np.all(np.asarray(got)[15:] == 0)
    with pytest.raises(ValueError, match="pass expert_map"):
        losses.router_distillation(student, teacher)
    with pytest.raises(ValueError, match="expert_map"):
        losses.router_distillation(student, teacher, expert_map=np.array([0, 1, 2, 3]))
