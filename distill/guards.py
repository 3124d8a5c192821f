"""What keeps a run's directory safe: one process per run directory, and a clean stop on
SIGTERM / SIGINT (preemption, Ctrl-C) with a checkpoint at the step reached."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from pathlib import Path

from distill.errors import ConfigError

EXIT_CODES = {"completed": 0, "stopped": 0, "failed": 1, "nonfinite": 3, "save_failed": 4, "process_lost": 5,
              "interrupted": 130, "preempted": 143}


class RunLock:
    """An exclusive `flock` on RUN_DIR/.lock for the life of the run. The kernel drops it when the
    process dies (kill -9 included), so a stale lock never blocks a resume."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._file = None

    def acquire(self) -> None:
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _pid_in(handle)
            handle.close()
            raise ConfigError(f"run.dir={str(self.path.parent)!r} is in use by another distill process "
                              f"(pid {holder if holder > 0 else 'unknown'}); wait for it to finish, or choose "
                              "another run.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def holder(self) -> int | None:
        """The pid holding the lock (-1 when its file does not say), or None when it is free."""
        try:
            with open(self.path) as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return _pid_in(handle)
                fcntl.flock(handle, fcntl.LOCK_UN)
        except OSError:
            pass
        return None

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _pid_in(handle) -> int:
    """The pid a lock file holds (its holder wrote it), or -1."""
    handle.seek(0)
    text = handle.read().strip()
    return int(text) if text.isdigit() else -1


class StopSignals:
    """Turns the first SIGTERM / SIGINT into a request to stop after the current step (the loop
    checkpoints and exits); a second one acts as usual (Ctrl-C twice still interrupts at once).
    Only the main thread can install handlers: elsewhere this does nothing."""

    SIGNALS = {signal.SIGTERM: "preempted", signal.SIGINT: "interrupted"}

    def __init__(self):
        self.status: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.status is not None:  # the second signal: the usual behaviour
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.status = self.SIGNALS[signum]

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
