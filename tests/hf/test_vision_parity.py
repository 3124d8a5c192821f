"""Early fusion against transformers' `Llama4ForConditionalGeneration`: given the same vision features,
our projector, placement at the image placeholders and text decoder give HF's logits.

HF's vision tower is bypassed on both sides (it is Llama 4's, ours is smaller): the same features go
into HF's own modules after the tower (`Llama4MultiModalProjector`, `get_placeholder_mask` +
`masked_scatter` into `inputs_embeds`, the language model) and into ours through a stand-in for
`model.vision`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_parity import BASE, CASES, assert_logits_match
from transformers import Llama4Config, Llama4ForConditionalGeneration

from distill import hf
from distill.model.config import VisionConfig

IMAGE_TOKEN = 5
VISION = VisionConfig(image_size=4, patch_size=2, num_channels=1, hidden_size=16, intermediate_size=16,
                      num_hidden_layers=1, num_attention_heads=2, vision_output_dim=24, image_token_id=IMAGE_TOKEN)
IMAGES_PER_ROW = 2


def torch_reference(seed: int = 0) -> Llama4ForConditionalGeneration:
    torch.manual_seed(seed)
    text = {k: v for k, v in {**BASE, **CASES["step1_qknorm_gqa_tuning"]}.items() if k != "attn_implementation"}
    config = Llama4Config(text_config=text, image_token_index=IMAGE_TOKEN,
                          vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=16, vision_output_dim=VISION.vision_output_dim,
                                             image_size=16, patch_size=8, projector_input_dim=16,
                                             projector_output_dim=16))
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    model = Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 and experts from N(0, 0.02); perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(batch: int = 3, seq: int = 40, seed: int = 1):
    """Tokens with IMAGES_PER_ROW * tokens_per_image placeholders per row, and their features."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(IMAGE_TOKEN + 1, BASE["vocab_size"], size=(batch, seq))
    count = IMAGES_PER_ROW * VISION.tokens_per_image
    for b in range(batch):
        tokens[b, np.sort(rng.choice(seq, count, replace=False))] = IMAGE_TOKEN
    features = rng.normal(size=(batch, IMAGES_PER_ROW, VISION.tokens_per_image, VISION.vision_output_dim))
    return tokens, features.astype(np.float32)


def hf_fused_logits(reference, tokens: np.ndarray, features: np.ndarray) -> np.ndarray:
    """The body of `Llama4ForConditionalGeneration.forward` after the vision tower, with HF's own modules.

    Called piecewise because this transformers release's `forward` ends by reading
    `image_outputs` from its language model's output, which has no such field (AttributeError).
    """
    with torch.no_grad():
        ids = torch.from_numpy(tokens).long()
        embeds = reference.get_input_embeddings()(ids)
        projected = reference.multi_modal_projector(torch.from_numpy(features.reshape(-1, features.shape[-1])))
        mask = reference.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=projected)
        embeds = embeds.masked_scatter(mask, projected)
        return reference.language_model(inputs_embeds=embeds).logits.float().numpy()


def test_projector_and_placement_match_transformers():
    reference = torch_reference()
    tokens, features = inputs()
    ours = hf.from_hf(reference, vision=VISION)
    ours.projector.linear[...] = reference.multi_modal_projector.linear_1.weight.detach().numpy().T
    ours.vision = lambda images: features  # the features stand in for the encoder's output
    images = np.zeros((*features.shape[:2], *VISION.image_shape), np.float32)
    assert_logits_match(np.asarray(ours(tokens, images=images).logits), hf_fused_logits(reference, tokens, features))


def test_without_images_both_read_placeholders_as_tokens():
    reference = torch_reference()
    tokens, _ = inputs()
    ours = hf.from_hf(reference, vision=VISION)
    with torch.no_grad():
        theirs = reference.language_model(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()
    assert_logits_match(np.asarray(ours(tokens).logits), theirs)


def test_export_refuses_a_vision_model():
    cfg = hf.config_from_hf(torch_reference().config, vision=VISION)
    with pytest.raises(hf.HFConversionError, match="vision: our image encoder is not Llama 4's vision tower"):
        hf.config_to_hf(cfg)
