"""The sparse (top-k) teacher of the offline cache: k = vocab is the dense loss; k < vocab follows
the documented tail treatment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses
import losses_reference as ref

KINDS = list(losses.KD_TERMS)
VOCAB = 37


def logits(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(0.0, scale, shape).astype(np.float32)


def call(kind, student, teacher, labels, **kw):
    return losses.KD_TERMS[kind](student, teacher, labels, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_with_k_equal_vocab_is_the_dense_loss(kind):
    student, teacher = logits(0, (2, 3, VOCAB)), logits(1, (2, 3, VOCAB))
    labels = np.random.default_rng(2).integers(0, VOCAB, (2, 3))

    @jax.jit
    def run(s, t):
        dense = call(kind, s, t, labels, temperature=2.0)
        return dense, [call(kind, s, losses.top_k_teacher(t, VOCAB, tail=tail), labels, temperature=2.0)
                       for tail in ("uniform", "renormalize")]

    dense, sparse = run(student, teacher)
    for values in sparse:
        np.testing.assert_allclose(np.asarray(values), np.asarray(dense), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", ["uniform", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_top_k_tail_treatment(tail, temperature):
    student, teacher = logits(3, (4, VOCAB)), logits(4, (4, VOCAB))
    sparse = losses.top_k_teacher(teacher, 5, tail=tail)
    completed = ref.dense_from_top_k(np.asarray(sparse.indices), np.asarray(sparse.log_probs), VOCAB, tail)
    with np.errstate(divide="ignore"):
        expected = ref.forward_kl(student, completed, temperature)  # temperature applied to log p
    np.testing.assert_allclose(np.asarray(losses.forward_kl(student, sparse, temperature=temperature)), expected,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(losses.reverse_kl(student, sparse, temperature=temperature)),
                               ref.reverse_kl(student, completed, temperature), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda s: jnp.sum(losses.jsd(s, sparse, temperature=temperature)))(jnp.asarray(student))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_uniform_tail_keeps_total_mass_and_out_of_range_entries_join_the_tail():
    teacher = logits(5, (4, VOCAB))
    sparse = losses.top_k_teacher(teacher, 4)
    # The student's vocabulary is the first 30 columns: entries beyond it are dropped, their mass
    # goes to the uniform tail over the 30 columns.
    student = logits(6, (4, 30))
    indices = np.asarray(sparse.indices)
    kept = indices < 30
    log_probs = np.asarray(sparse.log_probs, np.float64)
    p = np.zeros((4, 30))
    rows = np.nonzero(kept)[0]
    p[rows, indices[kept]] = np.exp(log_probs[kept])
    rest = 1.0 - p.sum(-1, keepdims=True)
    in_top = np.zeros((4, 30), bool)
    in_top[rows, indices[kept]] = True
    p = np.where(in_top, p, rest / (30 - kept.sum(-1, keepdims=True)))
    np.testing.assert_allclose(p.sum(-1), 1.0)
    np.testing.assert_allclose(np.asarray(losses.forward_kl(student, sparse)), ref.forward_kl(student, np.log(p)),
                               rtol=1e-5)


def test_sparse_teacher_checks():
    student, teacher = logits(7, (4, VOCAB)), logits(8, (4, VOCAB))
    sparse = losses.top_k_teacher(teacher, 3)
    with pytest.raises(ValueError, match="SparseTeacher.tail"):
        losses.SparseTeacher(sparse.indices, sparse.log_probs, "spread")
    with pytest.raises(ValueError, match="vocab_map"):
        losses.forward_kl(student, sparse, vocab_map=np.arange(VOCAB))
    with pytest.raises(ValueError, match="SparseTeacher"):
        losses.forward_kl(student[:2], sparse)
    whole = losses.forward_kl(student, sparse, chunk_size=None)
    np.testing.assert_allclose(np.asarray(losses.forward_kl(student, sparse, chunk_size=3)), np.asarray(whole),
                               rtol=1e-6)
