import numpy as np
import pytest
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from distill import hf
from distill.model import ModelConfig, RopeScaling
from distill.model.rope import inverse_frequencies
from teacher import teacher_preset


@pytest.mark.parametrize("cfg", [
    ModelConfig(head_dim=64, rope_theta=10000.0),
    ModelConfig(head_dim=64, rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                      original_max_position_embeddings=64)),
    teacher_preset("llama4-scout"),  # low_freq_factor == high_freq_factor
], ids=["default", "llama3", "scout"])
def test_inverse_frequencies_match_transformers(cfg):
    hf_config = hf.config_to_hf(cfg)
    rope_type = hf_config.rope_parameters["rope_type"]
    if rope_type == "default":
        expected = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    else:
        expected = ROPE_INIT_FUNCTIONS[rope_type](hf_config)[0].numpy()
    np.testing.assert_allclose(inverse_frequencies(cfg), expected, rtol=1e-6)
