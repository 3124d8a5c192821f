"""Rotary position embedding as Llama 4 applies it: on ADJACENT pairs (x[2i], x[2i+1])."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from distill.model.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """`1 / theta**(arange(0, d, 2) / d)`, with Llama 3.1 scaling when `cfg.rope_scaling` is set.

    Computed in float32 exactly as transformers' `_compute_llama3_parameters` does.
    """
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv_freq = inv_freq.astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    if scaling.high_freq_factor == scaling.low_freq_factor:  # Llama 4 Scout: no medium band to smooth
        return scaled.astype(np.float32)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotary_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin of `positions[..., None] * inv_freq`, float32, shape `[B, S, head_dim // 2]`."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x_bshd: jax.Array, cos_bsf: jax.Array, sin_bsf: jax.Array) -> jax.Array:
    """Rotate adjacent pairs of the last dim, as complex numbers x[0::2] + i x[1::2]; float32 inside."""
    x = x_bshd.astype(jnp.float32).reshape(*x_bshd.shape[:-1], -1, 2)
    real, imag = x[..., 0], x[..., 1]
    cos, sin = cos_bsf[:, :, None, :], sin_bsf[:, :, None, :]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x_bshd.shape).astype(x_bshd.dtype)
