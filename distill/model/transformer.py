"""The Llama-4-style MoE decoder: one implementation for teacher and student.

Layers are built in groups of `cfg.layer_period` consecutive layers (the period of the
RoPE/NoPE x MoE/dense plan). With `scan_layers`, the whole groups are stacked along a leading
`layers` axis and run under `jax.lax.scan` (compile time flat in depth); the remaining
`num_hidden_layers % period` layers run unrolled after them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

import losses
from distill.model.attention import Attention, LayerCache
from distill.model.config import ModelConfig
from distill.model.layers import RMSNorm, SwiGLU, dtype_of, param
from distill.model.moe import MoE, MoEStats
from distill.model.rope import inverse_frequencies, rotary_angles
from distill.model.sharding import constrain
from distill.model.vision import Projector, VisionEncoder, check_images, place_features


@struct.dataclass
class ModelOutput:
    """What a forward pass returns. Router statistics are stacked over MoE layers, in layer order."""

    logits: jax.Array | losses.Head  # [B, S, vocab] float32; with fused_head, the head the losses form them from
    router_logits: jax.Array  # [L_moe, B*S, E] float32
    expert_indices: jax.Array  # [L_moe, B*S, k] int32
    expert_counts: jax.Array  # [L_moe, E] int32
    dropped_fraction: jax.Array  # [L_moe] float32
    cache: ModelCache | None = None  # the updated KV cache, when the call was given one


@struct.dataclass
class ModelCache:
    """Every attention layer's KV cache, laid out like the layers (scanned groups stacked along a
    leading axis), and `index`: how many tokens it holds. Make one with `Transformer.init_cache`."""

    scanned: list[LayerCache] | None  # per layer of a group, stacked over the scanned groups
    groups: list[list[LayerCache]]
    tail: list[LayerCache] | None
    index: jax.Array  # int32 scalar


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: `h = x + attn(norm(x)); out = h + ffn(norm(h))`."""

    def __init__(self, cfg: ModelConfig, layer_index: int, rngs: nnx.Rngs):
        self.is_moe = cfg.layer_is_moe[layer_index]
        self.input_norm = RMSNorm(cfg, rngs)
        self.attention = Attention(cfg, cfg.layer_uses_rope[layer_index], rngs)
        self.post_attention_norm = RMSNorm(cfg, rngs)
        self.feed_forward = MoE(cfg, rngs) if self.is_moe else SwiGLU(cfg, cfg.intermediate_size_mlp, rngs)

    def __call__(self, x, positions, rope, segment_ids, cache: LayerCache | None = None,
                 cache_index=None) -> tuple[jax.Array, MoEStats | None, LayerCache | None]:
        attended, cache = self.attention(self.input_norm(x), positions, rope, segment_ids, cache, cache_index)
        h = x + attended.astype(x.dtype)
        if self.is_moe:
            y, stats = self.feed_forward(self.post_attention_norm(h))
        else:
            y, stats = self.feed_forward(self.post_attention_norm(h)), None
        return h + y.astype(h.dtype), stats, cache


class LayerGroup(nnx.Module):
    """`period` consecutive layers starting at `first_layer`; the unit that scan stacks."""

    def __init__(self, cfg: ModelConfig, first_layer: int, size: int, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, first_layer + j, rngs) for j in range(size)])

    def __call__(self, x, positions, rope, segment_ids, caches: list[LayerCache] | None = None,
                 cache_index=None) -> tuple[jax.Array, list[MoEStats], list[LayerCache] | None]:
        stats, new_caches = [], []
        for j, layer in enumerate(self.layers):
            x, layer_stats, cache = layer(x, positions, rope, segment_ids, None if caches is None else caches[j],
                                          cache_index)
            new_caches.append(cache)
            if layer_stats is not None:
                stats.append(layer_stats)
        return x, stats, (None if caches is None else new_caches)


def _stack_stats(stats: list[MoEStats]) -> MoEStats:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *stats)


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nnx.Module):
    """Token embedding, decoder layers, final RMSNorm, LM head.

    Call on int tokens `[B, S]`; optional `positions` `[B, S]` (default 0..S-1) and `segment_ids`
    `[B, S]` (packed documents attend only within their segment). Returns a `ModelOutput`.

    With `cfg.vision`, optional `images` `[B, N, H, W, C]` (float): each row's N images are encoded,
    projected and written over that row's `N * tokens_per_image` placeholders, in order, before the
    first layer (`distill.model.vision`). Without `images` the placeholders embed as ordinary tokens,
    as in transformers when no `pixel_values` are given.

    With `fused_head=True` the output's `logits` is a `losses.Head`: the final hidden states and
    the head weight, both in the compute dtype, whose logits the losses form a chunk of tokens at
    a time (no [B, S, vocab] array is made).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        period = cfg.layer_period
        num_groups, tail = divmod(cfg.num_hidden_layers, period)
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        if cfg.scan_layers and num_groups > 1:
            self.scanned = self._stacked_groups(cfg, num_groups, period, rngs)
            self.groups = nnx.List([])
        else:
            self.scanned = None
            self.groups = nnx.List([LayerGroup(cfg, g * period, period, rngs) for g in range(num_groups)])
        first_tail = cfg.num_hidden_layers - tail
        self.tail = LayerGroup(cfg, first_tail, tail, rngs) if tail else None
        self.final_norm = RMSNorm(cfg, rngs)
        self.lm_head = None if cfg.tie_word_embeddings else param(
            rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)
        # Last, so the text parameters are the same as a text-only model's of the same seed.
        self.vision = VisionEncoder(cfg, rngs) if cfg.vision is not None else None
        self.projector = Projector(cfg, rngs) if cfg.vision is not None else None

    def _fuse_images(self, x_bsd, tokens_bs, images) -> jax.Array:
        """The embeddings with the projected image features over the placeholders."""
        if self.vision is None:
            raise ValueError("images: this model has no vision encoder; set model.vision (a VisionConfig) "
                             "or leave images out")
        check_images(images, self.cfg.vision)
        b, n = images.shape[:2]
        features = self.projector(self.vision(images))  # [B, N, tokens_per_image, hidden]
        return place_features(x_bsd, tokens_bs, features.reshape(b, n * features.shape[2], -1),
                              self.cfg.vision.image_token_id)

    @staticmethod
    def _stacked_groups(cfg: ModelConfig, num_groups: int, period: int, rngs: nnx.Rngs) -> LayerGroup:
        @nnx.split_rngs(splits=num_groups)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(rngs):
            return LayerGroup(cfg, 0, period, rngs)

        return create(rngs)

    def init_cache(self, batch: int, length: int) -> ModelCache:
        """An empty KV cache for `batch` rows of up to `length` tokens (in the compute dtype)."""
        cfg = self.cfg
        shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
        empty = lambda *lead: LayerCache(keys=jnp.zeros((*lead, *shape), dtype_of(cfg.dtype)),  # noqa: E731
                                         values=jnp.zeros((*lead, *shape), dtype_of(cfg.dtype)))
        period = cfg.layer_period
        scanned = None
        if self.scanned is not None:
            scanned = [empty(cfg.num_hidden_layers // period) for _ in range(period)]
        return ModelCache(scanned=scanned, groups=[[empty() for _ in g.layers] for g in self.groups],
                          tail=None if self.tail is None else [empty() for _ in self.tail.layers],
                          index=jnp.zeros((), jnp.int32))

    def __call__(self, tokens_bs: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: ModelCache | None = None,
                 images: jax.Array | None = None, fused_head: bool = False) -> ModelOutput:
        """With a `cache` (`init_cache`), the tokens continue the ones it holds: they sit at positions
        `cache.index + 0..S-1` (one unpacked sequence per row) and the output carries the new cache."""
        cfg = self.cfg
        b, s = tokens_bs.shape
        if cache is not None:
            if positions is not None or segment_ids is not None:
                raise ValueError("with a cache, positions follow the cache index and there are no segments")
            positions = jnp.broadcast_to(cache.index + jnp.arange(s, dtype=jnp.int32), (b, s))
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        rope = rotary_angles(positions, inverse_frequencies(cfg))
        x = jnp.take(self.embed[...], tokens_bs, axis=0).astype(dtype_of(cfg.dtype))
        if images is not None:
            x = self._fuse_images(x, tokens_bs, images)
        x = constrain(x, "batch", "length", None)
        stats: list[MoEStats] = []
        cache_index = None if cache is None else cache.index

        def run_group(group, x, caches):
            x, group_stats, caches = group(x, positions, rope, segment_ids, caches, cache_index)
            return constrain(x, "batch", "length", None), group_stats, caches

        if cfg.remat != "none":
            run_group = nnx.remat(run_group, policy=_REMAT_POLICIES[cfg.remat])

        new_scanned = None
        if self.scanned is not None:
            @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0, 0),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def scan_groups(x, group, caches):
                x, group_stats, caches = run_group(group, x, caches)
                return x, (_stack_stats(group_stats) if group_stats else None), caches

            x, scanned_stats, new_scanned = scan_groups(x, self.scanned, None if cache is None else cache.scanned)
            if scanned_stats is not None:  # [G, moe per group, ...] -> layer order
                stats.extend(_unstack(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), scanned_stats)))
        new_groups = []
        for g, group in enumerate(self.groups):
            x, group_stats, caches = run_group(group, x, None if cache is None else cache.groups[g])
            stats.extend(group_stats)
            new_groups.append(caches)
        new_tail = None
        if self.tail is not None:
            x, group_stats, new_tail = run_group(self.tail, x, None if cache is None else cache.tail)
            stats.extend(group_stats)

        x = self.final_norm(x)
        c = dtype_of(cfg.dtype)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        if fused_head:
            logits = losses.Head(x.astype(c), head.astype(c))
        else:
            logits = constrain(jnp.dot(x.astype(c), head.astype(c), preferred_element_type=jnp.float32),
                               "batch", "length", "vocab")
        new_cache = None if cache is None else ModelCache(scanned=new_scanned, groups=new_groups, tail=new_tail,
                                                          index=cache.index + s)
        return ModelOutput(logits=logits, cache=new_cache, **_router_fields(stats, b * s, cfg))


def _unstack(stacked: MoEStats) -> list[MoEStats]:
    n = stacked.expert_counts.shape[0]
    return [jax.tree.map(lambda a: a[i], stacked) for i in range(n)]


def _router_fields(stats: list[MoEStats], num_tokens: int, cfg: ModelConfig) -> dict:
    if not stats:
        e, k = cfg.num_local_experts, cfg.num_experts_per_tok
        return dict(router_logits=jnp.zeros((0, num_tokens, e), jnp.float32),
                    expert_indices=jnp.zeros((0, num_tokens, k), jnp.int32),
                    expert_counts=jnp.zeros((0, e), jnp.int32),
                    dropped_fraction=jnp.zeros((0,), jnp.float32))
    stacked = _stack_stats(stats)
    return dict(router_logits=stacked.router_logits, expert_indices=stacked.expert_indices,
                expert_counts=stacked.expert_counts, dropped_fraction=stacked.dropped_fraction)


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A freshly initialised model (parameters on the default device, no mesh needed).

    Initialised under `jit`, so the weights are bit-identical to the ones a run initialises
    straight into its shardings inside a larger jitted program.
    """
    return nnx.jit(lambda: Transformer(cfg, nnx.Rngs(params=seed)))()
