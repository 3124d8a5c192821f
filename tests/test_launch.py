"""`distill launch` without a JAX job (the jobs themselves: tests/trainer/test_multiprocess.py):
each process's coordinator variables, where its output goes, the job's exit code; and how a
process tells a lost peer from another error."""

from __future__ import annotations

import sys

import jax

from distill import job, launch
from distill.parallel import lost_process


def test_each_process_gets_the_coordinator_on_localhost_and_its_own_devices():
    env = launch.process_env(1, 3, 4567, 4, base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --other"})
    assert env["JAX_COORDINATOR_ADDRESS"] == env["JAX_COORDINATOR_BIND_ADDRESS"] == "127.0.0.1:4567"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("3", "1")
    assert env["XLA_FLAGS"].split() == ["--other", "--xla_force_host_platform_device_count=4"]
    assert launch.command_line(["distill", "run", "c.yaml"]) == [sys.executable, "-m", "distill.cli", "run", "c.yaml"]


def exits(code_by_process: str) -> list[str]:
    """A command whose process i exits with code_by_process[i] ('k': kills itself with SIGKILL)."""
    return [sys.executable, "-c", ("import os, signal, sys; i = int(os.environ['JAX_PROCESS_ID']); "
            f"c = {code_by_process!r}[i]; print('hello from', i); "
            "os.kill(os.getpid(), signal.SIGKILL) if c == 'k' else sys.exit(int(c))")]


def test_the_job_exits_0_and_process_0_prints_here_the_others_to_their_logs(tmp_path, capfd):
    assert launch.launch(exits("00"), 2, None, tmp_path) == 0
    assert "hello from 0" in capfd.readouterr().out
    assert (tmp_path / "process-1.log").read_text().strip() == "hello from 1"


def test_the_job_exits_with_the_first_failure_and_names_each_process(tmp_path, capfd):
    assert launch.launch(exits("03"), 2, None, tmp_path, grace=5) == 3
    assert "process 0 exited 0; process 1 exited 3" in capfd.readouterr().err
    assert launch.launch(exits("0k"), 2, None, tmp_path, grace=5) == 128 + 9
    assert "process 1 was killed by SIGKILL" in capfd.readouterr().err


def test_a_closed_collective_connection_is_a_lost_process_only_in_a_job_of_several():
    try:
        try:
            raise RuntimeError("UNKNOWN: Gloo AllGather failed: Read error [127.0.0.1]:56530: Connection reset by peer")
        except RuntimeError as cause:
            raise OSError("the checkpoint at step 30 could not be written") from cause
    except OSError as error:
        assert "Connection reset by peer" in lost_process(error, process_count=2)
        assert lost_process(error, process_count=1) is None
    assert lost_process(ValueError("shapes do not match"), process_count=2) is None


def test_in_a_job_of_one_process_the_meeting_points_do_nothing():
    jitted = jax.jit(lambda x: x + 1)
    assert job.compiled_together(jitted, "step") is jitted
    job.wait_for_processes("anything")
    assert job.from_process_0("answer", "42") == "42"
