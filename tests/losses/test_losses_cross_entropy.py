"""cross_entropy against torch.nn.functional.cross_entropy and a float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses
import losses_reference as ref

VOCAB = 37


def logits(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(0.0, scale, shape).astype(np.float32)


def labels_for(seed, shape, vocab=VOCAB):
    return np.random.default_rng(seed).integers(0, vocab, shape)


@jax.jit
def value_and_grad(x, y, label_smoothing, z_loss, mask):
    """Per-token CE and the gradient of its sum; the hyperparameters are traced: one compile."""
    def total(v):
        values = losses.cross_entropy(v, y, label_smoothing=label_smoothing, z_loss=z_loss, mask=mask)
        return jnp.sum(values), values
    (_, values), grad = jax.value_and_grad(total, has_aux=True)(x)
    return values, grad


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_matches_torch_and_numpy(label_smoothing, z_loss):
    x, y = logits(0, (2, 3, VOCAB)), labels_for(1, (2, 3))
    got, grad = value_and_grad(x, y, label_smoothing, z_loss, np.ones((2, 3), bool))
    assert got.shape == (2, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref.cross_entropy(x, y, label_smoothing, z_loss), rtol=1e-5)
    xt = torch.tensor(x, requires_grad=True)
    expected = F.cross_entropy(xt.reshape(-1, VOCAB), torch.tensor(y).reshape(-1), reduction="none",
                               label_smoothing=label_smoothing) + z_loss * torch.logsumexp(xt, -1).reshape(-1) ** 2
    np.testing.assert_allclose(np.asarray(got).reshape(-1), expected.detach().numpy(), rtol=1e-5)
    expected.sum().backward()
    np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(losses.cross_entropy(x, y, label_smoothing=label_smoothing, z_loss=z_loss)),
                               np.asarray(got), rtol=1e-6)  # the eager call, with the optional terms static


def test_ignore_index_mask_extremes_and_bfloat16():
    x, y = logits(2, (4, VOCAB)), labels_for(3, (4,))
    x[0] *= 3e3  # +-1e4
    y[1] = -100
    mask = np.array([True, True, True, False])
    x[3] = np.nan
    got, grad = value_and_grad(x, y, 0.1, 0.0, mask)
    expected = F.cross_entropy(torch.tensor(x[:3]), torch.tensor(y[:3]), ignore_index=-100, reduction="none",
                               label_smoothing=0.1).numpy()
    np.testing.assert_allclose(np.asarray(got)[:3], expected, rtol=1e-5)
    assert got[1] == 0 and got[3] == 0
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[[1, 3]] == 0)
    nothing = np.zeros(4, bool)
    assert float(losses.token_mean(value_and_grad(x, y, 0.1, 0.0, nothing)[0], nothing)) == 0
    low = jnp.asarray(logits(4, (4, VOCAB)), jnp.bfloat16)
    y = labels_for(5, (4,))
    np.testing.assert_allclose(np.asarray(losses.cross_entropy(low, y)),
                               ref.cross_entropy(np.asarray(low.astype(jnp.float32)), y), rtol=1e-5)


def test_minus_inf_columns_get_no_smoothing_mass():
    x, y = logits(6, (4, VOCAB)), labels_for(7, (4,), vocab=30)
    x[:, 30:] = -np.inf
    got, grad = value_and_grad(x, y, 0.2, 0.0, np.ones(4, bool))
    np.testing.assert_allclose(np.asarray(got), ref.cross_entropy(x[:, :30], y, 0.2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(losses.cross_entropy(logits(6, (4, VOCAB)), y, label_smoothing=0.2,
                                                               vocab_size=30)), np.asarray(got), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[:, 30:] == 0)


def test_chunked_equals_unchunked_and_rejects_bad_arguments():
    x, y = logits(8, (10, VOCAB)), labels_for(9, (10,))

    @jax.jit
    def both(v):
        return [jax.value_and_grad(lambda u: jnp.sum(losses.cross_entropy(u, y, z_loss=1e-3, chunk_size=c) ** 2))(v)
                for c in (None, 4)]

    whole, chunked = both(x)
    np.testing.assert_allclose(float(whole[0]), float(chunked[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(whole[1]), np.asarray(chunked[1]), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="label_smoothing: got 1.5"):
        losses.cross_entropy(x, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="labels"):
        losses.cross_entropy(x, y[:3])
