"""Sampling continuations with a KV cache: one prefill of the prompt, then one token per step.

Jit-friendly: the prompt length and the total length are static, the decode loop is a `lax.scan`.
The cached logits equal the full forward's (tests/model/test_generate.py), so greedy decoding
matches transformers' `generate` (tests/hf/test_generate_parity.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill.model.transformer import Transformer


def next_token(logits_bv: jax.Array, key: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
    """One token per row from `logits / temperature`, among the `top_k` most probable when set;
    `temperature` 0 takes the argmax."""
    if temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model: Transformer, prompt_bp: jax.Array, length: int, key: jax.Array, *,
             temperature: float = 1.0, top_k: int | None = None) -> jax.Array:
    """`[B, length]` int32: each row's prompt followed by `length - P` sampled tokens.

    Every row has the same prompt length P (left-aligned, no padding); `key` drives the sampling
    (one split per generated token).
    """
    b, p = prompt_bp.shape
    if not 0 < p < length:
        raise ValueError(f"generate: the prompt ({p} tokens) must be non-empty and shorter than length ({length})")
    out = model(prompt_bp, cache=model.init_cache(b, length))
    keys = jax.random.split(key, length - p)
    first = next_token(out.logits[:, -1], keys[0], temperature, top_k)

    def step(carry, step_key):
        token, cache = carry
        out = model(token[:, None], cache=cache)
        return (next_token(out.logits[:, -1], step_key, temperature, top_k), out.cache), token

    (last, _), generated = jax.lax.scan(step, (first, out.cache), keys[1:])
    return jnp.concatenate([prompt_bp.astype(jnp.int32), generated.T, last[:, None]], axis=1)
