"""Named student architectures, each a smaller MoE of the same family as its teacher."""

from __future__ import annotations

from distill.model import ModelConfig
from distill.model.presets import lookup

STUDENT_PRESETS: dict[str, ModelConfig] = {
    # Half the width of cpu-teacher, same byte vocabulary and layer plan.
    "cpu-student": ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=128, intermediate_size_mlp=256,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                               num_local_experts=4, num_experts_per_tok=1, attention_chunk_size=128,
                               floor_scale=64, max_position_embeddings=4096),
    # Fewer layers and experts still: the smallest sensible MoE student.
    "cpu-student-tiny": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    num_local_experts=4, num_experts_per_tok=1, attention_chunk_size=128,
                                    no_rope_layer_interval=2, floor_scale=64, max_position_embeddings=4096),
}


def student_preset(name: str, **overrides) -> ModelConfig:
    """A student preset by name, with field overrides (errors list the known names)."""
    return lookup(STUDENT_PRESETS, name, "student", overrides)
