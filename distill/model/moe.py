"""Mixture of experts: router, expert dispatch, shared expert.

Routing produces, per token, `k` (expert, score) assignments. An expert computes
`swiglu(x * score)` (Llama 4: the score scales the INPUT) or `score * swiglu(x)` (softmax router).
Dispatches compute the same thing in different ways:

- `dense`: every expert on every token, as transformers does (reference; cost grows with E).
- `sorted`: assignments sorted by expert, then a scan over fixed-size row tiles, each tile
  belonging to one expert; rows = assignments + at most E * tile padding (dropless; cost grows
  with active parameters, which is what a CPU needs).
- `ragged`: the sorted rows through `jax.lax.ragged_dot` (a grouped GEMM on GPU/TPU; on CPU
  it lowers to a masked dense product whose cost grows with E).
- `capacity`: per-expert buffers of `capacity_factor * N * k / E` slots; assignments past an
  expert's capacity are dropped (their contribution is 0) and the drop fraction is reported.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from distill.model.config import ModelConfig
from distill.model.layers import SwiGLU, dtype_of, param


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
        if renormalize:
            scores = scores / jnp.sum(scores, axis=-1, keepdims=True)
    return Routing(logits=logits_ne, experts=experts.astype(jnp.int32), scores=scores)


@struct.dataclass
class ExpertWeights:
    """Routed expert weights in the compute dtype: gate/up `[E, d, f]`, down `[E, f, d]`."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array


def _expert_ffn(x, w: ExpertWeights, e):
    return (jax.nn.silu(x @ w.gate[e]) * (x @ w.up[e])) @ w.down[e]


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
    """Rows per tile: about a quarter of the mean rows per expert, a power of two in [8, 512]."""
    target = max(1, num_rows // (4 * num_experts))
    return int(min(512, max(8, 2 ** round(math.log2(target)))))


def tiled_expert_ffn(rows_md, experts_m, w: ExpertWeights, num_experts: int, tile: int):
    """SwiGLU of each row with its expert's weights; rows sorted by expert.

    Tiles of `tile` consecutive rows start at each expert's first row and step through its rows;
    there are at most `ceil(M / tile) + E` of them, so the work is `M + E * tile` rows, not `M * E`.
    Rows of a tile that belong to another expert are masked out; a `lax.scan` visits the tiles,
    so only one expert's weights are read at a time.
    """
    m, d = rows_md.shape
    counts = jnp.bincount(experts_m, length=num_experts)
    starts = jnp.cumsum(counts) - counts
    tiles_per_expert = (counts + tile - 1) // tile
    tile_end = jnp.cumsum(tiles_per_expert)
    num_tiles = -(-m // tile) + num_experts
    tile_ids = jnp.arange(num_tiles)
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, tile_ids, side="right"), num_experts - 1)
    index_in_expert = tile_ids - (tile_end - tiles_per_expert)[tile_expert]
    tile_start = starts[tile_expert] + index_in_expert * tile
    tile_rows = jnp.where(tile_ids < tile_end[-1], counts[tile_expert] - index_in_expert * tile, 0)
    padded = jnp.concatenate([rows_md, jnp.zeros((tile, d), rows_md.dtype)])
    row_in_tile = jnp.arange(tile)

    def body(out, t):
        expert, start, valid = t
        x = jax.lax.dynamic_slice_in_dim(padded, start, tile)
        y = _expert_ffn(x, w, expert) * (row_in_tile < valid)[:, None].astype(x.dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, jax.lax.dynamic_slice_in_dim(out, start, tile) + y, start, 0), None

    out, _ = jax.lax.scan(body, jnp.zeros_like(padded), (tile_expert, tile_start, tile_rows))
    return out[:m]


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


@struct.dataclass
class MoEStats:
    """Per-layer router statistics for losses and logging (tokens flattened to N = B * S)."""

    router_logits: jax.Array  # [N, E] float32
    expert_indices: jax.Array  # [N, k] int32
    expert_counts: jax.Array  # [E] int32: assignments per expert
    dropped_fraction: jax.Array  # [] float32: 0 unless dispatch is `capacity`


class MoE(nnx.Module):
    """Shared expert + routed experts (Llama4TextMoe)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
        self.cfg = cfg
        self.router = param(rngs, (d, e), ("embed", None), cfg)
        self.gate = param(rngs, (e, d, f), ("experts", "embed", "mlp"), cfg)
        self.up = param(rngs, (e, d, f), ("experts", "embed", "mlp"), cfg)
        self.down = param(rngs, (e, f, d), ("experts", "mlp", "embed"), cfg)
        self.shared_expert = SwiGLU(cfg, f, rngs)

    def __call__(self, x_bsd: jax.Array) -> tuple[jax.Array, MoEStats]:
        cfg, c = self.cfg, dtype_of(self.cfg.dtype)
        b, s, d = x_bsd.shape
        x = x_bsd.reshape(b * s, d).astype(c)
        logits = jnp.dot(x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        routing = route(logits, cfg.num_experts_per_tok, cfg.router, cfg.router_renormalize)
        w = ExpertWeights(self.gate[...].astype(c), self.up[...].astype(c), self.down[...].astype(c))
        scale_input = cfg.router == "llama4"
        dispatch = resolve_dispatch(cfg.dispatch)
        dropped = jnp.zeros((), jnp.float32)
        if dispatch == "dense":
            routed = dispatch_dense(x, routing, w, scale_input)
        elif dispatch == "sorted":
            routed = dispatch_sorted(x, routing, w, scale_input, cfg.dispatch_tile)
        elif dispatch == "ragged":
            routed = dispatch_ragged(x, routing, w, scale_input)
        else:
            routed, dropped = dispatch_capacity(x, routing, w, scale_input, cfg.capacity_factor)
        out = self.shared_expert(x) + routed
        stats = MoEStats(
            router_logits=logits,
            expert_indices=routing.experts,
            expert_counts=jnp.bincount(routing.experts.reshape(-1), length=cfg.num_local_experts).astype(jnp.int32),
            dropped_fraction=dropped,
        )
        return out.reshape(b, s, d), stats
