"""Faults a run survives: SIGTERM mid-run, a corrupted latest checkpoint (truncated, or changed in
place and caught by its checksums), NaN gradients (skip or stop), a second process on the same run
directory, and a full disk while saving (at the last save, or mid-run)."""

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
from distill import checkpoint, cli
from distill.errors import ConfigError
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
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted" and "checkpoint saved" in stderr
    assert "val bpb" not in stdout  # stopped before its first evaluation: no empty table
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
    assert "Traceback" not in err and "asyncio" not in err and "absl" not in err, err[-3000:]  # in orbax.log
    assert summary["status"] == "completed" and summary["resumed_from"] == 5
    assert (run_dir / "checkpoints" / "10.unreadable").is_dir()  # kept for inspection
    for a, b in zip(leaves(checkpoint_tree(run_dir)[1]), leaves(checkpoint_tree(uninterrupted)[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    reliability_record("fault", fault="corrupted latest checkpoint", injection="every file > 1 kB of step 10 truncated to half",
                       trials=1, outcome="warning names step 10; resumed from step 5 (10 kept as 10.unreadable); end "
                                         "state bit-identical")


def overwrite_middles(step_dir: Path) -> list[Path]:
    """8 bytes in the middle of every array data file of a checkpoint, overwritten in place (sizes
    kept): what bit rot or a stray write does, which no size or read error shows."""
    files = sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir())
    for path in files:
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 8] = bytes(b ^ 0x5A for b in data[middle:middle + 8])
        path.write_bytes(bytes(data))
    return files


def test_a_checkpoint_changed_in_place_fails_its_checksums_and_the_run_falls_back(tmp_path, uninterrupted, capfd,
                                                                                   reliability_record):
    run_dir = tmp_path / "run"
    distill.run(tiny(run_dir))
    sizes = {p: p.stat().st_size for p in (run_dir / "checkpoints" / "10").rglob("*") if p.is_file()}
    files = overwrite_middles(run_dir / "checkpoints" / "10")
    assert files and {p: p.stat().st_size for p in sizes} == sizes
    capfd.readouterr()
    for argv in (["eval", str(run_dir)], ["export", str(run_dir), "--hf", str(tmp_path / "hf")]):
        assert cli.main(argv) == 2
        [message] = capfd.readouterr().err.strip().splitlines()
        assert f"{run_dir}: its checkpoint at step 10 is corrupted (" in message and "differ from their checksums" \
            in message and "rerun that run's `distill run` command" in message, message
    assert not (tmp_path / "hf").exists()
    summary = distill.run(tiny(run_dir))
    err = capfd.readouterr().err
    [warning] = [line for line in err.splitlines() if "is corrupted" in line]
    assert "checkpoints/10 is corrupted" in warning and "differ from their checksums taken at save" in warning \
        and "resuming from step 5" in warning
    assert "Traceback" not in err and "absl" not in err and "asyncio" not in err, err[-3000:]
    assert summary["status"] == "completed" and summary["resumed_from"] == 5 and summary["checkpoint"] == 10
    assert (run_dir / "checkpoints" / "10.unreadable").is_dir()
    for a, b in zip(leaves(checkpoint_tree(run_dir)[1]), leaves(checkpoint_tree(uninterrupted)[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    reliability_record("fault", fault="checkpoint changed in place (sizes kept)",
                       injection=f"8 bytes in the middle of each of the {len(files)} array data files of step 10 "
                                 "overwritten", trials=1,
                       outcome="distill eval and export refuse the run (exit 2, one line naming step 10); the rerun "
                               "warns that step 10 fails its checksums, resumes from step 5 (10 kept as 10.unreadable); "
                               "end state bit-identical")


def test_non_finite_values_in_a_checkpoint_are_refused_like_a_corrupted_one(tmp_path):
    """A checkpoint saved without checksums (before they existed) is still checked for values no
    training state holds."""
    directory = tmp_path / "checkpoints"
    checkpoint.write_state(directory, 3, {"w": np.array([1.0, np.nan, np.inf], np.float32)}, {"step": 3})
    with pytest.raises(ConfigError, match=r"its checkpoint at step 3 is corrupted \(2 non-finite values in 1 arrays"):
        checkpoint.restore_tree(directory, None, "RUN")


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


def test_runaway_skipping_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys, reliability_record):
    """optim.learning_rate=1e6: the models diverge and most updates are skipped as non-finite; past
    train.max_skipped_fraction of train.skip_window steps the run stops (exit 3) before saving."""
    run_dir = tmp_path / "run"
    code = cli.main(["run", str(TINY), f"run.dir={run_dir}", "optim.learning_rate=1000000", "train.steps=20",
                     "train.skip_window=4", "train.log_every=1", "train.eval_every=20"])
    stderr = capsys.readouterr().err
    assert code == 3, stderr[-2000:]
    [message] = [line for line in stderr.splitlines() if "runaway" in line]
    stopped = int(message.split("the run stops at step ")[1].split()[0])
    assert "teacher skipped" in message and "of the last" in message and "train.max_skipped_fraction=0.2" in message
    assert "lower optim.learning_rate" in message and stopped < 20
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir())
    assert f"the last checkpoint (step {saved[-1] if saved else None}) is intact" in message and stopped not in saved
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and summary["checkpoint"] == (saved[-1] if saved else None)
    assert "val bpb" not in capsys.readouterr().out
    reliability_record("fault", fault="runaway non-finite updates (a diverged run)",
                       injection="optim.learning_rate=1000000, train.skip_window=4 (max_skipped_fraction 0.2)", trials=1,
                       outcome=f"exit 3 at step {stopped}; the message names the models, their skipped counts and the "
                               f"step; no checkpoint of that step; summary.json: status nonfinite, checkpoint "
                               f"{saved[-1] if saved else None}")


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
    message = result.stderr.strip().splitlines()[-1]  # the last word, with no library noise on the terminal
    assert message.startswith("distill run: stopped at step 10: the checkpoint at step 10 could not be written")
    assert "File too large" in message and "the previous checkpoint (step 5) is intact and a rerun resumes from it" \
        in message
    assert "Traceback" not in result.stderr and "absl" not in result.stderr, result.stderr[-3000:]
    assert "File too large" in (run_dir / "orbax.log").read_text()  # orbax's own account, for diagnosis
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["5"]  # the partial one removed
    assert digests(run_dir / "checkpoints" / "5") == kept
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "save_failed" and summary["checkpoint"] == 5
    summary = distill.run(tiny(run_dir))  # space again: the same command resumes and ends as if never stopped
    assert summary["status"] == "completed" and summary["resumed_from"] == 5
    for a, b in zip(leaves(checkpoint_tree(run_dir)[1]), leaves(checkpoint_tree(uninterrupted)[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    reliability_record("fault", fault="disk full while saving", injection="RLIMIT_FSIZE 32 kB in the resumed process (EFBIG)",
                       trials=1, outcome="exit 4; message: step 10 not written, step 5 intact (files unchanged); partial "
                                         "step removed; orbax's tracebacks in orbax.log only; rerun resumed from 5, end "
                                         "state bit-identical")


def test_a_save_failing_mid_run_stops_the_run_at_the_next_step(tmp_path, reliability_record):
    """The asynchronous save of step 10 of 40 fails: the run stops at the first step after the
    failure is known, long before the end, without evaluating or printing a table."""
    run_dir, longer = tmp_path / "run", ["train.steps=40", "train.eval_every=40"]
    distill.run(tiny(run_dir, *longer), stop_after=5)
    result = subprocess.run(CLI + [f"run.dir={run_dir}", *longer], capture_output=True, text=True, timeout=600,
                            preexec_fn=small_disk)
    assert result.returncode == 4, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    stopped = int(message.split("stopped at step ")[1].split(":")[0])
    assert 10 < stopped < 40 and "the checkpoint at step 10 could not be written" in message, message
    assert "Traceback" not in result.stderr and "absl" not in result.stderr, result.stderr[-3000:]
    assert "eval @" not in result.stderr and "val bpb" not in result.stdout
    assert max(logged_steps(run_dir)) <= stopped
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "save_failed" and summary["checkpoint"] == 5
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["5"]
    reliability_record("fault", fault="disk full while saving, mid-run", injection="RLIMIT_FSIZE 32 kB; the "
                       "asynchronous save of step 10 of 40 fails", trials=1,
                       outcome=f"the run stops at step {stopped}, the first step after the failure was known (not at "
                               "the end): exit 4, one message as the last line; summary.json: status save_failed, "
                               "checkpoint 5; no evaluation, no table")


KILLS = 20


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_to_the_uninterrupted_result(tmp_path, reliability_record):
    """KILLS SIGKILLs at random times (mid-step, mid-checkpoint, mid-evaluation), each followed by
    the same command: the end state equals an uninterrupted run's and no step is logged twice."""
    settings = ["train.steps=1000", "train.log_every=10", "train.eval_every=250", "train.checkpoint_every=50"]
    run_dir = tmp_path / "run"
    rng = np.random.default_rng(0)
    kills, mid_save, at_steps = 0, 0, []
    while kills < KILLS:
        process = subprocess.Popen(CLI + [f"run.dir={run_dir}", *settings], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        seen = len(logged_steps(run_dir))
        deadline = time.time() + 300
        while len(logged_steps(run_dir)) <= seen and process.poll() is None:  # resumed and stepping
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        if process.poll() is not None:  # finished before the kill
            break
        process.kill()
        process.wait()
        kills += 1
        partial = list((run_dir / "checkpoints").glob("*tmp*")) if (run_dir / "checkpoints").is_dir() else []
        mid_save += bool(partial)  # killed while orbax was writing a checkpoint
        at_steps.append(max(logged_steps(run_dir), default=0))
    assert kills == KILLS, f"the run finished after {kills} kills"
    result = subprocess.run(CLI + [f"run.dir={run_dir}", *settings], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "absl" not in result.stderr, result.stderr[-2000:]
    assert logged_steps(run_dir) == list(range(10, 1001, 10))
    assert tensorboard_steps(run_dir) == list(range(10, 1001, 10))
    distill.run(tiny(tmp_path / "whole", *settings))
    for a, b in zip(leaves(checkpoint_tree(run_dir)[1]), leaves(checkpoint_tree(tmp_path / "whole")[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    reliability_record("fault", fault="kill -9 at random moments", injection="SIGKILL 0-1 s after stepping resumed "
                       "(1000 steps, checkpoint every 50, evaluation every 250)", trials=kills,
                       outcome=f"killed after logged steps {at_steps} ({mid_save} of {kills} mid-checkpoint-save); each "
                               "rerun resumed from the last committed checkpoint; end state bit-identical; "
                               "metrics.jsonl and TensorBoard hold steps 10..1000 once each")
