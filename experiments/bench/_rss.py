"""This process's memory from /proc, and the checkout's path for measuring subprocesses (no jax
import: the memory benchmarks' drivers stay light)."""

import os

GIB = 2**30


def process_memory(field: str) -> int:
    """Bytes of `field` of /proc/self/status: VmRSS (now), VmHWM (the peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def repo_pythonpath() -> str:
    """PYTHONPATH for a measuring subprocess: this checkout first."""
    return os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])
