"""Where a teacher's weights come from: fresh, another run's latest checkpoint, or a HF directory
(or none: an offline logit cache, teacher/cache.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from distill.errors import ConfigError
from distill.model import ModelConfig, Transformer, build_model


def teacher_from_run(run_dir: str | Path, cfg: ModelConfig) -> Transformer:
    """The teacher of another run, from its latest checkpoint, on the default device (the
    trainer reads it into its shardings instead, unless a student copies it)."""
    import jax
    from flax import nnx

    from distill.runs import restore_teacher_params

    graph, shapes = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)
    return nnx.merge(graph, restore_teacher_params(run_dir, target))


def teacher_model_config(source: str, path: str | None, preset: str | None, overrides: dict) -> ModelConfig:
    """The teacher's `ModelConfig`: the preset (scratch), the other run's teacher (run) or the HF
    config (hf) or the cached teacher's (cache), with `overrides` (e.g. `dtype: bfloat16` for a frozen teacher) applied last."""
    from distill.configtools import from_dict
    from distill.model.presets import lookup
    from teacher.presets import TEACHER_PRESETS

    if source == "scratch":
        base = lookup(TEACHER_PRESETS, preset, "teacher", {}).to_dict() if preset else {}
    elif source == "run":
        config_file = Path(path) / "config.yaml"
        if not config_file.is_file():
            raise ConfigError(f"teacher.path={path!r}: no config.yaml; expected a distill run directory")
        from distill.config import TeacherConfig

        raw = yaml.safe_load(config_file.read_text()) or {}
        if "teacher" not in raw:
            raise ConfigError(f"teacher.path={path!r}: its config.yaml has no teacher section")
        other = from_dict(TeacherConfig, raw["teacher"], f"{path}: teacher")
        base = teacher_model_config(other.source, other.path, other.preset, other.model).to_dict()
    elif source == "cache":
        from teacher.cache import read_meta

        base = read_meta(path)["teacher_model"]
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
