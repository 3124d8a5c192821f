"""Test-session set-up: a persistent XLA compilation cache shared by the tests (and subprocesses)."""

import json
import os
import tempfile

import jax
import pytest

_CACHE = os.environ.setdefault("DISTILL_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), "distill-test-xla-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture
def reliability_record():
    """`record(kind, **fields)`: one JSON line for docs/reliability.md, written only when the report
    script (experiments/reliability/report.py) names a file in DISTILL_RELIABILITY_RECORDS."""
    def record(kind: str, **fields) -> None:
        target = os.environ.get("DISTILL_RELIABILITY_RECORDS")
        if target:
            with open(target, "a") as out:
                out.write(json.dumps({"kind": kind, **fields}) + "\n")
    return record
