"""Mixture of experts: router, shared expert and routed experts (`Llama4TextMoe`).

The routed experts run through one of the dispatches of `distill.model.dispatch` (`sorted`,
`ragged`, `dense`, `capacity`). Under a sharding context (`distill.model.sharding`) that splits
the `experts` axis, they run with `distill.model.expert_parallel` instead: tokens travel to the
devices holding their experts, which run one of those dispatches on what they receive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from distill.model.config import ModelConfig
from distill.model.dispatch import (ExpertWeights, dispatch_capacity, dispatch_dense, dispatch_ragged, dispatch_sorted,
                                    resolve_dispatch, route)
from distill.model.expert_parallel import dispatch_expert_parallel
from distill.model.layers import SwiGLU, dtype_of, param
from distill.model.sharding import current


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
        context = current()
        if context is not None and context.size("experts") > 1:
            routed, dropped = dispatch_expert_parallel(x, routing, w, scale_input, cfg, context)
        elif dispatch == "dense":
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
