"""The fused LM head (`losses.Head`): every loss taking logits also takes hidden states and a head
weight, forms the logits chunk by chunk, and its gradient (w.r.t. the hidden states and the weight)
equals the unfused path's and a float64 torch reference's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import losses
import losses_reference as ref
from losses import Head, WeightingConfig

KINDS = list(losses.KD_TERMS)
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"lam": 0.2}, "skew_reverse_kl": {"lam": 0.2}}
SHAPE = (2, 7)  # 14 tokens: chunk 4 does not divide them (the last chunk overlaps the one before)
HIDDEN, PADDED, VOCAB = 8, 41, 37  # the head has 4 padding columns, ignored with vocab_size=37
CHUNK = 4


def inputs(seed):
    rng = np.random.default_rng(seed)
    f = lambda *shape, scale=1.0: (scale * rng.normal(size=shape)).astype(np.float32)  # noqa: E731
    labels = rng.integers(0, VOCAB, SHAPE)
    labels[0, 1] = -100  # ignored
    mask = np.ones(SHAPE, bool)
    mask[1, 5:] = False
    weights = rng.uniform(0.5, 1.5, SHAPE).astype(np.float32)  # per-token cotangents differ
    return {"h": f(*SHAPE, HIDDEN), "w": f(HIDDEN, PADDED, scale=0.8), "ht": f(*SHAPE, HIDDEN),
            "wt": f(HIDDEN, PADDED, scale=0.8), "labels": labels, "mask": mask, "weights": weights}


def term(kind, student, teacher, x):
    if kind == "ce":
        return losses.cross_entropy(student, x["labels"], mask=x["mask"], vocab_size=VOCAB, label_smoothing=0.1,
                                    z_loss=1e-3, chunk_size=CHUNK)
    return losses.KD_TERMS[kind](student, teacher, x["labels"], temperature=2.0, mask=x["mask"], vocab_size=VOCAB,
                                 chunk_size=CHUNK, **PARAMS.get(kind, {}))


def value_and_grads(kind, x, fused):
    def loss(h, w):
        if fused:
            student, teacher = Head(h, w), Head(jnp.asarray(x["ht"]), jnp.asarray(x["wt"]))
        else:
            student, teacher = Head(h, w).logits(), Head(jnp.asarray(x["ht"]), jnp.asarray(x["wt"])).logits()
        return jnp.sum(x["weights"] * term(kind, student, teacher, x))
    return jax.jit(jax.value_and_grad(loss, (0, 1)))(x["h"], x["w"])


def torch_value_and_grads(kind, x):
    """float64 torch: logits = h @ W, the term from `losses_reference`, autograd."""
    h = torch.tensor(x["h"], dtype=torch.float64, requires_grad=True)
    w = torch.tensor(x["w"], dtype=torch.float64, requires_grad=True)
    s = (h @ w)[..., :VOCAB]
    t = (torch.tensor(x["ht"], dtype=torch.float64) @ torch.tensor(x["wt"], dtype=torch.float64))[..., :VOCAB]
    labels = torch.tensor(x["labels"])
    keep = torch.tensor(x["mask"]) & (labels >= 0) if kind in ("ce", "dkd") else torch.tensor(x["mask"])
    safe = torch.where(keep, labels, 0)
    if kind == "ce":
        logq = torch.log_softmax(s, -1)
        nll = -logq.gather(-1, safe[..., None])[..., 0]
        values = 0.9 * nll - 0.1 * logq.mean(-1) + 1e-3 * torch.logsumexp(s, -1) ** 2
    else:
        args = (s, t, safe.numpy()) if losses.KD_TERMS[kind].needs_labels else (s, t)
        values = ref.TORCH_REFERENCES[kind](*args, **PARAMS.get(kind, {}), temperature=2.0)
    total = torch.sum(torch.where(keep, values, 0.0) * torch.tensor(x["weights"], dtype=torch.float64))
    total.backward()
    return total.item(), h.grad.numpy(), w.grad.numpy()


@pytest.mark.parametrize("kind", ["ce"] + KINDS)
def test_gradients_equal_unfused_and_float64_torch(kind):
    x = inputs(0)
    fused_value, (fused_h, fused_w) = value_and_grads(kind, x, fused=True)
    value, (grad_h, grad_w) = value_and_grads(kind, x, fused=False)
    np.testing.assert_allclose(fused_value, value, rtol=1e-5)
    np.testing.assert_allclose(fused_h, grad_h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fused_w, grad_w, rtol=1e-4, atol=1e-5)
    expected_value, expected_h, expected_w = torch_value_and_grads(kind, x)
    np.testing.assert_allclose(fused_value, expected_value, rtol=1e-5)
    np.testing.assert_allclose(fused_h, expected_h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fused_w, expected_w, rtol=1e-4, atol=1e-5)
    assert not np.any(fused_h[1, 5:])  # masked tokens get exactly no gradient


@pytest.mark.parametrize("difficulty", ["teacher_label_prob", "divergence"])
def test_distillation_loss_statistics_and_gradients_equal_unfused(difficulty):
    """The whole student objective: CE, a KD term and the weighting statistics from one chunk loop in
    which the teacher's logits are formed too."""
    x = inputs(1)
    config = WeightingConfig(schedule="linear", alpha=0.2, alpha_end=1.0, schedule_steps=10, difficulty=difficulty,
                             granularity="sequence")

    def run(fused):
        def loss(h, w):
            student = Head(h, w) if fused else Head(h, w).logits()
            teacher = Head(jnp.asarray(x["ht"]), jnp.asarray(x["wt"]))
            per_token, stats = losses.distillation_loss(
                student, teacher if fused else teacher.logits(), x["labels"], step=4, weighting=config, kd="jsd",
                temperature=2.0, mask=x["mask"], label_smoothing=0.1, vocab_size=VOCAB, chunk_size=CHUNK)
            return losses.token_mean(per_token, x["mask"]), stats
        return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x["h"], x["w"])

    (fused_value, fused_stats), fused_grads = run(True)
    (value, stats), grads = run(False)
    np.testing.assert_allclose(fused_value, value, rtol=1e-5)
    for key in stats:
        np.testing.assert_allclose(fused_stats[key], stats[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for got, expected in zip(fused_grads, grads):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_sparse_teacher_and_top_k_and_top1_of_a_head():
    x = inputs(2)
    head = Head(jnp.asarray(x["h"]), jnp.asarray(x["w"]))
    logits = head.logits()
    np.testing.assert_array_equal(losses.top1(head, chunk_size=CHUNK), jnp.argmax(logits, -1))
    fused, dense = losses.top_k_teacher(head, 5, chunk_size=CHUNK), losses.top_k_teacher(logits, 5)
    np.testing.assert_array_equal(fused.indices, dense.indices)
    np.testing.assert_allclose(fused.log_probs, dense.log_probs, rtol=1e-6, atol=1e-6)

    def kd(h, w, fused_student):
        student = Head(h, w) if fused_student else Head(h, w).logits()
        return jnp.sum(losses.forward_kl(student, dense, mask=x["mask"], chunk_size=CHUNK))
    got = jax.grad(kd, (0, 1))(x["h"], x["w"], True)
    expected = jax.grad(kd, (0, 1))(x["h"], x["w"], False)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_head_gradient_dtypes_and_values():
    x = inputs(3)
    h, w = jnp.asarray(x["h"], jnp.bfloat16), jnp.asarray(x["w"], jnp.bfloat16)

    def loss(h, w, fused):
        student = Head(h, w) if fused else Head(h, w).logits()
        return jnp.sum(losses.cross_entropy(student, x["labels"], mask=x["mask"], chunk_size=CHUNK))
    fused = jax.grad(loss, (0, 1))(h, w, True)
    unfused = jax.grad(loss, (0, 1))(h, w, False)
    assert fused[0].dtype == jnp.bfloat16 and fused[1].dtype == jnp.bfloat16
    for a, b in zip(fused, unfused):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=2e-2)


def test_head_shape_checks():
    with pytest.raises(ValueError, match=r"Head: hidden \(3, 8\) and weight \(7, 5\)"):
        Head(jnp.zeros((3, 8)), jnp.zeros((7, 5)))
    assert Head(jnp.zeros((2, 3, 8)), jnp.zeros((8, 5))).shape == (2, 3, 5)
    assert Head(jnp.zeros((2, 3, 8)), jnp.zeros((8, 5)))[1:].shape == (1, 3, 5)
