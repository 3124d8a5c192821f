"""distill: a knowledge-distillation workbench for Llama-4-style Mixture-of-Experts models."""

from distill.model import ModelConfig, ModelOutput, Transformer, build_model

__all__ = ["ModelConfig", "ModelOutput", "Transformer", "build_model"]
