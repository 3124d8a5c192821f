"""A real multi-process JAX job on this machine: `distill launch` starts 2 processes x 4 simulated
CPU devices on 127.0.0.1 that join one job through JAX's runtime (gloo collectives), with the mesh
over all 8 devices. Only process 0 writes the run's logs, each step once; the losses are those of
one process with 8 devices and of one device; a killed job resumes bit-identically, also as one
process of 8 devices."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.checkpoint import committed_steps
from distill.run_logger import read_metrics_jsonl

CONFIG = Path(__file__).parents[1] / "configs" / "sharded.yaml"
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"]


def launched(run_dir: Path, *overrides: str, processes: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", "launch", "--processes", str(processes),
                           "--devices-per-process", str(8 // processes), "--log-dir", str(run_dir.parent / "logs"),
                           "--", "distill", "run", str(CONFIG), f"run.dir={run_dir}", *MESH, *overrides],
                          check=False, capture_output=True, text=True, timeout=1200)


def one_process(run_dir: Path, devices: int, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    mesh = MESH if devices == 8 else []
    return subprocess.run([sys.executable, "-m", "distill.cli", "run", str(CONFIG), f"run.dir={run_dir}", *mesh,
                           *overrides], check=False, capture_output=True, text=True, timeout=1200, env=env)


def losses(run_dir: Path) -> dict[tuple[int, str], float]:
    return {(row["step"], key): value for row in read_metrics_jsonl(run_dir) for key, value in row.items()
            if isinstance(value, float) and not key.startswith("perf/")}


@pytest.mark.slow  # 2 processes compiling 3 programs each: 6-9 min on 2 loaded cores
def test_a_two_process_job_runs_and_only_process_0_writes(tmp_path):
    result = launched(tmp_path / "run", "train.steps=6")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics_jsonl(tmp_path / "run")
    assert [row["step"] for row in rows if "teacher/ce" in row] == [1, 2, 3, 4, 5, 6]  # each step once
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and all(v is not None for v in summary["bpb"].values())
    assert (tmp_path / "logs" / "process-1.log").is_file()
    assert "model" in result.stdout and "model" not in (tmp_path / "logs" / "process-1.log").read_text()


@pytest.mark.slow
def test_two_processes_log_the_losses_of_one_process_and_of_one_device(tmp_path):
    """20 co-distillation steps (4 teacher-only): every logged float within 1e-4 relative."""
    assert launched(tmp_path / "two").returncode == 0
    assert one_process(tmp_path / "eight", 8).returncode == 0
    assert one_process(tmp_path / "one", 1).returncode == 0
    two = losses(tmp_path / "two")
    for other in (losses(tmp_path / "eight"), losses(tmp_path / "one")):
        assert set(other) == set(two)
        worst = max(abs(two[k] - other[k]) / max(abs(other[k]), 1e-6) for k in two)
        assert worst < 1e-4, worst


def started(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distill.cli", "launch", "--processes", "2", "--devices-per-process",
                             "4", "--log-dir", str(run_dir.parent / "logs"), "--", "distill", "run", str(CONFIG),
                             f"run.dir={run_dir}", *MESH, *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def job_processes(launcher: subprocess.Popen) -> list[int]:
    """The pids of the launcher's `distill run` processes, process 0 first."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def kill_after(launcher: subprocess.Popen, run_dir: Path, step: int, victims: list[int]) -> float:
    """SIGKILL the job's processes `victims` once `step` is logged; returns when it was done."""
    deadline = time.time() + 1200
    while not any(row.get("step", 0) >= step for row in read_metrics_jsonl(run_dir)
                  if (run_dir / "metrics.jsonl").exists()):
        assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()[-3000:]
        time.sleep(0.5)
    pids = job_processes(launcher)
    for victim in victims:
        os.kill(pids[victim], signal.SIGKILL)
    return time.time()


def final(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_a_killed_job_resumes_bit_identically_also_as_one_process(tmp_path):
    """Both processes killed after the step-10 checkpoint: the same two commands resume to the
    uninterrupted job's losses, bit for bit; the killed directory also resumes as 1 process x 8."""
    overrides = ("train.checkpoint_every=5",)
    assert launched(tmp_path / "whole", *overrides).returncode == 0
    launcher = started(tmp_path / "split", *overrides)
    kill_after(launcher, tmp_path / "split", 12, [0, 1])
    launcher.wait(timeout=120)
    shutil.copytree(tmp_path / "split", tmp_path / "other")
    again = launched(tmp_path / "split", *overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert final(tmp_path / "split")["resumed_from"] >= 10
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert final(tmp_path / "split")["final"] == final(tmp_path / "whole")["final"]
    resumed = one_process(tmp_path / "other", 8, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key, value in final(tmp_path / "whole")["final"].items():
        assert final(tmp_path / "other")["final"][key] == pytest.approx(value, rel=1e-4), key


@pytest.mark.slow
def test_when_one_process_dies_the_other_says_so_and_the_rerun_resumes(tmp_path, reliability_record):
    run_dir = tmp_path / "run"
    launcher = started(run_dir, "train.checkpoint_every=5", "train.steps=40")
    killed = kill_after(launcher, run_dir, 12, [1])
    output = launcher.communicate(timeout=300)[0]
    waited = time.time() - killed
    assert "another process of this job stopped" in output and "start the same 2 processes again" in output, output[-3000:]
    assert "process 0 exited 5" in output and "process 1 was killed by SIGKILL" in output
    kept = committed_steps(run_dir / "checkpoints")
    assert kept and kept[-1] >= 10
    again = launched(run_dir, "train.checkpoint_every=5", "train.steps=40")
    assert again.returncode == 0, again.stderr[-3000:]
    assert final(run_dir)["resumed_from"] == kept[-1] and final(run_dir)["status"] == "completed"
    reliability_record("fault", fault="one process of a 2-process job killed",
                       injection="SIGKILL of process 1 once step 12 is logged (checkpoint every 5 steps)", trials=1,
                       outcome=f"process 0 exited 5 within {waited:.0f} s naming the lost process and checkpoint "
                       f"{kept[-1]}; the rerun resumed from {kept[-1]} and completed")
