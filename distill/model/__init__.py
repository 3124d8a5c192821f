"""The Flax NNX Llama-4-style MoE decoder shared by teacher and student."""

from distill.model.config import ModelConfig, RopeScaling
from distill.model.transformer import ModelOutput, Transformer, build_model

__all__ = ["ModelConfig", "ModelOutput", "RopeScaling", "Transformer", "build_model"]
