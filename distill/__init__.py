"""distill: a knowledge-distillation workbench for Llama-4-style Mixture-of-Experts models.

    cfg = distill.load_config("experiments/quickstart.yaml", steps=200)
    summary = distill.run(cfg)
"""

from distill.model import ModelConfig, ModelOutput, Transformer, build_model


def load_config(path=None, overrides=None, **keywords):
    """See `distill.config.load_config`."""
    from distill.config import load_config as _load

    return _load(path, overrides, **keywords)


def run(cfg, *, stop_after=None, on_changed_config="refuse"):
    """Run (or resume) the experiment `cfg`; returns the summary dict (see `distill.trainer.run`)."""
    from distill.trainer import run as _run

    return _run(cfg, stop_after=stop_after, on_changed_config=on_changed_config)


__all__ = ["ModelConfig", "ModelOutput", "Transformer", "build_model", "load_config", "run"]
