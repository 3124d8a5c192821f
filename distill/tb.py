"""`distill tb DIR`: TensorBoard for a run, a sweep or a folder of runs, on 127.0.0.1 only.

Every run directory is a TensorBoard run (its event files sit in it, no timestamped sub-runs),
so the runs of a sweep overlay tag by tag, and the HParams tab lists each run's config with its
final metrics.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from distill.errors import ConfigError
from distill.localhost import HOST, free_port


def start(logdir: str | Path, port: int | None = None, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start TensorBoard on `logdir`, bound to 127.0.0.1; returns (process, URL) once it answers."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise ConfigError(f"{logdir}: not a directory; give a run directory, a sweep directory or runs/")
    port = port or free_port()
    process = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", HOST,
                                "--port", str(port), "--reload_interval", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://{HOST}:{port}/"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"tensorboard exited ({process.returncode}): {process.stderr.read()[-1000:]}")
        try:
            urllib.request.urlopen(url + "data/runs", timeout=2).read()
            return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise ConfigError(f"tensorboard did not answer on {url} within {timeout:.0f} s")


def serve(logdir: str | Path, port: int | None = None) -> int:
    """Start TensorBoard, print its URL, and keep it up until Ctrl-C."""
    process, url = start(logdir, port)
    print(f"TensorBoard for {logdir}: {url}  (Ctrl-C stops it)", flush=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        return 0
