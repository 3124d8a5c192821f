"""Routed-expert dispatch: routing, then the ways to run each token's experts.

Routing produces, per token, `k` (expert, score) assignments. An expert computes
`swiglu(x * score)` (Llama 4: the score scales the INPUT) or `score * swiglu(x)` (softmax router).
Dispatches compute the same thing in different ways:

- `dense`: every expert on every token, as transformers does (reference; cost grows with E).
- `sorted`: assignments sorted by expert, then a loop over experts, each reading its weights
  once and running its rows in whole tiles plus one remainder tile, with a hand-written backward
  (dropless; cost grows with active parameters, which is what a CPU needs).
- `ragged`: the sorted rows through `jax.lax.ragged_dot` (a grouped GEMM on GPU/TPU; on CPU
  it lowers to a masked dense product whose cost grows with E).
- `capacity`: per-expert buffers of `capacity_factor * N * k / E` slots; assignments past an
  expert's capacity are dropped (their contribution is 0) and the drop fraction is reported.

`distill.model.expert_parallel` runs the same dispatches on the experts of one shard.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Routing:
    """Router output for N tokens: logits `[N, E]` (float32), chosen experts and scores `[N, k]`."""

    logits: jax.Array
    experts: jax.Array
    scores: jax.Array


def route(logits_ne: jax.Array, k: int, kind: str, renormalize: bool) -> Routing:
    """Top-k routing from float32 router logits."""
    top_logits, experts = jax.lax.top_k(logits_ne, k)
    if kind == "llama4":
        scores = jax.nn.sigmoid(top_logits)
    else:
        probs = jax.nn.softmax(logits_ne, axis=-1)
        scores = jnp.take_along_axis(probs, experts, axis=-1)
        if renormalize and k > 1:  # top-1 renormalised would be 1.0: the router would get no LM gradient
            scores = scores / jnp.sum(scores, axis=-1, keepdims=True)
    return Routing(logits=logits_ne, experts=experts.astype(jnp.int32), scores=scores)


@struct.dataclass
class ExpertWeights:
    """Routed expert weights in the compute dtype: gate/up `[E, d, f]`, down `[E, f, d]`."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array


def dispatch_dense(x_nd, routing: Routing, w: ExpertWeights, scale_input: bool):
    """Reference: every expert on every token, weighted by a dense `[N, E]` score matrix."""
    n, e = routing.logits.shape
    dense_scores = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], routing.experts].set(routing.scores)
    dense_scores = dense_scores.astype(x_nd.dtype)
    if scale_input:
        x_end = x_nd[None] * dense_scores.T[:, :, None]
        h = jax.nn.silu(jnp.einsum("end,edf->enf", x_end, w.gate)) * jnp.einsum("end,edf->enf", x_end, w.up)
        return jnp.einsum("enf,efd->nd", h, w.down)
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x_nd, w.gate)) * jnp.einsum("nd,edf->enf", x_nd, w.up)
    return jnp.einsum("enf,efd,ne->nd", h, w.down, dense_scores)


def _sorted_assignments(x_nd, routing: Routing, scale_input: bool):
    """Rows of (token, expert) assignments sorted by expert: rows `[N*k, d]`, experts, order, scores."""
    n, k = routing.experts.shape
    flat_experts = routing.experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    token_of_row = order // k
    scores = routing.scores.reshape(-1)[order].astype(x_nd.dtype)
    rows = x_nd[token_of_row]
    if scale_input:
        rows = rows * scores[:, None]
    return rows, flat_experts[order], token_of_row, scores


def _combine(y_rows, token_of_row, scores, n: int, scale_input: bool):
    if not scale_input:
        y_rows = y_rows * scores[:, None]
    return jnp.zeros((n, y_rows.shape[-1]), y_rows.dtype).at[token_of_row].add(y_rows)


def default_tile(num_rows: int, num_experts: int) -> int:
    """Rows per tile: the mean rows per expert rounded down to a power of two, in [8, 512].

    With balanced routing most experts then run one or two tiles; see `tiled_expert_ffn`.
    """
    mean = max(1, num_rows // num_experts)
    return int(min(512, max(8, 2 ** int(math.floor(math.log2(mean))))))


def _remainder_tile(tile: int) -> int:
    return tile if tile <= 8 else max(8, tile // 4)


def _silu_grad(a):
    s = jax.nn.sigmoid(a)
    return s * (1 + a * (1 - s))


def _tile_plan(experts_m, num_experts: int, tile: int):
    """Per expert: first row, rows, tiles of `tile` rows, remainder tiles of `rem` rows (0 or 1).

    An expert's last `c % tile` rows take one remainder tile when they fit in it, else one more
    (masked) whole tile: a small tile costs almost as much as a whole one, so at most one runs.
    """
    counts = jnp.bincount(experts_m, length=num_experts).astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts
    rem = _remainder_tile(tile)
    left = counts % tile
    small = ((left > 0) & (left <= rem)).astype(jnp.int32)
    full = counts // tile + ((left > rem) & (rem < tile)).astype(jnp.int32)
    return starts, counts, full, small, rem


def _slice(x, start, size):
    return jax.lax.dynamic_slice_in_dim(x, start, size)


def _put(out, start, y, mask=None):
    if mask is not None:
        y = jnp.where(mask, y, _slice(out, start, y.shape[0]))
    return jax.lax.dynamic_update_slice_in_dim(out, y, start, 0)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _tiled_ffn(rows_md, experts_m, gate, up, down, tile):
    return _tiled_ffn_fwd(rows_md, experts_m, gate, up, down, tile)[0]


def _tiled_ffn_fwd(rows_md, experts_m, gate, up, down, tile):
    m, d = rows_md.shape
    starts, counts, full, small, rem = _tile_plan(experts_m, gate.shape[0], tile)
    padded = jnp.concatenate([rows_md, jnp.zeros((tile, d), rows_md.dtype)])
    row_in_tile, row_in_rem = jnp.arange(tile), jnp.arange(rem)

    def expert_body(e, outs):
        g, u, dn = gate[e], up[e], down[e]  # sliced once per expert, reused by all its tiles
        first, n, nfull = starts[e], counts[e], full[e]

        def run(size, row_in, offset):
            def body(j, outs):
                p = offset + j * size
                valid = (row_in < n - (p - first))[:, None]
                x = _slice(padded, p, size)
                a, b = x @ g, x @ u
                y = (jax.nn.silu(a) * b) @ dn
                return tuple(_put(o, p, v, valid) for o, v in zip(outs, (y, a, b)))
            return body

        outs = jax.lax.fori_loop(0, nfull, run(tile, row_in_tile, first), outs)
        return jax.lax.fori_loop(0, small[e], run(rem, row_in_rem, first + nfull * tile), outs)

    # Zeros of `padded @ gate[e]`'s type: under shard_map it varies where the rows or the weights do.
    pre = jnp.zeros_like(padded[:, :1]) + jnp.zeros_like(gate[0, :1])
    out, a, b = jax.lax.fori_loop(0, gate.shape[0], expert_body, (jnp.zeros_like(padded), pre, pre))
    return out[:m], (rows_md, experts_m, gate, up, down, a, b)


def _tiled_ffn_bwd(tile, residuals, dy_md):
    rows_md, experts_m, gate, up, down, a_pre, b_pre = residuals
    m, d = rows_md.shape
    starts, counts, full, small, rem = _tile_plan(experts_m, gate.shape[0], tile)
    padded = jnp.concatenate([rows_md, jnp.zeros((tile, d), rows_md.dtype)])
    dy_padded = jnp.concatenate([dy_md, jnp.zeros((tile, d), dy_md.dtype)])
    row_in_tile, row_in_rem = jnp.arange(tile), jnp.arange(rem)
    f32 = jnp.float32

    def tile_grads(x, dy, a, b, g, u, dn):
        """(dx, dgate, dup, ddown) of one tile from its saved pre-activations `x @ g`, `x @ u`;
        weight gradients accumulate in float32."""
        sa = jax.nn.silu(a)
        dh = dy @ dn.T
        da = dh * b * _silu_grad(a)
        db = dh * sa
        dx = da @ g.T + db @ u.T
        wgrad = lambda lhs, rhs: jnp.dot(lhs.T, rhs, preferred_element_type=f32)  # noqa: E731
        return dx, wgrad(x, da), wgrad(x, db), wgrad(sa * b, dy)

    def expert_body(drows, xs):
        g, u, dn, first, n, nfull, nsmall = xs

        def body(size, row_in, offset):
            def run(j, carry):
                drows, acc = carry
                p = offset + j * size
                valid = (row_in < n - (p - first))[:, None]  # rows of other experts: masked out
                x, dy, a, b = (jnp.where(valid, _slice(t, p, size), 0) for t in (padded, dy_padded, a_pre, b_pre))
                dx, *grads = tile_grads(x, dy, a, b, g, u, dn)
                return _put(drows, p, dx, valid), tuple(total + new for total, new in zip(acc, grads))
            return run

        acc = (jnp.zeros_like(g, f32), jnp.zeros_like(u, f32), jnp.zeros_like(dn, f32))  # keeps shard_map types
        carry = jax.lax.fori_loop(0, nfull, body(tile, row_in_tile, first), (drows, acc))
        carry = jax.lax.fori_loop(0, nsmall, body(rem, row_in_rem, first + nfull * tile), carry)
        drows, (dg, du, dd) = carry
        return drows, (dg.astype(g.dtype), du.astype(u.dtype), dd.astype(dn.dtype))

    drows, (dgate, dup, ddown) = jax.lax.scan(
        expert_body, jnp.zeros_like(padded), (gate, up, down, starts, counts, full, small))
    return drows[:m], None, dgate, dup, ddown


_tiled_ffn.defvjp(_tiled_ffn_fwd, _tiled_ffn_bwd)


def tiled_expert_ffn(rows_md, experts_m, w: ExpertWeights, num_experts: int, tile: int):
    """SwiGLU of each row with its expert's weights; rows sorted by expert.

    A loop over experts slices each expert's weights once; an inner loop runs its rows in tiles of
    `tile` rows, the last `c % tile` rows in one tile of `_remainder_tile(tile)` rows where they
    fit (rows of other experts in a tile are masked out). Only tiles that hold rows run (dynamic
    trip counts), so the work is the routed rows plus under one tile per expert, whatever the
    routing. The forward keeps each row's two SwiGLU pre-activations (`x @ gate`, `x @ up`) for the
    backward pass, which is written by hand (`jax.custom_vjp`): 6 matmuls per tile, the expert's
    weight gradients accumulated in float32 over its tiles and written once; an expert without
    rows gets an exact zero gradient. Reverse mode only (no `jax.jvp` through it).
    """
    assert w.gate.shape[0] == num_experts, (w.gate.shape, num_experts)
    return _tiled_ffn(rows_md, experts_m.astype(jnp.int32), w.gate, w.up, w.down, int(tile))


def dispatch_sorted(x_nd, routing: Routing, w: ExpertWeights, scale_input: bool, tile: int | None):
    n, k = routing.experts.shape
    num_experts = w.gate.shape[0]
    rows, experts, token_of_row, scores = _sorted_assignments(x_nd, routing, scale_input)
    tile = tile or default_tile(n * k, num_experts)
    y = tiled_expert_ffn(rows, experts, w, num_experts, tile)
    return _combine(y, token_of_row, scores, n, scale_input)


def dispatch_ragged(x_nd, routing: Routing, w: ExpertWeights, scale_input: bool):
    n, _ = routing.experts.shape
    num_experts = w.gate.shape[0]
    rows, experts, token_of_row, scores = _sorted_assignments(x_nd, routing, scale_input)
    sizes = jnp.bincount(experts, length=num_experts).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(rows, w.gate, sizes)) * jax.lax.ragged_dot(rows, w.up, sizes)
    y = jax.lax.ragged_dot(h, w.down, sizes)
    return _combine(y, token_of_row, scores, n, scale_input)


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def dispatch_capacity(x_nd, routing: Routing, w: ExpertWeights, scale_input: bool, capacity_factor: float):
    """Per-expert buffers `[E, C, d]`; returns (out, fraction of assignments dropped)."""
    n, k = routing.experts.shape
    num_experts = w.gate.shape[0]
    cap = expert_capacity(n, k, num_experts, capacity_factor)
    # Slot of each assignment in its expert's buffer, in token order, choice 0 before choice 1.
    flat_experts = routing.experts.T.reshape(-1)  # [k * N], choice-major
    one_hot = jax.nn.one_hot(flat_experts, num_experts, dtype=jnp.int32)
    slot = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
    kept = slot < cap
    token = jnp.tile(jnp.arange(n), k)
    scores = routing.scores.T.reshape(-1).astype(x_nd.dtype)
    rows = x_nd[token] * (scores[:, None] if scale_input else 1)
    safe_slot = jnp.where(kept, slot, cap)  # out-of-range slot: the scatter drops it
    buffers = jnp.zeros((num_experts, cap, x_nd.shape[-1]), x_nd.dtype).at[flat_experts, safe_slot].set(rows, mode="drop")
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buffers, w.gate)) * jnp.einsum("ecd,edf->ecf", buffers, w.up)
    y_buffers = jnp.einsum("ecf,efd->ecd", h, w.down)
    y = y_buffers.at[flat_experts, safe_slot].get(mode="fill", fill_value=0) * kept[:, None].astype(x_nd.dtype)
    if not scale_input:
        y = y * scores[:, None]
    out = jnp.zeros_like(x_nd).at[token].add(y)
    return out, 1.0 - jnp.mean(kept.astype(jnp.float32))


def resolve_dispatch(dispatch: str) -> str:
    if dispatch != "auto":
        return dispatch
    return "sorted" if jax.default_backend() == "cpu" else "ragged"
