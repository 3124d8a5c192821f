"""Named teacher architectures: the released Llama 4 text models and CPU-sized teachers."""

from __future__ import annotations

from distill.model import ModelConfig, RopeScaling
from distill.model.presets import lookup

_LLAMA4_COMMON = dict(
    vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
    num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=10485760, num_experts_per_tok=1, attention_chunk_size=8192,
    attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1, rope_theta=500000.0,
)  # fmt: skip

TEACHER_PRESETS: dict[str, ModelConfig] = {
    # Llama 4 Scout (17B active, 16 experts, ~109B total): every layer MoE, QK norm, llama3 RoPE scaling.
    "llama4-scout": ModelConfig(**_LLAMA4_COMMON, num_local_experts=16, interleave_moe_layer_step=1,
                                use_qk_norm=True,
                                rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                                         original_max_position_embeddings=8192)),
    # Llama 4 Maverick (17B active, 128 experts, ~400B total): MoE every other layer, no QK norm.
    "llama4-maverick": ModelConfig(**_LLAMA4_COMMON, num_local_experts=128, interleave_moe_layer_step=2,
                                   use_qk_norm=False),
    # A teacher that co-trains on a laptop CPU in minutes (byte vocabulary).
    "cpu-teacher": ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=256, intermediate_size_mlp=512,
                               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                               num_local_experts=8, num_experts_per_tok=1, attention_chunk_size=128,
                               floor_scale=64, max_position_embeddings=4096),
}


def teacher_preset(name: str, **overrides) -> ModelConfig:
    """A teacher preset by name, with field overrides (errors list the known names)."""
    return lookup(TEACHER_PRESETS, name, "teacher", overrides)
