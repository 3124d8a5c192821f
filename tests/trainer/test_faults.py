"""Faults a run survives: SIGTERM mid-run, a corrupted latest checkpoint, NaN gradients (skip or
stop), a second process on the same run directory, and a full disk while saving."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import distill
from distill import cli
from distill.run_logger import read_metrics_jsonl, read_scalars
from distill.runs import checkpoint_tree

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"
CLI = [sys.executable, "-m", "distill.cli", "run", str(TINY)]


def tiny(run_dir: Path, *overrides: str):
    return distill.load_config(TINY, [f"run.dir={run_dir}", *overrides])


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def logged_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics_jsonl(run_dir) if "teacher/ce" in row]


def tensorboard_steps(run_dir: Path) -> list[int]:
    """The steps of one logged scalar across all of the run's event files, in file order."""
    return [step for step, _ in read_scalars(run_dir / "tb" / "teacher")["train/ce"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults") / "whole"
    distill.run(tiny(run_dir))
    return run_dir


LONG = ["train.steps=100", "train.log_every=10", "train.eval_every=100", "train.checkpoint_every=50"]


def test_sigterm_checkpoints_the_step_reached_and_the_run_resumes_to_the_same_end(tmp_path, reliability_record):
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
    assert 10 <= stopped_at < 100
    distill.run(tiny(run_dir, *LONG))
    assert logged_steps(run_dir) == list(range(10, 101, 10))  # nothing twice, nothing missing
    assert tensorboard_steps(run_dir) == list(range(10, 101, 10))
    distill.run(tiny(tmp_path / "whole", *LONG))
    for a, b in zip(leaves(checkpoint_tree(run_dir)[1]), leaves(checkpoint_tree(tmp_path / "whole")[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    reliability_record("fault", fault="SIGTERM (preemption) mid-run", injection="SIGTERM once stepping", trials=1,
                       outcome=f"exit 143, checkpoint at step {stopped_at}; rerun resumed; end state bit-identical; "
                               "metrics.jsonl and TensorBoard hold steps 10..100 once each")


def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted, capfd, reliability_record):
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
    reliability_record("fault", fault="corrupted latest checkpoint", injection="every file > 1 kB of step 10 truncated to half",
                       trials=1, outcome="warning names step 10; resumed from step 5 (10 kept as 10.unreadable); end "
                                         "state bit-identical")


def test_a_nan_gradient_is_skipped_and_counted(tmp_path, reliability_record):
    run_dir = tmp_path / "run"
    summary = distill.run(tiny(run_dir, "train.debug_nonfinite_step=6", "train.log_every=1"))
    assert summary["status"] == "completed"
    rows = {row["step"]: row for row in read_metrics_jsonl(run_dir) if "teacher/ce" in row}
    for model in ("teacher", "student/distilled", "student/control"):
        assert [rows[s][f"{model}/skipped_updates"] for s in (5, 6, 7, 10) if f"{model}/skipped_updates" in rows[s]] \
            == [0, 1, 1, 1]
    assert all(np.isfinite(x).all() for x in leaves(checkpoint_tree(run_dir)[1]))
    reliability_record("fault", fault="NaN gradient, train.on_nonfinite=skip", injection="train.debug_nonfinite_step=6",
                       trials=1, outcome="update skipped and counted (<model>/skipped_updates = 1) for every model; run "
                                         "completes with finite weights")


def test_a_nan_gradient_under_stop_keeps_the_last_checkpoint_and_names_step_and_models(tmp_path, capsys,
                                                                                       reliability_record):
    run_dir = tmp_path / "run"
    code = cli.main(["run", str(TINY), f"run.dir={run_dir}", "train.debug_nonfinite_step=7", "train.on_nonfinite=stop"])
    stderr = capsys.readouterr().err
    assert code == 3, stderr[-2000:]
    assert "teacher (step 7, 1 so far)" in stderr and "distilled (step 7" in stderr
    assert "the last checkpoint (step 5) is intact" in stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["5"]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "nonfinite"
    reliability_record("fault", fault="NaN gradient, train.on_nonfinite=stop", injection="train.debug_nonfinite_step=7",
                       trials=1, outcome="exit 3; message names step 7 and the models; checkpoint 5 intact, nothing newer")


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path, capsys, reliability_record):
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
        capsys.readouterr()
        assert cli.main(["run", str(TINY), f"run.dir={run_dir}", "train.steps=4", "teacher.warmup_steps=0"]) == 2
        assert f"is in use by another distill process (pid {holder.pid})" in capsys.readouterr().err
        assert (run_dir / "metrics.jsonl").read_text() == before
    finally:
        holder.kill()
        holder.wait()
    distill.run(tiny(run_dir, "train.steps=4", "teacher.warmup_steps=0"))  # the lock died with its holder
    reliability_record("fault", fault="second process on the same run directory", injection="another process holds the lock",
                       trials=1, outcome="exit 2, message names the holder's pid; metrics.jsonl unchanged; runs again "
                                         "once the holder is gone")


def small_disk():
    """In the child: files may not grow past 32 kB (a full disk for the checkpoint's larger files;
    the writes fail with EFBIG instead of the process being killed by SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (32_000, 32_000))


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(tmp_path, uninterrupted, digests,
                                                                             reliability_record):
    run_dir = tmp_path / "run"
    distill.run(tiny(run_dir), stop_after=5)
    kept = digests(run_dir / "checkpoints" / "5")
    result = subprocess.run(CLI + [f"run.dir={run_dir}"], capture_output=True, text=True, timeout=600,
                            preexec_fn=small_disk)
    assert result.returncode == 4, result.stderr[-3000:]
    [message] = [line for line in result.stderr.splitlines() if line.startswith("distill run: the checkpoint")]
    assert "the checkpoint at step 10 could not be written" in message and "File too large" in message
    assert "the previous checkpoint (step 5) is intact and a rerun resumes from it" in message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["5"]  # the partial one removed
    assert digests(run_dir / "checkpoints" / "5") == kept
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "save_failed"
    summary = distill.run(tiny(run_dir))  # space again: the same command resumes and ends as if never stopped
    assert summary["status"] == "completed" and summary["resumed_from"] == 5
    for a, b in zip(leaves(checkpoint_tree(run_dir)[1]), leaves(checkpoint_tree(uninterrupted)[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    reliability_record("fault", fault="disk full while saving", injection="RLIMIT_FSIZE 32 kB in the resumed process (EFBIG)",
                       trials=1, outcome="exit 4; message: step 10 not written, step 5 intact (files unchanged); partial "
                                         "step removed; rerun resumed from 5, end state bit-identical")


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_to_the_uninterrupted_result(tmp_path, reliability_record):
    """Five SIGKILLs at random times (mid-step, mid-checkpoint, mid-evaluation), each followed by
    the same command: the end state equals an uninterrupted run's and no step is logged twice."""
    settings = ["train.steps=400", "train.log_every=10", "train.eval_every=100", "train.checkpoint_every=50"]
    run_dir = tmp_path / "run"
    rng = np.random.default_rng(0)
    kills, mid_save, at_steps = 0, 0, []
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
        partial = list((run_dir / "checkpoints").glob("*tmp*")) if (run_dir / "checkpoints").is_dir() else []
        mid_save += bool(partial)  # killed while orbax was writing a checkpoint
        at_steps.append(max(logged_steps(run_dir), default=0))
    assert kills == 5
    result = subprocess.run(CLI + [f"run.dir={run_dir}", *settings], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert logged_steps(run_dir) == list(range(10, 401, 10))
    assert tensorboard_steps(run_dir) == list(range(10, 401, 10))
    distill.run(tiny(tmp_path / "whole", *settings))
    for a, b in zip(leaves(checkpoint_tree(run_dir)[1]), leaves(checkpoint_tree(tmp_path / "whole")[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    reliability_record("fault", fault="kill -9 at random moments", injection="SIGKILL 0-2 s after stepping resumed "
                       "(checkpoint every 50 steps, evaluation every 100)", trials=kills,
                       outcome=f"killed after logged steps {at_steps} ({mid_save} of {kills} mid-checkpoint-save); each "
                               "rerun resumed from the last committed checkpoint; end state bit-identical; "
                               "metrics.jsonl and TensorBoard hold steps 10..400 once each")
