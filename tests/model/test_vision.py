"""Early fusion: the vision encoder, the projector and the placement of image features at placeholders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill.configtools import from_dict
from distill.errors import ConfigError
from distill.model import ModelConfig, build_model
from distill.model.config import VisionConfig
from distill.model.vision import patches_of, place_features

VISION = VisionConfig(image_size=4, patch_size=2, num_channels=2, hidden_size=16, intermediate_size=24,
                      num_hidden_layers=2, num_attention_heads=2, vision_output_dim=12, image_token_id=7)
TEXT = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=16, intermediate_size_mlp=32, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, attention_chunk_size=8)
CFG = TEXT.replace(vision=VISION)
T = VISION.tokens_per_image  # 4


def rows_with_images(batch=2, images=2, seq=14, seed=0):
    """Tokens with `images * T` placeholders per row at scattered places, and random images."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(8, CFG.vocab_size, (batch, seq))
    for b in range(batch):
        tokens[b, np.sort(rng.choice(seq, images * T, replace=False))] = VISION.image_token_id
    pixels = rng.random((batch, images, *VISION.image_shape)).astype(np.float32)
    return tokens, pixels


def test_placement_puts_feature_j_at_the_jth_placeholder_and_leaves_the_rest():
    tokens = np.array([[1, 7, 2, 7, 7, 3], [7, 7, 7, 4, 5, 6]])
    embeddings = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
    features = -np.arange(1, 2 * 3 * 3 + 1, dtype=np.float32).reshape(2, 3, 3)
    out = np.asarray(place_features(jnp.asarray(embeddings), jnp.asarray(tokens), jnp.asarray(features), 7))
    for b in range(2):
        slots = np.flatnonzero(tokens[b] == 7)
        for j, position in enumerate(slots):
            np.testing.assert_array_equal(out[b, position], features[b, j])
        others = tokens[b] != 7
        np.testing.assert_array_equal(out[b, others], embeddings[b, others])


def test_placement_matches_masked_scatter():
    """torch's masked_scatter (what transformers does) over the batch, when each row holds its own count."""
    import torch

    tokens, _ = rows_with_images(batch=3, images=2)
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(3, tokens.shape[1], 5)).astype(np.float32)
    features = rng.normal(size=(3, 2 * T, 5)).astype(np.float32)
    mask = torch.from_numpy(tokens == VISION.image_token_id)[..., None].expand(-1, -1, 5)
    theirs = torch.from_numpy(embeddings).masked_scatter(mask, torch.from_numpy(features.reshape(-1, 5))).numpy()
    ours = place_features(jnp.asarray(embeddings), jnp.asarray(tokens), jnp.asarray(features), VISION.image_token_id)
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_patches_are_row_major_and_flattened_row_column_channel():
    image = np.arange(4 * 4 * 2).reshape(4, 4, 2)
    patches = np.asarray(patches_of(jnp.asarray(image), 2))
    assert patches.shape == (4, 8)
    np.testing.assert_array_equal(patches[1], image[0:2, 2:4].reshape(-1))  # top right
    np.testing.assert_array_equal(patches[2], image[2:4, 0:2].reshape(-1))  # bottom left


def test_text_only_config_and_text_parameters_unchanged():
    text, fused = build_model(TEXT), build_model(CFG)
    text_params = nnx.to_pure_dict(nnx.state(text, nnx.Param))
    fused_params = nnx.to_pure_dict(nnx.state(fused, nnx.Param))
    assert set(fused_params) - set(text_params) == {"vision", "projector"}
    for a, b in zip(jax.tree.leaves(text_params), jax.tree.leaves({k: fused_params[k] for k in text_params})):
        np.testing.assert_array_equal(a, b)
    tokens, _ = rows_with_images()
    # Without images the placeholders are ordinary tokens: the same logits as the text-only model.
    np.testing.assert_array_equal(np.asarray(fused(tokens).logits), np.asarray(text(tokens).logits))


def test_images_change_only_positions_from_the_first_placeholder_on():
    tokens, pixels = rows_with_images()
    model = build_model(CFG)
    plain, fused = np.asarray(model(tokens).logits), np.asarray(model(tokens, images=pixels).logits)
    for b in range(tokens.shape[0]):
        first = np.flatnonzero(tokens[b] == VISION.image_token_id)[0]
        np.testing.assert_array_equal(fused[b, :first], plain[b, :first])  # causal: before the image, no change
        assert np.abs(fused[b, first:] - plain[b, first:]).max() > 1e-4


def test_encoder_is_bidirectional():
    """Changing the last patch changes the features of the first one (a causal encoder could not)."""
    model = build_model(CFG)
    _, pixels = rows_with_images(batch=1, images=1)
    changed = pixels.copy()
    changed[..., 2:, 2:, :] += 1.0  # the last patch only
    before, after = np.asarray(model.vision(pixels)), np.asarray(model.vision(changed))
    assert before.shape == (1, 1, T, VISION.vision_output_dim)
    assert np.abs(after[0, 0, 0] - before[0, 0, 0]).max() > 1e-5


def test_gradients_reach_the_vision_parameters_under_jit():
    tokens, pixels = rows_with_images()
    model = build_model(CFG)

    @nnx.jit
    def loss_and_grads(model):
        def loss(model):
            logits = model(tokens, images=pixels).logits
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])
        return nnx.value_and_grad(loss)(model)

    value, grads = loss_and_grads(model)
    assert np.isfinite(float(value))
    for part in ("vision", "projector"):
        leaves = jax.tree.leaves(nnx.to_pure_dict(grads[part]))
        assert leaves and all(np.abs(np.asarray(g)).max() > 0 for g in leaves), part
    eager = np.asarray(model(tokens, images=pixels).logits)
    jitted = np.asarray(nnx.jit(lambda m: m(tokens, images=pixels).logits)(model))
    np.testing.assert_allclose(jitted, eager, atol=1e-5)


def test_wrong_image_shape_and_placeholder_count_are_clear_errors():
    model = build_model(CFG)
    tokens, pixels = rows_with_images()
    with pytest.raises(ValueError, match=r"images: shape .* expected \[batch, images per row, 4, 4, 2\]"):
        model(tokens, images=pixels[..., :1])
    with pytest.raises(ValueError, match="rows hold \\[8, 8\\] image placeholders .* give 4 feature vectors"):
        model(tokens, images=pixels[:, :1])
    with pytest.raises(ValueError, match="images: this model has no vision encoder"):
        build_model(TEXT)(tokens, images=pixels)


@pytest.mark.parametrize("fields, message", [
    ({"patch_size": 3}, "vision.patch_size=3: must divide vision.image_size"),
    ({"num_attention_heads": 5}, "vision.num_attention_heads=5: must divide vision.hidden_size"),
    ({"hidden_size": 0}, "vision.hidden_size=0: must be a positive integer"),
    ({"image_token_id": 40}, r"vision.image_token_id=40: must be below vocab_size \(32\)"),
])
def test_bad_vision_config(fields, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, {**TEXT.to_dict(), "vision": {**CFG.to_dict()["vision"], **fields}}, "model")


def test_vision_config_round_trips_through_dicts_and_counts_its_parameters():
    again = from_dict(ModelConfig, CFG.to_dict(), "model")
    assert again == CFG and isinstance(again.vision, VisionConfig)
    model = build_model(CFG)
    actual = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert CFG.param_counts()["total"] == actual

