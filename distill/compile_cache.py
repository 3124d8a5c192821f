"""The persistent XLA compilation cache of `distill run`, `distill eval` and `distill cache`: a
second run of a config (or a resumed one, or another run of a sweep with the same shapes) loads
its compiled steps instead of compiling them again.

Where it lives, first match wins: `run.compilation_cache` (a directory, or `off`), the
environment variable `DISTILL_COMPILATION_CACHE` (the same), else `$XDG_CACHE_HOME/distill/xla`
(`~/.cache/distill/xla`). Compiled executables are code: keep the folder your own (JAX's warning).
Loading an executable instead of compiling it changes no result (resume stays bit-identical).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

ENVIRONMENT = "DISTILL_COMPILATION_CACHE"
OFF = "off"


def cache_dir(setting: str | None, environ=os.environ) -> Path | None:
    """The cache folder for `run.compilation_cache` = `setting` (None: not set), or None when off."""
    chosen = setting if setting is not None else environ.get(ENVIRONMENT)
    if chosen is not None:
        return None if chosen.strip().lower() == OFF else Path(chosen).expanduser()
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distill" / "xla"


def use_compilation_cache(setting: str | None) -> Path | None:
    """Point JAX's persistent compilation cache at `cache_dir(setting)` (every compile is kept,
    however short), or turn it off; returns the folder in use."""
    folder = cache_dir(setting)
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if jax.config.jax_compilation_cache_dir != str(folder):
        folder.mkdir(parents=True, exist_ok=True)
        compilation_cache.set_cache_dir(str(folder))
        compilation_cache.reset_cache()  # the next compile opens the new folder
    return folder
