"""Test-session set-up: a persistent XLA compilation cache shared by the tests (and subprocesses)."""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import jax
import pytest

_CACHE = os.environ.setdefault("DISTILL_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), "distill-test-xla-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("DISTILL_COMPILATION_CACHE", _CACHE)  # distill run in the tests: the same cache
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


def _digests(folder, ignore=()) -> dict[str, str]:
    """Every path under `folder` (relative) with a digest of its bytes, its link target, or "dir";
    names in `ignore` are left out (e.g. the run lock, whose pid changes)."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.name in ignore:
            continue
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = f"link:{os.readlink(path)}"
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[key] = "dir"
    return found


@pytest.fixture
def digests():
    """`digests(folder, ignore=())`: a byte-level snapshot of a folder, to prove nothing changed."""
    return _digests
