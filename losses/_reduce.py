"""Masked reductions of per-token values. A fully masked input reduces to 0, never NaN."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _weights(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.ones(values.shape, jnp.float32)
    return jnp.broadcast_to(jnp.asarray(mask), values.shape).astype(jnp.float32)


def _safe_divide(total: jax.Array, count: jax.Array) -> jax.Array:
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def token_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over all unmasked tokens: every token weighs the same.

    Args:
      values: `[...]` per-token values.
      mask: bool or 0/1 `[...]` (broadcastable); None: all tokens.

    Returns:
      A float32 scalar; 0 when no token is unmasked.
    """
    w = _weights(values, mask)
    return _safe_divide(jnp.sum(jnp.where(w > 0, values.astype(jnp.float32) * w, 0.0)), jnp.sum(w))


def sequence_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over the tokens of each sequence (last axis), then over the sequences: every sequence
    weighs the same, whatever its length. Sequences with no unmasked token are left out.

    Args:
      values: `[..., seq]` per-token values.
      mask: bool or 0/1 `[..., seq]` (broadcastable); None: all tokens.

    Returns:
      A float32 scalar; 0 when no token is unmasked.
    """
    w = _weights(values, mask)
    count = jnp.sum(w, axis=-1)
    per_sequence = _safe_divide(jnp.sum(jnp.where(w > 0, values.astype(jnp.float32) * w, 0.0), axis=-1), count)
    has_tokens = (count > 0).astype(jnp.float32)
    return _safe_divide(jnp.sum(per_sequence * has_tokens), jnp.sum(has_tokens))


def masked_quantiles(values: jax.Array, mask: jax.Array | None, quantiles: Sequence[float]) -> jax.Array:
    """Quantiles of the unmasked values (linear interpolation, as `numpy.quantile`).

    Args:
      values: `[...]` per-token values.
      mask: bool or 0/1 `[...]`; None: all tokens.
      quantiles: levels in [0, 1].

    Returns:
      float32 `[len(quantiles)]`; zeros when no token is unmasked.
    """
    flat = values.astype(jnp.float32).reshape(-1)
    keep = _weights(values, mask).reshape(-1) > 0
    n = jnp.sum(keep)
    ordered = jnp.sort(jnp.where(keep, flat, jnp.inf))
    position = jnp.asarray(quantiles, jnp.float32) * jnp.maximum(n - 1, 0)
    low = jnp.floor(position).astype(jnp.int32)
    high = jnp.minimum(low + 1, jnp.maximum(n - 1, 0))
    frac = position - low
    result = ordered[low] * (1.0 - frac) + jnp.where(frac > 0, ordered[high], 0.0) * frac
    return jnp.where(n > 0, result, 0.0)
