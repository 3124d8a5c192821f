"""distill: a knowledge-distillation workbench for Llama-4-style Mixture-of-Experts models.

    cfg = distill.load_config("experiments/quickstart.yaml", steps=200)
    exp = distill.resolve(cfg)      # every model's architecture, what each student inherits
    summary = distill.run(cfg)
"""

from distill import config
from distill.experiment import Experiment, resolve
from distill.model import ModelConfig, ModelOutput, Transformer, build_model
from distill.trainer import run


def load_config(path=None, overrides=None, **keywords) -> config.Config:
    """A run config from a YAML file (or the defaults) with overrides (see `distill.config.load_config`),
    checked against what it points at and its models against each other (`resolve`)."""
    cfg = config.load_config(path, overrides, **keywords)
    resolve(cfg)
    return cfg


__all__ = ["Experiment", "ModelConfig", "ModelOutput", "Transformer", "build_model", "load_config", "resolve", "run"]
