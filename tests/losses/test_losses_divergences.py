"""The KD family (every entry of KD_TERMS) against float64 numpy and torch references, on ordinary and
hostile inputs."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import losses
import losses_reference as ref

KINDS = list(losses.KD_TERMS)
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"lam": 0.1}, "skew_reverse_kl": {"lam": 0.2},
          "dkd": {"alpha": 1.0, "beta": 2.0}}
VOCAB = 37


def logits(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(0.0, scale, shape).astype(np.float32)


def labels_for(seed, shape, vocab=VOCAB):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def call(kind, student, teacher, labels, **kw):
    return losses.KD_TERMS[kind](student, teacher, labels, **PARAMS.get(kind, {}), **kw)


@functools.cache
def jitted(kind, chunk_size="auto"):
    """(per-token values, gradient of their sum w.r.t. the student) in one jitted program, every
    array and the temperature as arguments, so that one compile serves every test of a kind."""

    def total(student, teacher, labels, mask, temperature):
        values = call(kind, student, teacher, labels, temperature=temperature, mask=mask, chunk_size=chunk_size)
        return jnp.sum(values), values

    grad_fn = jax.jit(jax.value_and_grad(total, has_aux=True))

    def run(student, teacher, labels, mask=None, temperature=1.0):
        mask = np.ones(np.shape(labels), bool) if mask is None else mask
        (_, values), grad = grad_fn(student, teacher, labels, mask, temperature)
        return np.asarray(values), np.asarray(grad)

    return run


def numpy_reference(kind, student, teacher, labels, temperature=1.0):
    args = (student, teacher, labels) if losses.KD_TERMS[kind].needs_labels else (student, teacher)
    return ref.REFERENCES[kind](*args, **PARAMS.get(kind, {}), temperature=temperature)


def torch_terms(kind, s, t, labels, temperature):
    """The same terms from torch ops (`losses_reference.TORCH_REFERENCES`): kl_div with log
    targets, log_softmax, logsumexp; DKD as in the authors' mdistiller code."""
    args = (s, t, labels) if losses.KD_TERMS[kind].needs_labels else (s, t)
    return ref.TORCH_REFERENCES[kind](*args, **PARAMS.get(kind, {}), temperature=temperature)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.1, 1.0, 2.0, 10.0])
def test_matches_numpy_and_torch(kind, temperature):
    student, teacher, labels = logits(0, (3, 5, VOCAB)), logits(1, (3, 5, VOCAB)), labels_for(2, (3, 5))
    got, _ = jitted(kind)(student, teacher, labels, temperature=temperature)
    assert got.shape == (3, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, numpy_reference(kind, student, teacher, labels, temperature),
                               rtol=1e-5, atol=1e-6)
    expected = torch_terms(kind, torch.tensor(student), torch.tensor(teacher), labels, temperature).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.1, 10.0])
def test_gradient_matches_torch_autograd(kind, temperature):
    student, teacher, labels = logits(3, (4, VOCAB)), logits(4, (4, VOCAB)), labels_for(5, (4,))
    _, grad = jitted(kind)(student, teacher, labels, temperature=temperature)
    s = torch.tensor(student, requires_grad=True)
    torch_terms(kind, s, torch.tensor(teacher), labels, temperature).sum().backward()
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, s.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits(kind):
    """Logits of +-1e4 make near one-hot distributions; values stay exact and gradients finite."""
    rng = np.random.default_rng(6)
    student = rng.choice([-1e4, 1e4], (6, VOCAB)).astype(np.float32) + logits(7, (6, VOCAB))
    teacher = rng.choice([-1e4, 1e4], (6, VOCAB)).astype(np.float32) + logits(8, (6, VOCAB))
    labels = labels_for(9, (6,))
    for temperature in (0.1, 1.0, 10.0):
        got, grad = jitted(kind)(student, teacher, labels, temperature=temperature)
        np.testing.assert_allclose(got, numpy_reference(kind, student, teacher, labels, temperature), rtol=1e-5,
                                   atol=1e-5 * temperature**2)
        assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("kind", KINDS)
def test_minus_inf_columns(kind):
    """Columns at -inf in both (vocabulary masking) carry no mass: same value as without them,
    zero gradient there, no NaN."""
    student, teacher, labels = logits(10, (4, VOCAB)), logits(11, (4, VOCAB)), labels_for(12, (4,), vocab=30)
    masked_s, masked_t = student.copy(), teacher.copy()
    masked_s[:, 30:] = -np.inf
    masked_t[:, 30:] = -np.inf
    got, grad = jitted(kind)(masked_s, masked_t, labels, temperature=2.0)
    np.testing.assert_allclose(got, numpy_reference(kind, student[:, :30], teacher[:, :30], labels, 2.0),
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(grad)) and np.all(grad[:, 30:] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_rows_are_zero_not_nan(kind):
    student, teacher, labels = logits(13, (2, 3, VOCAB)), logits(14, (2, 3, VOCAB)), labels_for(15, (2, 3))
    student[1] = np.nan  # garbage in padded positions must not leak
    teacher[1] = -np.inf
    mask = np.array([[True, True, False], [False, False, False]])
    got, grad = jitted(kind)(student, teacher, labels, mask=mask)
    assert np.all(got[~mask] == 0) and np.all(np.isfinite(got))
    np.testing.assert_allclose(got[0, :2], numpy_reference(kind, student[0, :2], teacher[0, :2], labels[0, :2]),
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(grad)) and np.all(grad[~mask] == 0)
    nothing = np.zeros((2, 3), bool)
    assert float(losses.token_mean(jitted(kind)(student, teacher, labels, mask=nothing)[0], nothing)) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_inputs(kind):
    """bf16 in, float32 inside: equals the float64 reference on the bf16-rounded values."""
    student = jnp.asarray(logits(16, (4, VOCAB)), jnp.bfloat16)
    teacher = jnp.asarray(logits(17, (4, VOCAB)), jnp.bfloat16)
    labels = labels_for(18, (4,))
    got, grad = jitted(kind)(student, teacher, labels, temperature=2.0)
    assert got.dtype == np.float32 and grad.dtype == jnp.bfloat16
    s64, t64 = np.asarray(student.astype(jnp.float32)), np.asarray(teacher.astype(jnp.float32))
    np.testing.assert_allclose(got, numpy_reference(kind, s64, t64, labels, 2.0), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(grad.astype(np.float32)))


@pytest.mark.parametrize("kind", KINDS)
def test_no_gradient_into_teacher(kind):
    student, teacher, labels = logits(19, (3, VOCAB)), logits(20, (3, VOCAB)), labels_for(21, (3,))

    def both_paths(t):  # chunked (custom VJP) and unchunked (autodiff)
        return sum(jnp.sum(call(kind, student, t, labels, chunk_size=c)) for c in (2, None))

    assert np.all(np.asarray(jax.jit(jax.grad(both_paths))(jnp.asarray(teacher))) == 0)


def test_padding_columns_are_aligned_and_announced_once(caplog):
    student, teacher = logits(22, (3, 200)), logits(23, (3, 201))
    with caplog.at_level(logging.WARNING, logger="losses._vocab"):
        got = losses.forward_kl(student, teacher)
        losses.forward_kl(student, teacher)
    np.testing.assert_allclose(np.asarray(got), ref.forward_kl(student, teacher[:, :200]), rtol=1e-5)
    assert sum("differ only by padding" in r.message for r in caplog.records) == 1
    np.testing.assert_allclose(np.asarray(losses.forward_kl(teacher, student)),
                               ref.forward_kl(teacher[:, :200], student), rtol=1e-5)


def test_vocab_size_ignores_padding_columns():
    student, teacher = logits(24, (3, VOCAB)), logits(25, (3, VOCAB + 5))
    got = losses.reverse_kl(student, teacher, vocab_size=30)
    np.testing.assert_allclose(np.asarray(got), ref.reverse_kl(student[:, :30], teacher[:, :30]), rtol=1e-5)


def test_vocab_mismatch_is_an_error_unless_mapped():
    student, teacher = logits(26, (3, 20)), logits(27, (3, 40))
    with pytest.raises(ValueError, match="differ by more than padding"):
        losses.forward_kl(student, teacher)
    table = np.array([5, 3, -1] + list(range(20, 37)))
    got = losses.forward_kl(student, teacher, vocab_map=table)
    mapped = np.where(table >= 0, teacher[:, np.maximum(table, 0)], -np.inf)
    np.testing.assert_allclose(np.asarray(got), ref.forward_kl(student, mapped), rtol=1e-5)
    with pytest.raises(ValueError, match="vocab_map"):
        losses.forward_kl(student, teacher, vocab_map=np.array([0, 40]))


def test_invalid_hyperparameters_name_themselves():
    s, t = logits(28, (2, 5)), logits(29, (2, 5))
    with pytest.raises(ValueError, match=r"beta: got 0.0; must be in \(0.0, 1.0\).*forward_kl"):
        losses.jsd(s, t, beta=0.0)
    with pytest.raises(ValueError, match="lam: got 1.0"):
        losses.skew_kl(s, t, lam=1.0)
    with pytest.raises(ValueError, match="temperature: got 0.0"):
        losses.forward_kl(s, t, temperature=0.0)
    with pytest.raises(TypeError, match="temperature: must be a number"):
        losses.forward_kl(s, t, temperature=None)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.forward_kl(s, t, chunk_size=0)
    with pytest.raises(ValueError, match="must agree on every axis but the last"):
        losses.forward_kl(s, t[:1])


def test_hyperparameters_may_be_traced():
    """A temperature (or beta) scheduled inside a jitted step is a runtime value."""
    s, t = logits(30, (2, 5)), logits(31, (2, 5))
    traced = jax.jit(lambda temp, beta: losses.jsd(s, t, temperature=temp, beta=beta))(3.0, 0.2)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(losses.jsd(s, t, temperature=3.0, beta=0.2)), rtol=1e-6)
