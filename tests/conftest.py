"""Test-session set-up: a persistent XLA compilation cache shared by the tests (and subprocesses)."""

import os
import tempfile

import jax

_CACHE = os.environ.setdefault("DISTILL_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), "distill-test-xla-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
