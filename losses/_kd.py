"""The machinery every KD term shares: tempered float32 log-probabilities of aligned columns,
masking, the T^2 factor and chunked evaluation. Each term only supplies its divergence of
(teacher log-probs, student log-probs) and the checker of its parameters; a `KDTerm` binds them
into one entry of `KD_TERMS` (losses/_divergences.py), called the same way for every term."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from losses._chunking import DEFAULT_CHUNK_SIZE, map_tokens
from losses._common import hyperparameter, token_mask
from losses._vocab import Columns, SparseTeacher, resolve_columns, student_columns, teacher_columns

Divergence = Callable[..., jax.Array]
"""`divergence(logp_teacher [n, V], logq_student [n, V], labels [n] | None, **params) -> [n]`."""


@dataclasses.dataclass(frozen=True)
class KDTerm:
    """A KD term: its per-row divergence, the checker of its parameters and its line of the docs
    table. Calling it evaluates the term per token, with the same arguments for every term.

    Attributes:
      name: its key in `KD_TERMS` (the `kd` of `distillation_loss`).
      divergence: the per-row divergence before the T^2 factor (see `Divergence`), of float32
        log-probabilities at temperature T.
      params: turns user keyword arguments into validated params; its signature lists the allowed
        ones and their defaults.
      formula: one line for the docs table (plain text; p = p_T, q = p_S).
      reference: the paper, for the docs table (markdown).
      needs_labels: the divergence reads the labels (DKD's target class); the call then requires
        them, and ignores tokens whose label is < 0 as it does masked ones.
    """

    name: str
    divergence: Divergence
    params: Callable[..., dict[str, Any]]
    formula: str
    reference: str
    needs_labels: bool = False

    @property
    def param_names(self) -> tuple[str, ...]:
        """The keyword parameters of the term (e.g. ("beta",) for "jsd")."""
        return tuple(inspect.signature(self.params).parameters)

    def check_params(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Validates a user's parameters (e.g. `kd_kwargs`) and fills in the defaults.

        Args:
          params: parameter name -> value; None or {} for the defaults.

        Returns:
          The validated params, every parameter of the term present.

        Raises:
          ValueError: on an unknown key (naming the term, the unknown keys and the allowed ones) or
            an out-of-range value (naming the parameter).
        """
        unknown = sorted(set(params or {}) - set(self.param_names))
        if unknown:
            raise ValueError(f"kd_kwargs: {unknown} not parameters of {self.name!r}; allowed: {list(self.param_names)}")
        return self.params(**(params or {}))

    def __call__(self, student_logits: jax.Array, teacher_logits: jax.Array | SparseTeacher,
                 labels: jax.Array | None = None, *, temperature: float = 1.0, mask: jax.Array | None = None,
                 vocab_size: int | None = None, vocab_map=None, chunk_size: int | str | None = DEFAULT_CHUNK_SIZE,
                 **params) -> jax.Array:
        """The term per token: T^2 * divergence, 0 on masked tokens.

        Args:
          student_logits: `[..., V]`, any float dtype.
          teacher_logits: `[..., V_T]` or a `SparseTeacher`.
          labels: int `[...]`; read only when `needs_labels` (then required, and labels < 0 are
            ignored like `mask`), ignored otherwise (None is fine).
          temperature, mask, vocab_size, vocab_map, chunk_size: as for `losses.forward_kl`.
          **params: the term's own parameters (`param_names`), checked by `check_params`.

        Returns:
          float32 `[...]`, one value per token.
        """
        params = self.check_params(params)
        if self.needs_labels and labels is None:
            raise ValueError(f"{self.name}: needs the labels")
        labels = labels if self.needs_labels else None
        temperature = hyperparameter("temperature", temperature, low=0.0, open_low=True)
        cols = resolve_columns(student_logits.shape[-1], check_teacher(student_logits, teacher_logits),
                               vocab_size=vocab_size, vocab_map=vocab_map)
        lead = student_logits.shape[:-1]
        rows = {"teacher": teacher_logits, "mask": token_mask(lead, mask, labels)}
        if labels is not None:
            rows["labels"] = jnp.broadcast_to(labels, lead)
        consts = {"temperature": temperature, "params": dict(params)}
        return map_tokens(KDRow(self, cols), student_logits, rows, consts, chunk_size=chunk_size)


def tempered_log_softmax(x: jax.Array, temperature) -> jax.Array:
    """log_softmax(x / T), shifting by the row max *before* dividing: near the top the differences
    x - max are exact, so large logits at small T (1e4 / 0.1) keep their float32 precision."""
    top = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return jax.nn.log_softmax((x - top) / temperature, axis=-1)


def tempered_log_probs(student: jax.Array, teacher: jax.Array | SparseTeacher, keep: jax.Array,
                       cols: Columns, temperature) -> tuple[jax.Array, jax.Array]:
    """Float32 (teacher, student) log-softmaxes of logits / T for a chunk of rows.

    Rows where `keep` is False are replaced by zeros first, so whatever they hold (padding
    garbage, NaN, all -inf) cannot reach the value or the gradient.
    """
    keep_col = keep[:, None]
    s = jnp.where(keep_col, student_columns(student, cols), 0.0)
    t = jnp.where(keep_col, teacher_columns(teacher, cols), 0.0)
    return tempered_log_softmax(t, temperature), tempered_log_softmax(s, temperature)


@dataclasses.dataclass(frozen=True)
class KDRow:
    """The row function of one KD term: T^2 * divergence, 0 on masked rows. `consts` holds
    "temperature" and the term's "params"."""

    term: KDTerm
    cols: Columns

    def __call__(self, student: jax.Array, rows: dict[str, Any], consts: dict[str, Any]) -> jax.Array:
        keep = rows["mask"]
        temperature = consts["temperature"]
        logp, logq = tempered_log_probs(student, rows["teacher"], keep, self.cols, temperature)
        labels = rows.get("labels")
        if labels is not None:
            labels = jnp.where(keep, labels, 0)  # masked rows (label -100, say) must not index
        value = self.term.divergence(logp, logq, labels, **consts["params"])
        return jnp.where(keep, temperature**2 * value, 0.0)


def check_teacher(student_logits: jax.Array, teacher_logits) -> int | None:
    """Checks the teacher's leading axes against the student's; returns the dense teacher's vocab
    size (None for a sparse teacher)."""
    lead = student_logits.shape[:-1]
    if isinstance(teacher_logits, SparseTeacher):
        if teacher_logits.indices.shape != teacher_logits.log_probs.shape or teacher_logits.indices.shape[:-1] != lead:
            raise ValueError(
                f"SparseTeacher: indices {teacher_logits.indices.shape} and log_probs "
                f"{teacher_logits.log_probs.shape} must both be {lead} + (k,)"
            )
        return None
    if teacher_logits.shape[:-1] != lead:
        raise ValueError(f"teacher_logits {teacher_logits.shape} and student_logits {student_logits.shape} "
                         "must agree on every axis but the last")
    return teacher_logits.shape[-1]
