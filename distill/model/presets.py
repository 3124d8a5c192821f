"""Preset lookup shared by `teacher.presets` and `student.presets`."""

from __future__ import annotations

import difflib

from distill.errors import ConfigError
from distill.model.config import ModelConfig


def lookup(presets: dict[str, ModelConfig], name: str, role: str, overrides: dict) -> ModelConfig:
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=1)
        hint = f" did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{role} preset {name!r} is unknown; known presets: {', '.join(sorted(presets))}.{hint}")
    return presets[name].replace(**overrides) if overrides else presets[name]
