"""The sweep owns its runs: on Linux each run dies with the process that started it
(PR_SET_PDEATHSIG: SIGTERM, so it checkpoints and stops, even when the sweep is killed with
SIGKILL), and a later sweep stops any run a killed sweep left behind (`stop_orphan`) before it
resumes it. A run knows its sweep by SWEEP_PID_VAR in its environment."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from distill.guards import RunLock

SWEEP_PID_VAR = "DISTILL_SWEEP_PID"  # in every run's environment: the sweep that started it
ORPHAN_GRACE_S = 120.0  # how long an orphan may take to checkpoint and stop before it is killed
_PR_SET_PDEATHSIG = 1


def _libc_prctl():
    if not os.path.exists("/proc/self"):  # not Linux: no PR_SET_PDEATHSIG
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()  # loaded here: a child between fork and exec should only call it


def dies_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get SIGTERM when this process dies (kill -9 included), so
    it checkpoints and stops; None where the kernel cannot (then `stop_orphan` is the only guard)."""
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody would signal us
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def lock_holder(run_dir: Path) -> int | None:
    """The pid holding RUN_DIR/.lock (a `distill run` training there), or None when it is free."""
    return RunLock(run_dir).holder()


def _proc_field(pid: int, name: str) -> str | None:
    """/proc/PID's parent pid ("ppid") or its environment's `name`; None when unknown."""
    try:
        if name == "ppid":
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return None
    prefix = f"{name}=".encode()
    return next((e[len(prefix):].decode() for e in entries if e.startswith(prefix)), None)


def orphan_of_a_sweep(pid: int) -> int | None:
    """The pid of the sweep that started `pid`, when that sweep is gone (the process is an orphan);
    None for a process a live sweep owns, or one no sweep started (left alone)."""
    owner = _proc_field(pid, SWEEP_PID_VAR)
    if owner is None or not owner.isdigit():
        return None
    return int(owner) if _proc_field(pid, "ppid") != owner else None


def stop_orphan(run_dir: Path, echo: Callable[[str], None], grace: float = ORPHAN_GRACE_S) -> None:
    """A run that a killed sweep left training in `run_dir` (it holds the run's lock): wait up to
    `grace` seconds for it to checkpoint and stop (PR_SET_PDEATHSIG sent it SIGTERM), then kill it,
    so this sweep can resume the run. Anything else holding the lock is left alone."""
    pid = lock_holder(run_dir)
    owner = orphan_of_a_sweep(pid) if pid and pid > 0 else None
    if owner is None:
        return
    echo(f"orphan   {run_dir.name}: pid {pid}, left by sweep pid {owner}; waiting up to {grace:.0f}s for it to stop")
    deadline = time.time() + grace
    while lock_holder(run_dir) == pid and time.time() < deadline:
        time.sleep(0.2)
    if lock_holder(run_dir) == pid:
        echo(f"orphan   {run_dir.name}: pid {pid} still running; killed (SIGKILL)")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while lock_holder(run_dir) == pid:
            time.sleep(0.1)
