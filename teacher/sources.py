"""Where a teacher's weights come from: fresh, another run's latest checkpoint, or a HF directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from distill.model import ConfigError, ModelConfig, Transformer, build_model


def teacher_from_run(run_dir: str | Path, cfg: ModelConfig) -> Transformer:
    """The teacher of another run, from its latest checkpoint (its config must match `cfg`'s shapes)."""
    run_dir = Path(run_dir)
    ckpt_dir = (run_dir / "checkpoints").absolute()
    if not (run_dir / "config.yaml").is_file() or not ckpt_dir.is_dir():
        raise ConfigError(f"teacher.path={str(run_dir)!r}: not a run directory (needs config.yaml and checkpoints/)")
    with ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step()
        if step is None:
            raise ConfigError(f"teacher.path={str(run_dir)!r}: the run has no checkpoint yet")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    params = restored.state["teacher"]["params"]
    model = build_model(cfg)
    state = nnx.state(model, nnx.Param)
    try:
        nnx.replace_by_pure_dict(state, _strip_value_keys(params))
    except (KeyError, ValueError) as error:
        raise ConfigError(f"teacher.path={str(run_dir)!r}: its teacher does not match teacher.model ({error}); "
                          "use the same preset and model fields as that run") from None
    nnx.update(model, state)
    return model


def _strip_value_keys(tree):
    """orbax restores nnx.State leaves as {'value': array}; pure dicts have the arrays themselves."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return np.asarray(tree["value"])
        return {k: _strip_value_keys(v) for k, v in tree.items()}
    return tree


def teacher_model_config(source: str, path: str | None, preset: str | None, overrides: dict) -> ModelConfig:
    """The teacher's `ModelConfig`: the preset (scratch), the other run's teacher (run) or the HF
    config (hf), with `overrides` (e.g. `dtype: bfloat16` for a frozen teacher) applied last."""
    from distill.configtools import from_dict
    from distill.model.presets import lookup
    from teacher.presets import TEACHER_PRESETS

    if source == "scratch":
        base = lookup(TEACHER_PRESETS, preset, "teacher", {}).to_dict() if preset else {}
    elif source == "run":
        config_file = Path(path) / "config.yaml"
        if not config_file.is_file():
            raise ConfigError(f"teacher.path={path!r}: no config.yaml; expected a distill run directory")
        from distill.config import build_config

        base = build_config(yaml.safe_load(config_file.read_text())).teacher_model().to_dict()
    else:
        import json

        from distill.hf import config_from_hf

        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"teacher.path={path!r}: no config.json; expected a Hugging Face save_pretrained directory")
        base = config_from_hf(json.loads(config_file.read_text())).to_dict()
    return from_dict(ModelConfig, {**base, **overrides}, "teacher.model")


def load_teacher(source: str, path: str | None, cfg: ModelConfig, seed: int) -> Transformer:
    """The teacher model with its weights: fresh (seeded), from a run, or from a HF directory."""
    if source == "scratch":
        return build_model(cfg, seed=seed)
    if source == "run":
        return teacher_from_run(path, cfg)
    from distill.hf import from_hf

    overrides = {k: v for k, v in cfg.to_dict().items() if k in ("dtype", "param_dtype", "dispatch", "scan_layers",
                                                                  "remat", "capacity_factor", "dispatch_tile")}
    return from_hf(path, **overrides)
