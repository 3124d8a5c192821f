"""Row-wise evaluation of per-token losses in chunks of tokens, with a memory-lean gradient.

Every loss here is a function of one token's row of logits at a time (a *row function*).
`map_tokens` flattens the leading axes, walks over the tokens `chunk_size` at a time in a
`lax.fori_loop` and writes the per-token outputs into preallocated buffers, so only
O(chunk * vocab) float32 temporaries are alive at once. Its gradient with respect to the student
logits is a custom VJP that recomputes each chunk's forward pass inside the backward pass
(per-chunk rematerialisation): nothing of size [tokens, vocab] is kept between the passes, and
the only full-size buffer the backward pass writes is the gradient, in the student's dtype (for
a 16-bit student, built as uint16 and copied once into the output; see `_to_bits`).

Everything other than the student logits (teacher, labels, mask, hyperparameters) is a constant
for differentiation: the teacher is a target, as in every KD method.

The student and the teacher may each be a `Head` (hidden states and head weight) instead of
logits: the fused LM head. Each chunk's logits are then formed inside the loop, in the forward
pass and again in the backward pass, which pulls the chunk's logit gradient back into the hidden
states (written into their gradient buffer) and the head weight (accumulated in float32), so
nothing of size [tokens, vocab] exists at all.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from losses._head import Head, is_head, materialize

DEFAULT_CHUNK_SIZE = "auto"
"""`chunk_size="auto"` picks the tokens per chunk from the vocabulary so that a chunk holds about
`AUTO_CHUNK_ELEMENTS` values (at least one token)."""

AUTO_CHUNK_ELEMENTS = {"cpu": 2**20}
"""Values per chunk for "auto", by backend. CPU: 2^20 (a 4 MB float32 temporary, which stays in
cache; measured fastest on a 2-core x86 CPU: 32 tokens at V = 32,000, 5 at V = 202,048). Other
backends: `AUTO_CHUNK_ELEMENTS_OTHER`, larger chunks to amortise kernel launches (not measured)."""

AUTO_CHUNK_ELEMENTS_OTHER = 2**24

AUTO_FUSED_CHUNK_ELEMENTS = 2**24
"""Values per chunk for "auto" when a `Head` is an input (any backend): the chunk's logits come
from a matmul that reads the whole head weight, so a chunk needs enough tokens to amortise that
read (83 tokens at V = 202,048; a 64 MiB float32 temporary)."""


def resolve_chunk_size(chunk_size: int | str | None, vocab: int, *, fused: bool = False) -> int | None:
    """The tokens per chunk for a `chunk_size` argument ("auto", a positive int, or None); `fused`:
    a `Head` is among the inputs."""
    if chunk_size == "auto":
        if fused:
            elements = AUTO_FUSED_CHUNK_ELEMENTS
        else:
            elements = AUTO_CHUNK_ELEMENTS.get(jax.default_backend(), AUTO_CHUNK_ELEMENTS_OTHER)
        return max(1, elements // max(vocab, 1))
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: got {chunk_size!r}; must be 'auto', a positive int or None")
    return chunk_size

RowFn = Callable[[jax.Array, Any, Any], Any]
"""`row_fn(student [n, V], rows, consts) -> pytree of [n, ...] arrays`, each row independent of the
others. Hashable by value (a frozen dataclass): it is a static argument of a jitted function, so
everything numeric (temperature, beta, ...) goes in `consts` and changing it does not recompile."""


def map_tokens(row_fn: RowFn, student: jax.Array, rows: Any, consts: Any, *, chunk_size: int | str | None) -> Any:
    """Applies `row_fn` to every token of `student` (`[..., V]`) together with its `rows`.

    Args:
      row_fn: per-row function, hashable. Each output row must depend only on the same input row,
        which is what makes chunking exact.
      student: logits `[..., V]` or a `Head`, the only differentiable input.
      rows: a pytree of arrays (or `Head`s, whose logits the row function receives) whose leading
        axes equal `student.shape[:-1]`.
      consts: a pytree of scalars or arrays passed whole to every chunk (hyperparameters).
      chunk_size: tokens per chunk, "auto" (see `AUTO_CHUNK_ELEMENTS`), or `None` to evaluate all
        tokens at once with plain autodiff (the naive reference, O(tokens * vocab) memory).

    Returns:
      `row_fn`'s outputs with the leading axes of `student` restored.
    """
    fused = any(is_head(x) for x in jax.tree.leaves((student, rows), is_leaf=is_head))
    chunk = resolve_chunk_size(chunk_size, student.shape[-1], fused=fused)
    return _map_tokens(row_fn, chunk, student, rows, consts)


def _leading(x) -> jax.Array:
    """The array whose leading axes are the tokens: a `Head`'s hidden states."""
    return x.hidden if is_head(x) else x


def _map_leading(fn, tree):
    """Applies `fn` to the token-indexed array of every leaf (a `Head`'s hidden states)."""
    return jax.tree.map(lambda x: Head(fn(x.hidden), x.weight) if is_head(x) else fn(x), tree, is_leaf=is_head)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _map_tokens(row_fn: RowFn, chunk_size: int | None, student: jax.Array, rows: Any, consts: Any) -> Any:
    # Jitted as a whole (row functions are hashable frozen dataclasses), so an eager call compiles
    # one program per configuration instead of dispatching dozens of small ops.
    lead = student.shape[:-1]
    n = math.prod(lead)
    flat_student, flat_rows = _map_leading(lambda x: x.reshape((n,) + x.shape[len(lead):]), (student, rows))
    if chunk_size is None or n <= chunk_size:
        out = row_fn(materialize(flat_student), materialize(flat_rows), consts)
    else:
        out = _chunked(row_fn, chunk_size, flat_student, flat_rows, consts)
    return jax.tree.map(lambda o: o.reshape(lead + o.shape[1:]), out)


def _chunk_start(i, chunk: int, n: int):
    # The last chunk is shifted back to end at row n. The rows it shares with the previous chunk
    # are recomputed to identical values, so overwriting them is harmless and nothing is padded.
    return jnp.minimum(i * chunk, n - chunk)


def _slice_rows(tree: Any, start, chunk: int) -> Any:
    # The barrier ties the full arrays to the loop index. XLA's CPU backend computes bf16 ops in
    # float32; without the barrier it converts a whole bf16 [tokens, vocab] input to float32 once,
    # hoisted out of the loop (a full float32 copy per input). With it only the slice is converted.
    tree, start = lax.optimization_barrier((tree, start))
    return _map_leading(lambda x: lax.dynamic_slice_in_dim(x, start, chunk, axis=0), tree)


# A 16-bit float gradient buffer is written as uint16 bit patterns: XLA's CPU backend would
# otherwise round-trip the whole bf16 buffer through float32 at every chunk's dynamic-update-slice.
def _bits_dtype(dtype):
    return jnp.uint16 if dtype in (jnp.bfloat16, jnp.float16) else dtype


def _to_bits(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(x, _bits_dtype(x.dtype))


def _from_bits(x: jax.Array, dtype) -> jax.Array:
    return lax.bitcast_convert_type(x, dtype)


def _row_values(row_fn: RowFn, student_c, rows_c, consts: Any) -> Any:
    return row_fn(materialize(student_c), materialize(rows_c), consts)


def _forward_loop(row_fn: RowFn, chunk: int, student, rows: Any, consts: Any) -> Any:
    n = _leading(student).shape[0]
    out_structs = jax.eval_shape(
        lambda s, r: _row_values(row_fn, *_map_leading(lambda x: x[:chunk], (s, r)), consts), student, rows)
    init = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape[1:], s.dtype), out_structs)

    def body(i, out):
        start = _chunk_start(i, chunk, n)
        values = _row_values(row_fn, *_slice_rows((student, rows), start, chunk), consts)
        return jax.tree.map(
            lambda buf, v: lax.dynamic_update_slice_in_dim(buf, v, start, axis=0), out, values
        )

    return lax.fori_loop(0, -(-n // chunk), body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked(row_fn: RowFn, chunk: int, student, rows: Any, consts: Any) -> Any:
    return _forward_loop(row_fn, chunk, student, rows, consts)


def _chunked_fwd(row_fn: RowFn, chunk: int, student, rows: Any, consts: Any):
    return _forward_loop(row_fn, chunk, student, rows, consts), (student, rows, consts)


def _chunked_bwd(row_fn: RowFn, chunk: int, residuals, cotangents):
    student, rows, consts = residuals
    if is_head(student):
        return _head_bwd(row_fn, chunk, student, rows, consts, cotangents), None, None
    n = student.shape[0]

    def body(i, grad):
        start = _chunk_start(i, chunk, n)
        student_c, rows_c = _slice_rows((student, rows), start, chunk)
        rows_c = materialize(rows_c)
        _, vjp = jax.vjp(lambda s: row_fn(s, rows_c, consts), student_c)
        (g,) = vjp(_slice_rows(cotangents, start, chunk))
        return lax.dynamic_update_slice_in_dim(grad, _to_bits(g.astype(student.dtype)), start, axis=0)

    grad = lax.fori_loop(0, -(-n // chunk), body, jnp.zeros(student.shape, _bits_dtype(student.dtype)))
    return _from_bits(grad, student.dtype), None, None


def _head_bwd(row_fn: RowFn, chunk: int, head: Head, rows: Any, consts: Any, cotangents) -> Head:
    """The gradient of a fused head: per chunk, the logits are recomputed, the row function's VJP
    gives their gradient, which is pulled back into the hidden states (the head's VJP, written into
    their buffer) and the weight (each chunk's product in float32, summed in float32). The last
    chunk, shifted back to end at the last row, shares rows with the one before: they are written
    twice (the same values) but left out of the weight's sum."""
    hidden, weight = head.hidden, head.weight
    n = hidden.shape[0]

    def body(i, carry):
        grad_hidden, grad_weight = carry
        start = _chunk_start(i, chunk, n)
        head_c, rows_c = _slice_rows((head, rows), start, chunk)
        rows_c = materialize(rows_c)
        logits_c, head_vjp = jax.vjp(lambda h, w: Head(h, w).logits(), head_c.hidden, weight)
        _, row_vjp = jax.vjp(lambda z: row_fn(z, rows_c, consts), logits_c)
        (g,) = row_vjp(_slice_rows(cotangents, start, chunk))
        (g_hidden, _) = head_vjp(g)  # as autodiff of the unfused logits gives it
        fresh = start + jnp.arange(chunk) >= i * chunk
        g_weight = jnp.dot(head_c.hidden.T, jnp.where(fresh[:, None], g, 0.0), preferred_element_type=jnp.float32)
        grad_hidden = lax.dynamic_update_slice_in_dim(grad_hidden, _to_bits(g_hidden.astype(hidden.dtype)), start,
                                                      axis=0)
        return grad_hidden, grad_weight + g_weight

    init = (jnp.zeros(hidden.shape, _bits_dtype(hidden.dtype)), jnp.zeros(weight.shape, jnp.float32))
    grad_hidden, grad_weight = lax.fori_loop(0, -(-n // chunk), body, init)
    return Head(_from_bits(grad_hidden, hidden.dtype), grad_weight.astype(weight.dtype))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
