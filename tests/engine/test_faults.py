"""Faults a run survives: SIGTERM mid-run, a corrupted latest checkpoint, NaN gradients (skip or
stop), and a second process on the same run directory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import distill
from distill.logging import read_metrics_jsonl
from distill.runs import checkpoint_tree

TINY = Path(__file__).with_name("tiny.yaml")
CLI = [sys.executable, "-m", "distill.cli", "run", str(TINY)]


def tiny(run_dir: Path, *overrides: str):
    return distill.load_config(TINY, [f"run.dir={run_dir}", *overrides])


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def logged_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics_jsonl(run_dir) if "teacher/ce" in row]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults") / "whole"
    distill.run(tiny(run_dir))
    return run_dir


LONG = ["train.steps=400", "train.log_every=10", "train.eval_every=400", "train.checkpoint_every=200"]


def test_sigterm_checkpoints_the_step_reached_and_the_run_resumes_to_the_same_end(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(CLI + [f"run.dir={run_dir}", *LONG], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 300
    while not logged_steps(run_dir):  # the first log line: compiled and stepping
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted" and "checkpoint saved" in stderr
    stopped_at, _ = checkpoint_tree(run_dir)
    assert 10 <= stopped_at < 400
    distill.run(tiny(run_dir, *LONG))
    assert logged_steps(run_dir) == list(range(10, 401, 10))  # nothing twice, nothing missing
    distill.run(tiny(tmp_path / "whole", *LONG))
    for a, b in zip(leaves(checkpoint_tree(run_dir)[1]), leaves(checkpoint_tree(tmp_path / "whole")[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted, capfd):
    run_dir = tmp_path / "run"
    distill.run(tiny(run_dir))
    damaged = [p for p in (run_dir / "checkpoints" / "10").rglob("*") if p.is_file() and p.stat().st_size > 1000]
    assert damaged
    for path in damaged:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated mid-write
    capfd.readouterr()
    summary = distill.run(tiny(run_dir))
    err = capfd.readouterr().err
    assert "checkpoint" in err and "10 is unreadable" in err and "resuming from step 5" in err
    assert summary["status"] == "completed" and summary["resumed_from"] == 5
    assert (run_dir / "checkpoints" / "10.unreadable").is_dir()  # kept for inspection
    for a, b in zip(leaves(checkpoint_tree(run_dir)[1]), leaves(checkpoint_tree(uninterrupted)[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_nan_gradient_is_skipped_and_counted(tmp_path):
    run_dir = tmp_path / "run"
    summary = distill.run(tiny(run_dir, "train.debug_nonfinite_step=6", "train.log_every=1"))
    assert summary["status"] == "completed"
    rows = {row["step"]: row for row in read_metrics_jsonl(run_dir) if "teacher/ce" in row}
    for model in ("teacher", "student/distilled", "student/control"):
        assert [rows[s][f"{model}/skipped_updates"] for s in (5, 6, 7, 10) if f"{model}/skipped_updates" in rows[s]] \
            == [0, 1, 1, 1]
    assert all(np.isfinite(x).all() for x in leaves(checkpoint_tree(run_dir)[1]))
    # The skipped step left every parameter as it was: step 6's state equals step 5's plus nothing.


def test_a_nan_gradient_under_stop_keeps_the_last_checkpoint_and_names_step_and_models(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(CLI + [f"run.dir={run_dir}", "train.debug_nonfinite_step=7", "train.on_nonfinite=stop"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "teacher (step 7, 1 so far)" in result.stderr and "distilled (step 7" in result.stderr
    assert "the last checkpoint (step 5) is intact" in result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["5"]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "nonfinite"


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    distill.run(tiny(run_dir, "train.steps=4", "teacher.warmup_steps=0"))
    before = (run_dir / "metrics.jsonl").read_text()
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from distill.guards import RunLock
lock = RunLock({str(run_dir)!r})
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = subprocess.run(CLI + [f"run.dir={run_dir}", "train.steps=4", "teacher.warmup_steps=0"],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 2
        assert f"is in use by another distill process (pid {holder.pid})" in result.stderr
        assert (run_dir / "metrics.jsonl").read_text() == before
    finally:
        holder.kill()
        holder.wait()
    distill.run(tiny(run_dir, "train.steps=4", "teacher.warmup_steps=0"))  # the lock died with its holder


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_to_the_uninterrupted_result(tmp_path):
    """Five SIGKILLs at random times (mid-step, mid-checkpoint, mid-evaluation), each followed by
    the same command: the end state equals an uninterrupted run's and no step is logged twice."""
    settings = ["train.steps=400", "train.log_every=10", "train.eval_every=100", "train.checkpoint_every=50"]
    run_dir = tmp_path / "run"
    rng = np.random.default_rng(0)
    kills = 0
    while kills < 5:
        process = subprocess.Popen(CLI + [f"run.dir={run_dir}", *settings], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        seen = len(logged_steps(run_dir))
        deadline = time.time() + 300
        while len(logged_steps(run_dir)) <= seen and process.poll() is None:  # resumed and stepping
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))
        if process.poll() is not None:  # finished before the kill: start again from scratch
            break
        process.kill()
        process.wait()
        kills += 1
    assert kills == 5
    result = subprocess.run(CLI + [f"run.dir={run_dir}", *settings], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert logged_steps(run_dir) == list(range(10, 401, 10))
    distill.run(tiny(tmp_path / "whole", *settings))
    for a, b in zip(leaves(checkpoint_tree(run_dir)[1]), leaves(checkpoint_tree(tmp_path / "whole")[1]), strict=True):
        np.testing.assert_array_equal(a, b)
