"""Small building blocks: parameters with logical axis names, RMSNorm, dense SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from distill.model.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], cfg: ModelConfig,
          *, init: str = "normal") -> nnx.Param:
    """A parameter carrying logical axis names in its `out_sharding` metadata.

    Eager sharding is off: the names are metadata until `distill` places the state on a mesh, so a
    model builds anywhere, with or without a mesh.
    """
    assert len(shape) == len(axes), (shape, axes)
    dtype = dtype_of(cfg.param_dtype)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """`x * rsqrt(mean(x**2) + eps)` in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale over `width` (default: the decoder's `hidden_size`)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, width: int | None = None):
        self.eps = cfg.rms_norm_eps
        self.weight = param(rngs, (width or cfg.hidden_size,), ("norm",), cfg, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_normalize(x, self.eps) * self.weight[...].astype(x.dtype)


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """`down(silu(x @ gate) * (x @ up))` with weights already in the compute dtype."""
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down


class SwiGLU(nnx.Module):
    """Dense SwiGLU MLP: the dense layers' feed-forward and the MoE shared expert."""

    def __init__(self, cfg: ModelConfig, width: int, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.compute_dtype = dtype_of(cfg.dtype)
        self.gate = param(rngs, (d, width), ("embed", "mlp"), cfg)
        self.up = param(rngs, (d, width), ("embed", "mlp"), cfg)
        self.down = param(rngs, (width, d), ("mlp", "embed"), cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.compute_dtype
        return swiglu(x.astype(c), self.gate[...].astype(c), self.up[...].astype(c), self.down[...].astype(c))
