"""Early fusion: an image encoder, the projector to the text width, and placement at placeholders.

As in transformers' `Llama4ForConditionalGeneration`: images are encoded into feature vectors,
projected by a bias-free linear to the text `hidden_size` (`Llama4MultiModalProjector`), and
written over the `image_token_id` placeholders of the embedded token sequence, in order, before
the first decoder layer (`inputs_embeds.masked_scatter(mask, features)`); the decoder then treats
them as ordinary positions. Our encoder is smaller than Llama 4's vision tower: patches (a linear
over unfolded pixels) plus learned position embeddings, pre-norm bidirectional transformer layers
with a GELU MLP, a final norm and a linear to `vision_output_dim`; no pixel shuffle, so each patch
is one placeholder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill.model.attention import grouped_attention
from distill.model.config import ModelConfig, VisionConfig
from distill.model.layers import RMSNorm, dtype_of, param


def patches_of(images: jax.Array, patch_size: int) -> jax.Array:
    """`[..., H, W, C]` -> `[..., (H/p) * (W/p), p * p * C]`: patches in row-major order, each
    flattened as (row, column, channel)."""
    *lead, h, w, c = images.shape
    p = patch_size
    x = images.reshape(*lead, h // p, p, w // p, p, c)
    x = jnp.moveaxis(x, -4, -3)  # [..., H/p, W/p, p, p, C]
    return x.reshape(*lead, (h // p) * (w // p), p * p * c)


class EncoderLayer(nnx.Module):
    """`h = x + attn(norm(x)); out = h + mlp(norm(h))`, every patch attending to every patch."""

    def __init__(self, vision: VisionConfig, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h = vision.hidden_size, vision.num_attention_heads
        hd = d // h
        self.compute_dtype = dtype_of(cfg.dtype)
        self.attention_norm = RMSNorm(cfg, rngs, d)
        self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg)
        self.k = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg)
        self.v = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg)
        self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg)
        self.mlp_norm = RMSNorm(cfg, rngs, d)
        self.fc1 = param(rngs, (d, vision.intermediate_size), ("embed", "mlp"), cfg)
        self.fc2 = param(rngs, (vision.intermediate_size, d), ("mlp", "embed"), cfg)

    def __call__(self, x_npd: jax.Array) -> jax.Array:
        c = self.compute_dtype
        y = self.attention_norm(x_npd).astype(c)
        q, k, v = (jnp.einsum("npd,dhk->nphk", y, w[...].astype(c)) for w in (self.q, self.k, self.v))
        everywhere = jnp.ones((x_npd.shape[0], 1, x_npd.shape[1], x_npd.shape[1]), bool)
        attended = grouped_attention(q, k, v, everywhere, q.shape[-1] ** -0.5)
        h = x_npd + jnp.einsum("nphk,hkd->npd", attended, self.o[...].astype(c)).astype(x_npd.dtype)
        y = self.mlp_norm(h).astype(c)
        y = jax.nn.gelu(y @ self.fc1[...].astype(c), approximate=False) @ self.fc2[...].astype(c)
        return h + y.astype(h.dtype)


class VisionEncoder(nnx.Module):
    """Images `[..., H, W, C]` -> features `[..., tokens_per_image, vision_output_dim]`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        vision = cfg.vision
        d = vision.hidden_size
        self.vision = vision
        self.compute_dtype = dtype_of(cfg.dtype)
        self.patch_embed = param(rngs, (vision.patch_size**2 * vision.num_channels, d), (None, "embed"), cfg)
        self.position_embed = param(rngs, (vision.tokens_per_image, d), (None, "embed"), cfg)
        self.layers = nnx.List([EncoderLayer(vision, cfg, rngs) for _ in range(vision.num_hidden_layers)])
        self.final_norm = RMSNorm(cfg, rngs, d)
        self.output = param(rngs, (d, vision.vision_output_dim), ("embed", None), cfg)

    def __call__(self, images: jax.Array) -> jax.Array:
        vision, c = self.vision, self.compute_dtype
        *lead, _, _, _ = images.shape
        patches = patches_of(images.astype(c), vision.patch_size).reshape(-1, vision.tokens_per_image,
                                                                             vision.patch_size**2 * vision.num_channels)
        x = patches @ self.patch_embed[...].astype(c) + self.position_embed[...].astype(c)
        for layer in self.layers:
            x = layer(x)
        features = self.final_norm(x).astype(c) @ self.output[...].astype(c)
        return features.reshape(*lead, vision.tokens_per_image, vision.vision_output_dim)


class Projector(nnx.Module):
    """transformers' `Llama4MultiModalProjector`: a bias-free linear vision_output_dim -> hidden_size."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.compute_dtype = dtype_of(cfg.dtype)
        self.linear = param(rngs, (cfg.vision.vision_output_dim, cfg.hidden_size), (None, "embed"), cfg)

    def __call__(self, features: jax.Array) -> jax.Array:
        c = self.compute_dtype
        return features.astype(c) @ self.linear[...].astype(c)


def check_images(images: jax.Array, vision: VisionConfig) -> None:
    """Raise ValueError unless `images` is `[B, N, H, W, C]` with the configured image shape."""
    if images.ndim != 5 or tuple(images.shape[2:]) != vision.image_shape:
        raise ValueError(f"images: shape {tuple(images.shape)}, expected [batch, images per row, "
                         f"{', '.join(map(str, vision.image_shape))}] (model.vision image_size x image_size x "
                         "num_channels)")


def place_features(embeddings_bsd: jax.Array, tokens_bs: jax.Array, features_bfd: jax.Array,
                   image_token_id: int) -> jax.Array:
    """Row b's features, in order, over row b's placeholders (`tokens == image_token_id`).

    Each row must hold exactly F placeholders (`features_bfd.shape[1]`): HF's
    `masked_scatter` of the flattened features then puts the same vector at the same position.
    Per row rather than over the flattened batch, so rows sharded over devices need no exchange.
    Checked when `tokens_bs` is concrete (outside `jit`); under `jit` a count mismatch is not
    detectable and the placement is wrong (extra placeholders repeat the last feature).
    """
    is_image = tokens_bs == image_token_id
    f = features_bfd.shape[1]
    if not isinstance(tokens_bs, jax.core.Tracer):
        counts = np.sum(np.asarray(tokens_bs) == image_token_id, axis=1)
        if np.any(counts != f):
            raise ValueError(f"tokens: rows hold {[int(c) for c in counts]} image placeholders (id {image_token_id}), "
                             f"but each row's images give {f} feature vectors; put tokens_per_image placeholders "
                             "in a row for each of its images")
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, f - 1)  # the feature each placeholder takes
    placed = jnp.take_along_axis(features_bfd.astype(embeddings_bsd.dtype), slot[..., None], axis=1)
    return jnp.where(is_image[..., None], placed, embeddings_bsd)
