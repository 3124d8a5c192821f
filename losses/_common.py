"""Shared argument checks and float32 helpers for the per-token losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def hyperparameter(name: str, value, *, low: float | None = None, high: float | None = None,
                   open_low: bool = False, open_high: bool = False):
    """A numeric hyperparameter, range-checked when it is concrete.

    Hyperparameters are runtime values (changing one does not recompile); a traced value, e.g. a
    temperature scheduled inside a jitted step, is passed through unchecked.
    """
    try:
        number = float(value)
    except jax.errors.ConcretizationTypeError:
        return value
    except TypeError as err:
        raise TypeError(f"{name}: must be a number, got {value!r}") from err
    below = low is not None and (number <= low if open_low else number < low)
    above = high is not None and (number >= high if open_high else number > high)
    if below or above:
        lo = "(" if open_low else "["
        hi = ")" if open_high else "]"
        raise ValueError(f"{name}: got {number}; must be in {lo}{'-inf' if low is None else low}, "
                         f"{'inf' if high is None else high}{hi}")
    return number


def may_be_nonzero(value) -> bool:
    """False only for a concrete 0: decides statically whether an optional term is computed."""
    try:
        return float(value) != 0.0
    except jax.errors.ConcretizationTypeError:
        return True


def token_mask(shape: tuple[int, ...], mask: jax.Array | None, labels: jax.Array | None = None) -> jax.Array:
    """The boolean per-token mask: `mask` (None: all tokens) and, when labels are given, labels >= 0
    (so torch's ignore_index -100 is ignored too)."""
    keep = jnp.ones(shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask).astype(bool), shape)
    if labels is not None:
        keep = keep & (jnp.asarray(labels) >= 0)
    return keep


def kl_rows(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """KL(P || Q) over the last axis from log-probabilities, with 0 * log(0 / q) = 0.

    Columns where P has no mass contribute exactly 0 to the value and to the gradient, even where
    log Q is also -inf (a masked column); where P has mass and Q none the result is +inf.
    """
    p = jnp.exp(logp)
    ratio = jnp.where(p > 0, logp - logq, 0.0)
    return jnp.sum(p * ratio, axis=-1)


def log_mixture(logp: jax.Array, logq: jax.Array, weight) -> jax.Array:
    """log(weight * P + (1 - weight) * Q) from log-probabilities, with safe gradients where both
    terms vanish (the result is -inf there)."""
    a = logp + jnp.log(weight)
    b = logq + jnp.log1p(-weight)
    live = jnp.isfinite(a) | jnp.isfinite(b)
    a = jnp.where(live, a, 0.0)
    b = jnp.where(live, b, 0.0)
    return jnp.where(live, jnp.logaddexp(a, b), -jnp.inf)


def clamp_nonnegative(x: jax.Array) -> jax.Array:
    """Divergences are >= 0; float32 rounding can leave -1e-9 when P ~= Q."""
    return jnp.maximum(x, 0.0)
