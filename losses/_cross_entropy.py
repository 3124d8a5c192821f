"""Cross-entropy on hard labels, with label smoothing and z-loss, per token and chunked."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from losses._chunking import DEFAULT_CHUNK_SIZE, map_tokens
from losses._common import hyperparameter, may_be_nonzero, token_mask
from losses._vocab import Columns, resolve_columns, student_columns


def ce_terms(student: jax.Array, labels: jax.Array, keep: jax.Array, cols: Columns,
             label_smoothing) -> tuple[jax.Array, jax.Array]:
    """(smoothed cross-entropy, logsumexp of the logits) for a chunk of rows; 0 on masked rows.

    `label_smoothing` None means no smoothing. Smoothing spreads its mass uniformly over the row's
    finite columns: a column whose logit is -inf (masked out of the vocabulary) receives none,
    where torch would return inf.
    """
    keep_col = keep[:, None]
    s = jnp.where(keep_col, student_columns(student, cols), 0.0)
    lse = jax.nn.logsumexp(s, axis=-1)
    log_q = s - lse[:, None]
    safe_labels = jnp.where(keep, labels, 0)
    nll = -jnp.take_along_axis(log_q, safe_labels[:, None], axis=-1, mode="fill", fill_value=jnp.nan)[:, 0]
    if label_smoothing is not None:
        finite = jnp.isfinite(s)
        uniform = -jnp.sum(jnp.where(finite, log_q, 0.0), axis=-1) / jnp.sum(finite, axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return jnp.where(keep, nll, 0.0), jnp.where(keep, lse, 0.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0, z_loss: float = 0.0,
                  mask: jax.Array | None = None, vocab_size: int | None = None,
                  chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Per-token cross-entropy with the hard labels, optionally smoothed, plus the z-loss.

    CE = (1 - eps) * (-log q(y)) + eps * mean_v(-log q(v)) + z_loss * logsumexp(logits)^2,
    with q = softmax(logits) (no temperature) and the mean over the row's finite columns. For
    finite logits this is torch's `cross_entropy(..., label_smoothing=eps)` plus the z-loss.

    Args:
      logits: `[..., V]`, any float dtype; computed in float32.
      labels: int `[...]`; labels < 0 (torch's ignore_index -100) are ignored like `mask`.
      label_smoothing: eps in [0, 1].
      z_loss: weight of logsumexp(logits)^2, which keeps the softmax normaliser near 1
        (PaLM uses 1e-4).
      mask: bool `[...]`, False for tokens that contribute nothing; None keeps all.
      vocab_size: the real vocabulary; padding columns at and beyond it are ignored.
      chunk_size: tokens per chunk, "auto" (from the vocabulary size) or None (all at once).

    Returns:
      float32 `[...]`, one value per token (NaN for a kept token whose label is >= vocab).

    References:
      Szegedy et al., Rethinking the Inception Architecture (label smoothing), CVPR 2016.
      https://arxiv.org/abs/1512.00567
      Chowdhery et al., PaLM (z-loss), 2022, section 5. https://arxiv.org/abs/2204.02311
    """
    label_smoothing = hyperparameter("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = hyperparameter("z_loss", z_loss, low=0.0)
    lead = logits.shape[:-1]
    if labels.shape != lead:
        raise ValueError(f"labels {labels.shape} must have the leading shape of logits {logits.shape}")
    cols = resolve_columns(logits.shape[-1], None, vocab_size=vocab_size)
    rows = {"labels": labels, "mask": token_mask(lead, mask, labels)}
    consts = {"label_smoothing": label_smoothing, "z_loss": z_loss}
    row = CERow(cols, smoothing=may_be_nonzero(label_smoothing), z=may_be_nonzero(z_loss))
    return map_tokens(row, logits, rows, consts, chunk_size=chunk_size)


@dataclasses.dataclass(frozen=True)
class CERow:
    """The row function of `cross_entropy`; `smoothing` and `z` say whether those terms exist."""

    cols: Columns
    smoothing: bool
    z: bool

    def __call__(self, student: jax.Array, rows: dict[str, Any], consts: dict[str, Any]) -> jax.Array:
        smoothing = consts["label_smoothing"] if self.smoothing else None
        ce, lse = ce_terms(student, rows["labels"], rows["mask"], self.cols, smoothing)
        return ce + consts["z_loss"] * lse**2 if self.z else ce
