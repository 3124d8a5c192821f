"""Properties of the KD family, checked with hypothesis on random logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import losses
import losses_reference as ref

KINDS = list(losses.KD_TERMS)
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"lam": 0.1}, "skew_reverse_kl": {"lam": 0.2}, "dkd": {"beta": 2.0}}
SHAPE = (4, 16)
FEW = settings(max_examples=12, deadline=None, derandomize=True)

seeds = st.integers(0, 2**31 - 1)
scales = st.sampled_from([0.1, 1.0, 5.0, 30.0])
temperatures = st.sampled_from([0.1, 0.5, 1.0, 2.0, 10.0])


def draw_logits(seed, scale, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return (scale * rng.normal(size=shape)).astype(np.float32), rng.integers(0, shape[-1], shape[:-1])


def kd(kind, student, teacher, labels, **kw):
    return losses.KD_TERMS[kind](student, teacher, labels, **PARAMS.get(kind, {}), **kw)


def swap_top(x):
    """x with each row's largest entry swapped with its smallest: a different distribution."""
    y = x.copy()
    rows = np.arange(x.shape[0])
    top, low = np.argmax(x, -1), np.argmin(x, -1)
    y[rows, top], y[rows, low] = x[rows, low], x[rows, top]
    return y


@pytest.mark.parametrize("kind", KINDS)
@FEW
@given(seed=seeds, scale=scales, temperature=temperatures)
def test_nonnegative_and_zero_iff_equal(kind, seed, scale, temperature):
    student, labels = draw_logits(seed, scale)
    teacher, _ = draw_logits(seed + 1, scale)
    assert np.all(np.asarray(kd(kind, student, teacher, labels, temperature=temperature)) >= 0)
    np.testing.assert_allclose(np.asarray(kd(kind, student, student, labels, temperature=temperature)), 0.0,
                               atol=1e-6 * temperature**2)
    assert np.all(np.asarray(kd(kind, student, swap_top(student), labels, temperature=temperature)) > 0)


@pytest.mark.parametrize("kind", KINDS)
@FEW
@given(seed=seeds, scale=scales, temperature=temperatures)
def test_temperature_squared_scaling(kind, seed, scale, temperature):
    student, labels = draw_logits(seed, scale)
    teacher, _ = draw_logits(seed + 1, scale)
    tempered = np.asarray(kd(kind, student, teacher, labels, temperature=temperature))
    plain = np.asarray(kd(kind, student / temperature, teacher / temperature, labels))
    np.testing.assert_allclose(tempered, temperature**2 * plain, rtol=2e-5, atol=1e-6 * temperature**2)


@FEW
@given(seed=seeds, scale=scales, temperature=temperatures)
def test_forward_kl_gradient_is_t_times_ps_minus_pt(seed, scale, temperature):
    student, _ = draw_logits(seed, scale)
    teacher, _ = draw_logits(seed + 1, scale)
    grad = jax.grad(lambda s: jnp.sum(losses.forward_kl(s, teacher, temperature=temperature)))(jnp.asarray(student))
    logp, logq = ref.tempered(student, teacher, temperature)
    np.testing.assert_allclose(np.asarray(grad), temperature * (np.exp(logq) - np.exp(logp)), atol=1e-5 * temperature)


@FEW
@given(seed=seeds, scale=scales)
def test_jsd_half_is_the_symmetric_jensen_shannon_divergence(seed, scale):
    student, _ = draw_logits(seed, scale)
    teacher, _ = draw_logits(seed + 1, scale)
    p, q = np.exp(ref.log_softmax(teacher)), np.exp(ref.log_softmax(student))
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        js = 0.5 * np.sum(np.where(p > 0, p * np.log(p / m), 0), -1) + 0.5 * np.sum(np.where(q > 0, q * np.log(q / m), 0), -1)
    got = np.asarray(losses.jsd(student, teacher, beta=0.5))
    np.testing.assert_allclose(got, js, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, np.asarray(losses.jsd(teacher, student, beta=0.5)), rtol=1e-5, atol=1e-7)
    assert np.all(got <= np.log(2) + 1e-6)


@pytest.mark.parametrize("kind", KINDS)
@FEW
@given(seed=seeds, garbage=st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
def test_masked_tokens_contribute_exactly_nothing(kind, seed, garbage):
    student, labels = draw_logits(seed, 2.0)
    teacher, _ = draw_logits(seed + 1, 2.0)
    mask = np.random.default_rng(seed).random(SHAPE[:-1]) < 0.5
    dirty_s, dirty_t, dirty_l = student.copy(), teacher.copy(), labels.copy()
    dirty_s[~mask], dirty_t[~mask], dirty_l[~mask] = garbage, garbage, -100

    def value_and_grad(s, t, lab):
        return jax.value_and_grad(lambda x: jnp.sum(kd(kind, x, t, lab, mask=mask)))(jnp.asarray(s))

    clean_total, clean_grad = value_and_grad(student, teacher, labels)
    dirty_total, dirty_grad = value_and_grad(dirty_s, dirty_t, dirty_l)
    per_token = np.asarray(kd(kind, dirty_s, dirty_t, dirty_l, mask=mask))
    assert np.all(per_token[~mask] == 0)
    assert float(clean_total) == float(dirty_total)
    assert np.array_equal(np.asarray(clean_grad), np.asarray(dirty_grad))
    assert np.all(np.asarray(dirty_grad)[~mask] == 0)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(kind=st.sampled_from(KINDS), tokens=st.integers(2, 11), chunk=st.integers(1, 12), seed=seeds)
def test_chunked_equals_unchunked(kind, tokens, chunk, seed):
    student, labels = draw_logits(seed, 3.0, (tokens, 16))
    teacher, _ = draw_logits(seed + 1, 3.0, (tokens, 16))
    mask = np.arange(tokens) % 3 != 1

    @jax.jit
    def both(s):
        def total(chunk_size):  # squared, so the cotangents differ from token to token
            return jax.value_and_grad(lambda x: jnp.sum(
                kd(kind, x, teacher, labels, mask=mask, temperature=2.0, chunk_size=chunk_size) ** 2))(s)
        return total(chunk), total(None)

    (value_chunked, grad_chunked), (value_whole, grad_whole) = both(jnp.asarray(student))
    np.testing.assert_allclose(float(value_chunked), float(value_whole), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_chunked), np.asarray(grad_whole), rtol=1e-5, atol=1e-7)
