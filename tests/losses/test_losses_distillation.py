"""distillation_loss, its KD-term errors, masked reductions and the chunked memory bound."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses
import losses_reference as ref
from losses import WeightingConfig

KINDS = list(losses.KD_TERMS)
VOCAB = 37
SHAPE = (2, 3)


def batch(seed, shape=SHAPE, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    student = rng.normal(0, 3, shape + (vocab,)).astype(np.float32)
    teacher = rng.normal(0, 3, shape + (vocab,)).astype(np.float32)
    labels = rng.integers(0, vocab, shape)
    labels[..., 0] = np.argmax(teacher[..., 0, :], -1)  # the teacher is right on some tokens
    return student, teacher, labels


def test_registry_and_its_errors():
    student, teacher, labels = batch(0)
    with pytest.raises(ValueError, match=re.escape(f"kd: got 'kl'; allowed: {', '.join(map(repr, losses.KD_TERMS))}")):
        losses.distillation_loss(student, teacher, labels, step=0, weighting=WeightingConfig(), kd="kl")
    with pytest.raises(ValueError, match=r"kd_kwargs: \['lam'\] not parameters of 'jsd'; allowed: \['beta'\]"):
        losses.distillation_loss(student, teacher, labels, step=0, weighting=WeightingConfig(), kd="jsd",
                                 kd_kwargs={"lam": 0.1})


CONFIG = WeightingConfig(schedule="linear", alpha=0.2, alpha_end=1.0, schedule_steps=10,
                         difficulty="teacher_label_prob")


@functools.cache
def fused_and_parts(kind):
    """distillation_loss and, in the same jitted program, the public terms it should combine."""

    @jax.jit
    def run(student, teacher, labels, mask):
        loss, stats = losses.distillation_loss(student, teacher, labels, step=5, weighting=CONFIG, kd=kind,
                                               temperature=2.0, mask=mask, label_smoothing=0.1)
        keep = mask & (labels >= 0)
        ce = losses.cross_entropy(student, labels, label_smoothing=0.1, mask=mask)
        kd = losses.KD_TERMS[kind](student, teacher, labels, temperature=2.0, mask=keep)
        alpha = losses.compute_alpha(CONFIG, step=5, student_logits=student, teacher_logits=teacher, labels=labels,
                                     mask=mask)
        return loss, stats, ce, kd, alpha

    return run


@pytest.mark.parametrize("kind", KINDS)
def test_equals_the_public_terms_mixed_by_alpha(kind):
    student, teacher, labels = batch(1)
    mask = np.array([[True, True, False], [True, True, True]])
    labels[1, 1] = -100  # ignored like the mask
    loss, stats, ce, kd, alpha = jax.tree.map(np.asarray, fused_and_parts(kind)(student, teacher, labels, mask))
    keep = mask & (labels >= 0)
    np.testing.assert_allclose(loss, (1 - alpha) * ce + alpha * kd, rtol=1e-5, atol=1e-6)
    assert np.all(loss[~keep] == 0)
    correct = (np.argmax(teacher, -1) == labels)[keep]
    expected = {
        "loss": np.mean(((1 - alpha) * ce + alpha * kd)[keep]), "ce": np.mean(ce[keep]), "kd": np.mean(kd[keep]),
        "alpha_mean": np.mean(alpha[keep]), "alpha_p10": np.quantile(alpha[keep], 0.1),
        "alpha_p50": np.quantile(alpha[keep], 0.5), "alpha_p90": np.quantile(alpha[keep], 0.9),
        "teacher_accuracy": np.mean(correct), "teacher_wrong_frac": 1 - np.mean(correct), "tokens": keep.sum(),
    }
    for key, value in expected.items():
        np.testing.assert_allclose(stats[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert 0 <= stats["teacher_entropy"] <= 1


def test_gradient_treats_alpha_as_a_constant():
    """With a divergence-driven a (a function of the student), the gradient is still
    (1 - a) dCE + a dKD: nothing flows through a."""
    student, teacher, labels = batch(2)
    config = WeightingConfig(alpha=0.7, difficulty="divergence")

    @jax.jit
    def grads(s):
        alpha = losses.compute_alpha(config, step=0, student_logits=s, teacher_logits=teacher, labels=labels)

        def mixed(x):
            loss, _ = losses.distillation_loss(x, teacher, labels, step=0, weighting=config, kd="jsd", temperature=2.0)
            return losses.token_mean(loss)

        def constant_alpha(x):
            kd = losses.jsd(x, teacher, temperature=2.0)
            return losses.token_mean((1 - alpha) * losses.cross_entropy(x, labels) + alpha * kd)

        return jax.grad(mixed)(s), jax.grad(constant_alpha)(s)

    mixed, constant = grads(jnp.asarray(student))
    np.testing.assert_allclose(np.asarray(mixed), np.asarray(constant), rtol=1e-5, atol=1e-7)


def test_z_loss_is_outside_the_mixture_and_logged():
    student, teacher, labels = batch(3)
    config = WeightingConfig(alpha=1.0)

    @jax.jit
    def run(s):
        plain, _ = losses.distillation_loss(s, teacher, labels, step=0, weighting=config)
        with_z, stats = losses.distillation_loss(s, teacher, labels, step=0, weighting=config, z_loss=1e-2)
        return plain, with_z, stats["z_loss"]

    plain, with_z, logged = run(student)
    z = 1e-2 * ref.logsumexp(student.astype(np.float64)) ** 2
    np.testing.assert_allclose(np.asarray(with_z) - np.asarray(plain), z, rtol=1e-4)
    np.testing.assert_allclose(float(logged), z.mean(), rtol=1e-5)


def test_sparse_teacher_chunking_and_a_fully_masked_batch():
    student, teacher, labels = batch(4, shape=(2, 5))
    config = WeightingConfig(alpha=0.5, difficulty="teacher_entropy", granularity="sequence")

    @jax.jit
    def run(s, t):
        def loss(x, teacher_logits, chunk, mask=None):
            return losses.distillation_loss(x, teacher_logits, labels, step=4, weighting=config, kd="dkd",
                                            temperature=1.5, chunk_size=chunk, mask=mask)

        def value_and_grad(chunk):
            def f(x):
                per_token, stats = loss(x, t, chunk)
                return losses.sequence_mean(per_token), (per_token, stats)
            return jax.value_and_grad(f, has_aux=True)(s)

        sparse = loss(s, losses.top_k_teacher(t, VOCAB), None)[0]
        nothing = loss(s, t, None, mask=jnp.zeros((2, 5), bool))
        return value_and_grad(3), value_and_grad(None), sparse, nothing

    chunked, whole, sparse_loss, (masked_loss, masked_stats) = run(student, teacher)
    ((_, (loss_c, stats_c)), grad_c), ((_, (loss_w, stats_w)), grad_w) = chunked, whole
    np.testing.assert_allclose(np.asarray(loss_c), np.asarray(loss_w), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_c), np.asarray(grad_w), rtol=1e-5, atol=1e-7)
    for key in stats_w:
        np.testing.assert_allclose(float(stats_c[key]), float(stats_w[key]), rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(np.asarray(sparse_loss), np.asarray(loss_w), rtol=1e-5)
    assert np.all(np.asarray(masked_loss) == 0)
    assert all(float(v) == 0 for v in masked_stats.values())


def test_masked_reductions():
    values = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    np.testing.assert_allclose(float(losses.token_mean(values, mask)), values[mask].mean(), rtol=1e-6)
    per_sequence = [values[0, :2].mean(), values[1].mean()]
    np.testing.assert_allclose(float(losses.sequence_mean(values, mask)), np.mean(per_sequence), rtol=1e-6)
    np.testing.assert_allclose(float(losses.token_mean(values)), values.mean(), rtol=1e-6)
    values[~mask] = np.nan
    for reduce in (losses.token_mean, losses.sequence_mean):
        assert float(reduce(values, np.zeros((3, 4), bool))) == 0.0
        assert np.isfinite(float(reduce(values, mask)))
    np.testing.assert_allclose(np.asarray(losses.masked_quantiles(values, mask, (0.0, 0.25, 0.5, 1.0))),
                               np.quantile(values[mask], [0.0, 0.25, 0.5, 1.0]), rtol=1e-6)


def test_chunked_gradient_memory_is_o_chunk_times_vocab():
    """Compiled temporaries of value-and-grad: the naive form holds several [tokens, vocab] float32
    arrays, the chunked one a few [chunk, vocab] ones (the gradient is an output, not a temporary).
    A bf16 gradient is built as uint16 and copied once into the output (see losses/_chunking.py)."""
    tokens, vocab, chunk = 4096, 2048, 256
    full = tokens * vocab * 4

    def temp_bytes(dtype, chunk_size):
        x = jax.ShapeDtypeStruct((tokens, vocab), dtype)
        f = jax.jit(jax.value_and_grad(lambda s, t: losses.token_mean(losses.forward_kl(s, t, chunk_size=chunk_size))))
        return f.lower(x, x).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(jnp.float32, None) > 2 * full
    assert temp_bytes(jnp.float32, chunk) < full // 2
    assert temp_bytes(jnp.bfloat16, chunk) < full
