"""Llama 4 attention: GQA, iRoPE (chunked RoPE layers, global NoPE layers), QK norm, temperature tuning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from distill.model.config import ModelConfig
from distill.model.layers import dtype_of, param, rms_normalize
from distill.model.rope import apply_rotary


def attention_mask(positions_bs: jax.Array, segment_ids_bs: jax.Array | None, chunk_size: int | None) -> jax.Array:
    """Boolean `[B, 1, S, S]`: causal by sequence index, within a segment, and within a chunk of
    positions when `chunk_size` is set (positions restart per packed document, so chunks do too)."""
    s = positions_bs.shape[1]
    index = jnp.arange(s)
    mask = jnp.broadcast_to(index[None, :] <= index[:, None], (positions_bs.shape[0], s, s))
    if segment_ids_bs is not None:
        mask &= segment_ids_bs[:, :, None] == segment_ids_bs[:, None, :]
    if chunk_size is not None:
        mask &= (positions_bs[:, :, None] // chunk_size) == (positions_bs[:, None, :] // chunk_size)
    return mask[:, None]


def cached_attention_mask(positions_bs: jax.Array, cache_length: int, chunk_size: int | None) -> jax.Array:
    """Boolean `[B, 1, S, T]` for queries at `positions` against a KV cache whose slot t holds
    position t (generation: one unpacked sequence per row): causal, and within a chunk when set."""
    slots = jnp.arange(cache_length)
    mask = slots[None, None, :] <= positions_bs[:, :, None]
    if chunk_size is not None:
        mask &= (slots[None, None, :] // chunk_size) == (positions_bs[:, :, None] // chunk_size)
    return mask[:, None]


@struct.dataclass
class LayerCache:
    """One attention layer's keys and values, `[B, T, kv_heads, head_dim]`, for incremental decoding."""

    keys: jax.Array
    values: jax.Array


def temperature_scales(positions_bs: jax.Array, floor_scale: int, attn_scale: float) -> jax.Array:
    """`log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1`, float32 `[B, S]`."""
    pos = positions_bs.astype(jnp.float32)
    return jnp.log1p(jnp.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, uses_rope: bool, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg = cfg
        self.uses_rope = uses_rope
        self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg)
        self.k = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg)
        self.v = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg)
        self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg)

    def __call__(self, x_bsd: jax.Array, positions_bs: jax.Array, rope: tuple[jax.Array, jax.Array],
                 segment_ids_bs: jax.Array | None, cache: LayerCache | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
        """With a `cache`, this call's keys and values are written at `cache_index` (the number of
        tokens already decoded) and the queries attend over the whole cache; returns the new cache."""
        cfg, c = self.cfg, dtype_of(self.cfg.dtype)
        x = x_bsd.astype(c)
        q = jnp.einsum("bsd,dhk->bshk", x, self.q[...].astype(c))
        k = jnp.einsum("bsd,dhk->bshk", x, self.k[...].astype(c))
        v = jnp.einsum("bsd,dhk->bshk", x, self.v[...].astype(c))
        if self.uses_rope:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cfg.use_qk_norm:
                q, k = rms_normalize(q, cfg.rms_norm_eps), rms_normalize(k, cfg.rms_norm_eps)
        elif cfg.attn_temperature_tuning:
            scales = temperature_scales(positions_bs, cfg.floor_scale, cfg.attn_scale)
            q = (q.astype(jnp.float32) * scales[:, :, None, None]).astype(c)
        chunk = cfg.attention_chunk_size if self.uses_rope else None
        blocks = 1
        if cache is None:
            mask = attention_mask(positions_bs, segment_ids_bs, chunk)
            blocks = causal_query_blocks(q.shape[1])
        else:
            at = (0, cache_index, 0, 0)
            cache = LayerCache(keys=jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), at),
                               values=jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), at))
            k, v = cache.keys, cache.values
            mask = cached_attention_mask(positions_bs, k.shape[1], chunk)
        out = grouped_attention(q, k, v, mask, cfg.head_dim**-0.5, query_blocks=blocks)
        return jnp.einsum("bshk,hkd->bsd", out, self.o[...].astype(c)), cache


def causal_query_blocks(seq_len: int) -> int:
    """Query blocks for causal self-attention: 4 when they split the sequence evenly into blocks of
    at least 16, else 1. Four blocks compute 5/8 of the `[S, S]` logits (docs/performance.md)."""
    return 4 if seq_len % 4 == 0 and seq_len >= 64 else 1


def grouped_attention(q_bshk, k_bskk, v_bskk, mask_b1qk, scale: float, query_blocks: int = 1) -> jax.Array:
    """Softmax attention with `kv_heads` groups of query heads; logits and softmax in float32.

    `query_blocks > 1` is for causal self-attention (query i is key i, the mask hides keys after
    it): the queries are split into that many blocks, each attending only to the keys up to its
    own end, so the logits above the diagonal blocks are never computed. Each block's
    probabilities are normalised after the product with the values (`[q, head_dim]` divisions
    instead of `[q, keys]`).
    """
    b, s, h, hd = q_bshk.shape
    kv = k_bskk.shape[2]
    q = q_bshk.reshape(b, s, kv, h // kv, hd)
    if query_blocks == 1:
        return _attend(q, k_bskk, v_bskk, mask_b1qk, scale).reshape(b, s, h, hd)
    size = s // query_blocks
    blocks = [_attend(q[:, i * size:(i + 1) * size], k_bskk[:, :(i + 1) * size], v_bskk[:, :(i + 1) * size],
                      mask_b1qk[:, :, i * size:(i + 1) * size, :(i + 1) * size], scale)
              for i in range(query_blocks)]
    return jnp.concatenate(blocks, axis=1).reshape(b, s, h, hd)


def _attend(q_bqgrk, k_bsgk, v_bsgk, mask_b1qs, scale: float) -> jax.Array:
    """One query block `[b, q, groups, heads per group, head_dim]` over its keys."""
    logits = jnp.einsum("bqgrk,bsgk->bgqrs", q_bqgrk, k_bsgk, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask_b1qs[:, :, :, None, :], logits, jnp.finfo(jnp.float32).min)
    exp = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    total = jnp.transpose(jnp.sum(exp, axis=-1), (0, 2, 1, 3))[..., None]  # [b, q, g, r, 1]
    out = jnp.einsum("bgqrs,bsgk->bqgrk", exp.astype(v_bsgk.dtype), v_bsgk, preferred_element_type=jnp.float32)
    return (out / total).astype(v_bsgk.dtype)
