"""`distill sweep` owns its runs: they die with it (kill -9 included), a later sweep stops any run a
killed sweep left behind, and summary.csv gives every run's exit code and training seconds."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distill.sweep.ownership import SWEEP_PID_VAR, lock_holder, orphan_of_a_sweep, stop_orphan

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
LINUX = Path("/proc/self").exists()


def processes_of(sweep_pid: int) -> list[int]:
    """Live processes whose environment names `sweep_pid` as their sweep (zombies have none)."""
    mark = f"{SWEEP_PID_VAR}={sweep_pid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


HOLDER = """
import fcntl, os, sys, time
handle = open(sys.argv[1] + "/.lock", "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.truncate(0); handle.write(str(os.getpid())); handle.flush()
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(run_dir: Path, sweep_pid: str | None) -> subprocess.Popen:
    """A stand-in for `distill run` training in `run_dir`: holds its lock, as started by `sweep_pid`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != SWEEP_PID_VAR}
    if sweep_pid is not None:
        env[SWEEP_PID_VAR] = sweep_pid
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.skipif(not LINUX, reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_stop_orphan_kills_only_a_run_whose_sweep_is_gone(tmp_path):
    dead = subprocess.Popen(["true"])  # a sweep that is gone
    dead.wait()
    lines = []
    orphan = hold_lock(tmp_path / "a", str(dead.pid))
    owned = hold_lock(tmp_path / "b", str(os.getpid()))  # its parent is its sweep: alive
    manual = hold_lock(tmp_path / "c", None)  # a `distill run` no sweep started
    try:
        assert lock_holder(tmp_path / "a") == orphan.pid and lock_holder(tmp_path / "d") is None
        assert orphan_of_a_sweep(orphan.pid) == dead.pid
        assert orphan_of_a_sweep(owned.pid) is None and orphan_of_a_sweep(manual.pid) is None
        stop_orphan(tmp_path / "a", lines.append, grace=0.5)
        assert orphan.wait(timeout=10) == -signal.SIGKILL and lock_holder(tmp_path / "a") is None
        assert lines[0].startswith(f"orphan   a: pid {orphan.pid}, left by sweep pid {dead.pid}")
        assert "killed (SIGKILL)" in lines[1]
        stop_orphan(tmp_path / "b", lines.append, grace=0.5)
        stop_orphan(tmp_path / "c", lines.append, grace=0.5)
        assert owned.poll() is None and manual.poll() is None and len(lines) == 2
    finally:
        for holder in (orphan, owned, manual):
            holder.kill()
            holder.wait()


CHILD = """
import subprocess, sys
from distill.sweep.ownership import dies_with_parent
child = subprocess.Popen(["sleep", "600"], preexec_fn=dies_with_parent(), start_new_session=True)
print(child.pid, flush=True)
child.wait()
"""


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_killed_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert Path(f"/proc/{child}").exists()
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # minutes: a sweep, its run's compile, the kill, the resume (4 min on the shared 2-core box)
@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_kill_9_of_the_sweep_leaves_no_orphan_and_the_rerun_completes(tmp_path):
    """The run gets SIGTERM when the sweep dies, checkpoints and stops (status preempted); the rerun
    resumes it; summary.csv has exit code 0 and the training seconds of both commands."""
    sweep_file = tmp_path / "long.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "base": str(TINY), "seeds": [0],
        "overrides": {"train.steps": 60, "teacher.warmup_steps": 0, "train.eval_every": 60, "train.eval_batches": 1,
                      "train.checkpoint_every": 20, "train.log_every": 5}}))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "distill.cli", "sweep", str(sweep_file), "--dir", str(out)]
    with open(tmp_path / "first.log", "w") as log:
        sweep = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    metrics = out / "seed-0" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert sweep.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    run_pid = lock_holder(out / "seed-0")
    assert run_pid and processes_of(sweep.pid) == [run_pid]
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 120
    while time.time() < deadline and processes_of(sweep.pid):
        time.sleep(0.2)
    assert processes_of(sweep.pid) == [], "the killed sweep's run is still running"
    stopped = json.loads((out / "seed-0" / "summary.json").read_text())
    assert stopped["status"] == "preempted" and stopped["train_seconds"] > 0

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    final = json.loads((out / "seed-0" / "summary.json").read_text())
    assert final["status"] == "completed" and final["resumed_from"] > 0
    row = next(csv.DictReader((out / "summary.csv").open()))
    assert row["status"] == "completed" and row["exit_code"] == "0"
    assert float(row["train_seconds"]) == pytest.approx(final["train_seconds"], abs=0.05)
    assert final["train_seconds"] > stopped["train_seconds"]  # both commands' training, not the last one's

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and "skipped  seed-0" in again.stdout
    row = next(csv.DictReader((out / "summary.csv").open()))
    assert row["exit_code"] == "0" and float(row["train_seconds"]) == pytest.approx(final["train_seconds"], abs=0.05)
