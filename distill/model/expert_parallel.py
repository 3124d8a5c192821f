"""Expert parallelism: routed experts split over the `expert` mesh axes, tokens moved to them.

`dispatch_expert_parallel` runs under `jax.shard_map` with every mesh axis manual. A device holds
its shard of the tokens (`batch` axes, plus any expert or fsdp axis the batch is not split over)
and the weights of its `E_local = E / ep` experts (split on d over the fsdp axes and on f over the
tensor axes). Per device:

1. Pack: each local (token, choice) assignment goes to shard `expert // E_local`, in slot
   `rank among the assignments to that shard` of a send buffer `[ep, C, d]` (choice 0 of every
   token first, then choice 1, ...), with its local expert id in `[ep, C]` (`E_local` marks an
   empty slot). `all_to_all` over the expert axes: row j of the result holds what shard j sent.
2. The device's expert weights are gathered over the fsdp axes only (never over the expert axes:
   no device holds another shard's experts).
3. The received rows run through the model's own local dispatch (`sorted`, `ragged` or `dense`):
   each row is a token with one assignment, score 1 (empty slots: zero rows with score 0, given
   expert `E_local`, which `sorted` never computes). With f split over tensor axes, the down
   projection gives partial sums: `psum` over them.
4. `all_to_all` back, unpack into the assignments' (shard, slot), `out[token] += y`.

The routing score scales the expert's input on the sender side (Llama 4, `scale_input`) or its
output after the return, so the result equals the single-device dispatches.

Capacity C per destination shard: dropless by default, `C = T_local * k` (every local assignment
could go to one shard), which is exact but exchanges `ep` times more rows than are routed. With
`dispatch == "capacity"`, `C = ceil(capacity_factor * T_local * k / ep)`: assignments past a
shard's C slots are dropped (contribute 0) and the dropped fraction (over all devices) is returned.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from distill.model.config import ModelConfig
from distill.model.dispatch import (
    ExpertWeights, Routing, default_tile, dispatch_dense, dispatch_ragged, dispatch_sorted, resolve_dispatch,
)  # fmt: skip
from distill.model.sharding import ShardingContext


def _axes(entry) -> tuple[str, ...]:
    """Mesh axes of one PartitionSpec entry."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _varying(x, axes: tuple[str, ...]):
    """`x` typed as varying over `axes` too (shard_map's check_vma types): the local dispatch's loops
    need rows and weights of one type; the transpose of this cast sums gradients over `axes`."""
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def dispatch_expert_parallel(x_nd, routing: Routing, w: ExpertWeights, scale_input: bool, cfg: ModelConfig,
                             context: ShardingContext) -> tuple[jax.Array, jax.Array]:
    """Routed experts over the mesh's expert axes; returns (output `[N, d]`, dropped fraction)."""
    mesh = context.mesh
    w_spec = context.spec("experts", "embed", "mlp")
    expert_axes, fsdp_axes, tensor_axes = (_axes(entry) for entry in w_spec)
    batch_axes = _axes(context.spec("batch", None)[0])
    # Tokens are split over every axis the experts are: a device sends only its own tokens.
    token_axes = batch_axes + tuple(a for a in expert_axes + fsdp_axes if a not in batch_axes)
    if set(tensor_axes) & set(token_axes):
        raise ValueError(f"expert parallelism needs tokens replicated over the mlp axes {tensor_axes}; "
                         f"the batch is split over {token_axes}")
    ep = math.prod(mesh.shape[a] for a in expert_axes)
    num_experts = w.gate.shape[0]
    if num_experts % ep:
        raise ValueError(f"num_local_experts={num_experts} must be divisible by the expert shards ({ep})")
    shards = math.prod(mesh.shape[a] for a in token_axes)
    if x_nd.shape[0] % shards:
        raise ValueError(f"{x_nd.shape[0]} tokens do not split over the {shards} shards of {token_axes}")

    tokens = P(_spec_entry(token_axes), None)
    w_specs = ExpertWeights(gate=w_spec, up=w_spec, down=P(w_spec[0], w_spec[2], w_spec[1]))
    body = partial(_local, scale_input=scale_input, cfg=cfg, ep=ep, expert_axes=expert_axes,
                   fsdp_axes=fsdp_axes, tensor_axes=tensor_axes, token_axes=token_axes)
    run = jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, w_specs), out_specs=(tokens, P()))
    return run(x_nd, routing.experts, routing.scores, w)


def _local(x_td, experts_tk, scores_tk, w: ExpertWeights, *, scale_input, cfg, ep, expert_axes, fsdp_axes,
           tensor_axes, token_axes):
    t, d = x_td.shape
    k = experts_tk.shape[1]
    e_local = w.gate.shape[0]

    # 1. Pack the local assignments by destination shard, choice-major (as `dispatch_capacity`).
    experts = experts_tk.T.reshape(-1)
    token = jnp.tile(jnp.arange(t), k)
    scores = scores_tk.T.reshape(-1).astype(x_td.dtype)
    dest = experts // e_local
    one_hot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)
    slot = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
    cap = t * k if cfg.dispatch != "capacity" else max(1, math.ceil(cfg.capacity_factor * t * k / ep))
    kept = slot < cap
    slot = jnp.where(kept, slot, cap)  # out of range: the scatter drops it, the gather reads 0
    rows = x_td[token] * (scores[:, None] if scale_input else 1)
    send_x = jnp.zeros((ep, cap, d), x_td.dtype).at[dest, slot].set(rows, mode="drop")
    send_e = jnp.full((ep, cap), e_local, jnp.int32).at[dest, slot].set(experts % e_local, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, expert_axes, 0, 0)
    recv_e = jax.lax.all_to_all(send_e, expert_axes, 0, 0).reshape(-1)

    # 2. This shard's experts, whole on d (gathered over fsdp), f still split over tensor. Typed as
    # varying over the token axes before the gather, so that in the backward pass the weight
    # gradient is reduce-scattered over fsdp first and then summed over the other token axes.
    other_token_axes = tuple(a for a in token_axes if a not in expert_axes + fsdp_axes)
    w = jax.tree.map(lambda a: _varying(a, other_token_axes), w)
    gather = lambda a, axis: jax.lax.all_gather(a, fsdp_axes, axis=axis, tiled=True) if fsdp_axes else a  # noqa: E731
    w_local = ExpertWeights(gather(w.gate, 1), gather(w.up, 1), gather(w.down, 2))

    # 3. The received rows through the local dispatch: one assignment each, score 1 (0: empty slot).
    rows_in = _varying(recv_x.reshape(ep * cap, d), tensor_axes)
    valid = (recv_e < e_local).astype(jnp.float32)
    inner = Routing(logits=jnp.zeros((ep * cap, e_local), jnp.float32), experts=recv_e[:, None],
                    scores=valid[:, None])
    dispatch = resolve_dispatch(cfg.dispatch)
    if dispatch == "dense":
        y = dispatch_dense(rows_in, inner, w_local, False)
    elif dispatch == "ragged":  # rows past the groups are unspecified: empty slots join the last group
        y = dispatch_ragged(rows_in, inner.replace(experts=jnp.minimum(inner.experts, e_local - 1)), w_local, False)
    else:  # sorted, and capacity (its capacity is applied at the exchange)
        tile = cfg.dispatch_tile or default_tile(t * k, e_local)  # tiles sized by routed rows, not slots
        y = dispatch_sorted(rows_in, inner, w_local, False, tile)
    if tensor_axes:
        y = jax.lax.psum(y, tensor_axes)

    # 4. Back to the senders; each assignment reads its result from (shard, slot).
    back = jax.lax.all_to_all(y.reshape(ep, cap, d), expert_axes, 0, 0)
    y_rows = back.at[dest, slot].get(mode="fill", fill_value=0) * kept[:, None].astype(x_td.dtype)
    if not scale_input:
        y_rows = y_rows * scores[:, None]
    out = jnp.zeros_like(x_td).at[token].add(y_rows)
    dropped = jax.lax.pmean(1.0 - jnp.mean(kept.astype(jnp.float32)), token_axes)
    return out, dropped
