"""Metrics as sums and counts: every logged mean is reduced one way, over micro-batches alike.

A micro-batch contributes `(value * count, count)` for each metric, `count` being the tokens (or
rows) the value is a mean over; after the micro-batches, a metric is `sum / max(count, 1)`. So a
step's metric is its mean over the whole batch, whatever the micro-batches held, as in
`eval_step`'s sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Sums = dict[str, tuple[jax.Array, jax.Array]]
"""metric -> (sum of value * count, count)."""


def weighted(values: dict[str, jax.Array], count: jax.Array) -> Sums:
    """Means over `count` tokens (or rows) as sums and counts."""
    return {name: (value * count, count) for name, value in values.items()}


def over_micro_batches(sums: Sums) -> Sums:
    """The sums of a scan's per-micro-batch outputs (leading axis) added up."""
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)


def means(sums: Sums) -> dict[str, jax.Array]:
    return {name: total / jnp.maximum(count, 1.0) for name, (total, count) in sums.items()}


def tokens_per_micro_batch(mask: jax.Array) -> jax.Array:
    """[grad_accum]: the unmasked tokens of each micro-batch."""
    return jnp.sum(mask, axis=tuple(range(1, mask.ndim)))


def shares(counts: jax.Array) -> jax.Array:
    """Each micro-batch's share of the step's tokens: what weighs its gradient."""
    return counts / jnp.maximum(jnp.sum(counts), 1.0)
