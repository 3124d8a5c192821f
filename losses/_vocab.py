"""Teacher/student vocabulary alignment and the sparse (top-k) teacher of the offline cache.

Alignment is decided once per call from static shapes (`resolve_columns`) and applied per chunk
of tokens (`student_columns`, `teacher_columns`), so no aligned copy of a full [tokens, vocab]
array is ever made.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from losses._chunking import DEFAULT_CHUNK_SIZE, map_tokens
from losses._head import Head

logger = logging.getLogger(__name__)

PADDING_TOLERANCE = 0.01
"""Vocabularies whose sizes differ by at most this fraction of the larger are taken to differ
only by padding columns at the end (e.g. 151,936 vs 152,064: 0.08 %)."""

TAILS = ("uniform", "renormalize")


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["indices", "log_probs"], meta_fields=["tail"]
)
@dataclasses.dataclass(frozen=True)
class SparseTeacher:
    """A teacher distribution stored as its top-k entries, as in the offline logit cache.

    Attributes:
      indices: int `[..., k]`, the columns (in the student's vocabulary) of the k entries.
        Entries outside `[0, vocab)` are ignored: their mass goes to the tail.
      log_probs: float `[..., k]`, the teacher's log-probabilities of those columns at
        temperature 1 (log-softmax over the teacher's full vocabulary).
      tail: what the distribution is outside the top-k (the missing mass
        `r = 1 - sum(exp(log_probs))`):
        - "uniform": r is spread evenly over the other columns of the aligned vocabulary (the
          maximum-entropy completion; at temperature 1 the total mass stays exactly 1).
        - "renormalize": the tail is dropped and the top-k renormalised (the teacher has support
          on its top-k only).
        With k = vocab both are the dense teacher. A temperature T is applied to the completed
        distribution: p_T ∝ p ** (1 / T).
    """

    indices: jax.Array
    log_probs: jax.Array
    tail: str = "uniform"

    def __post_init__(self):
        if self.tail not in TAILS:
            raise ValueError(f"SparseTeacher.tail: got {self.tail!r}; allowed: {', '.join(map(repr, TAILS))}")


def top_k_teacher(teacher_logits: jax.Array | Head, k: int, *, tail: str = "uniform",
                  chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> SparseTeacher:
    """Keeps the top-k entries of the teacher's temperature-1 distribution.

    Args:
      teacher_logits: `[..., vocab]`, any float dtype, or a `Head` (then computed a chunk of
        tokens at a time, with `chunk_size`).
      k: entries kept per token, `1 <= k <= vocab`.
      tail: see `SparseTeacher.tail`.

    Returns:
      A `SparseTeacher` with int32 indices and float32 log-probabilities `[..., k]`.
    """
    if isinstance(teacher_logits, Head):
        indices, values = map_tokens(_TopK(k), jax.lax.stop_gradient(teacher_logits), {}, None,
                                     chunk_size=chunk_size)
        return SparseTeacher(indices, values, tail)
    indices, values = _TopK(k)(teacher_logits, {}, None)
    return SparseTeacher(indices, values, tail)


@dataclasses.dataclass(frozen=True)
class _TopK:
    """Row function: the k largest temperature-1 log-probabilities and their columns."""

    k: int

    def __call__(self, logits: jax.Array, rows=None, consts=None) -> tuple[jax.Array, jax.Array]:
        del rows, consts
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        values, indices = jax.lax.top_k(log_probs, self.k)
        return indices.astype(jnp.int32), values


def top1(logits: jax.Array | Head, *, chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """The most probable column of every token, int32 `[...]` (`jnp.argmax` over the last axis;
    for a `Head`, computed a chunk of tokens at a time). No gradient."""
    if isinstance(logits, Head):
        return map_tokens(_argmax_rows, jax.lax.stop_gradient(logits), {}, None, chunk_size=chunk_size)
    return jnp.argmax(logits, -1)


def _argmax_rows(logits: jax.Array, rows=None, consts=None) -> jax.Array:
    del rows, consts
    return jnp.argmax(logits, -1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Columns:
    """How the vocabulary columns are aligned: the first `size` student columns are used and
    student column j is compared with teacher column `teacher_map[j]` (identity when None;
    -1 marks a student column the teacher has no counterpart for, zero teacher mass)."""

    size: int
    teacher_map: tuple[int, ...] | None = None  # a tuple, so that Columns is hashable


@functools.lru_cache(maxsize=None)
def _announce_padding(student_vocab: int, teacher_vocab: int) -> None:
    logger.warning(
        "losses: student vocabulary %d and teacher vocabulary %d differ only by padding columns "
        "(<= %.0f%%); comparing the first %d columns of both.",
        student_vocab, teacher_vocab, 100 * PADDING_TOLERANCE, min(student_vocab, teacher_vocab),
    )


def resolve_columns(
    student_vocab: int,
    teacher_vocab: int | None,
    *,
    vocab_size: int | None = None,
    vocab_map=None,
) -> Columns:
    """Decides the column alignment from static sizes.

    Args:
      student_vocab: the student's last-axis size.
      teacher_vocab: the dense teacher's last-axis size, or None for a `SparseTeacher` (whose
        indices are already student columns).
      vocab_size: the real vocabulary size; columns at and beyond it are padding in both and are
        ignored. None: all student columns, subject to automatic padding alignment.
      vocab_map: a concrete int array `[n]` (n <= student_vocab): student column j is matched
        with teacher column `vocab_map[j]`, or none when -1. Needed when the vocabularies differ
        by more than padding.

    Returns:
      The `Columns` to use.

    Raises:
      ValueError: on any mismatch that is neither padding nor covered by `vocab_map`.
    """
    if vocab_map is not None:
        if teacher_vocab is None:
            raise ValueError(
                "vocab_map: not supported with a SparseTeacher; store the cache's indices in the "
                "student's vocabulary (map them once when the cache is written)"
            )
        table = np.asarray(vocab_map)
        if table.ndim != 1 or not np.issubdtype(table.dtype, np.integer):
            raise ValueError(f"vocab_map: must be a 1-D int array, got shape {table.shape} dtype {table.dtype}")
        if len(table) > student_vocab or table.min(initial=0) < -1 or table.max(initial=0) >= teacher_vocab:
            raise ValueError(
                f"vocab_map: needs length <= student vocab {student_vocab} and values in "
                f"[-1, teacher vocab {teacher_vocab}); got length {len(table)}, values in "
                f"[{table.min(initial=0)}, {table.max(initial=0)}]"
            )
        return Columns(len(table), tuple(int(c) for c in table))
    if vocab_size is not None:
        limit = student_vocab if teacher_vocab is None else min(student_vocab, teacher_vocab)
        if not 1 <= vocab_size <= limit:
            raise ValueError(f"vocab_size: got {vocab_size}; must be in [1, {limit}] (the smaller vocabulary)")
        return Columns(vocab_size)
    if teacher_vocab is None or teacher_vocab == student_vocab:
        return Columns(student_vocab)
    if abs(teacher_vocab - student_vocab) <= PADDING_TOLERANCE * max(teacher_vocab, student_vocab):
        _announce_padding(student_vocab, teacher_vocab)
        return Columns(min(student_vocab, teacher_vocab))
    raise ValueError(
        f"student vocabulary {student_vocab} and teacher vocabulary {teacher_vocab} differ by more "
        f"than padding ({100 * PADDING_TOLERANCE:.0f}% of the larger); pass vocab_map= (teacher "
        "column of each student column, -1 for none) or vocab_size= (the shared real vocabulary)"
    )


def student_columns(student: jax.Array, cols: Columns) -> jax.Array:
    """The student's aligned columns of a chunk, in float32."""
    return student[..., : cols.size].astype(jnp.float32)


def teacher_columns(teacher: jax.Array | SparseTeacher, cols: Columns) -> jax.Array:
    """The teacher's aligned columns of a chunk as float32 logits (log-probs for a sparse teacher,
    -inf where the teacher has no mass). Not differentiated."""
    if isinstance(teacher, SparseTeacher):
        dense = _densify(teacher, cols.size)
    elif cols.teacher_map is None:
        dense = teacher[..., : cols.size].astype(jnp.float32)
    else:
        table = np.asarray(cols.teacher_map)
        gathered = jnp.take(teacher, np.maximum(table, 0), axis=-1).astype(jnp.float32)
        dense = jnp.where(table >= 0, gathered, -jnp.inf)
    return jax.lax.stop_gradient(dense)


def _densify(teacher: SparseTeacher, vocab: int) -> jax.Array:
    log_probs = teacher.log_probs.astype(jnp.float32)
    indices = teacher.indices
    valid = (indices >= 0) & (indices < vocab)
    if teacher.tail == "uniform":
        kept = jnp.sum(jnp.where(valid, jnp.exp(log_probs), 0.0), axis=-1)
        rest = jnp.maximum(1.0 - kept, 0.0)
        n_tail = vocab - jnp.sum(valid, axis=-1)
        has_tail = (rest > 0) & (n_tail > 0)
        fill = jnp.where(
            has_tail, jnp.log(jnp.where(has_tail, rest, 1.0)) - jnp.log(jnp.maximum(n_tail, 1)), -jnp.inf
        )
    else:
        fill = jnp.full(log_probs.shape[:-1], -jnp.inf)
    dense = jnp.broadcast_to(fill[..., None], log_probs.shape[:-1] + (vocab,))
    rows = jnp.arange(log_probs.shape[0])[:, None]
    return dense.at[rows, jnp.where(valid, indices, vocab)].set(log_probs, mode="drop")
