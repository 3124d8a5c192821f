"""Sweeps as submitit jobs: the sbatch script against a golden file, the options refused with exit 2,
JAX's coordinator variables in every task of a multi-process job, and real tiny sweeps through
submitit's local executor (queued / running in --report, no double submission, failures isolated)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill import cli
from distill.sweep import JobOptions, jax_process_env, load_sweep, parse_time, report, sbatch_script
from distill.sweep.jobs import executor, run_task
from distill.sweep.state import prepare_run_dir, write_job

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
GOLDEN = HERE / "golden_sbatch.sh"

FULL = JobOptions(cluster="slurm", gpus_per_run=8, nodes=2, tasks_per_node=4, time_min=parse_time("1-02:00:00"),
                  partition="gpu", cpus_per_task=8, mem="64G", account="lab", qos="high",
                  params={"constraint": "a100", "mail-type": "END"}, setup=("module load cuda/12.4",))


def normalised(script: str, folder: Path) -> str:
    return script.replace(str(folder), "FOLDER").replace(sys.executable, "PYTHON")


def test_the_sbatch_script_matches_the_golden_file(tmp_path):
    """Regenerate: python -c 'from tests.sweep.test_jobs import *; regenerate()' (then review the diff)."""
    folder = tmp_path / "out" / "temperature-2.0_seed-1" / "submitit" / "%j"
    assert normalised(sbatch_script(FULL, folder, "temperature-2.0_seed-1"), folder) == GOLDEN.read_text()


def regenerate() -> None:
    folder = Path("/x/out/temperature-2.0_seed-1/submitit/%j")
    GOLDEN.write_text(normalised(sbatch_script(FULL, folder, "temperature-2.0_seed-1"), folder))


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path, capsys):
    args = ["sweep", str(HERE / "tiny_grid.yaml"), "--dir", str(tmp_path / "out"), "--dry-run", "--launcher",
            "submitit", "--slurm-time", "30", "--gpus-per-run", "1", "--slurm-partition", "debug"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --partition=debug" in out and "#SBATCH --time=30" in out and "#SBATCH --gpus-per-node=1" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--slurm-partition", "gpu"], "--slurm-partition: only with --launcher submitit"),
    (["--launcher", "submitit", "--gpus-per-run", "1"], "--slurm-time: required with --launcher submitit"),
    (["--launcher", "submitit", "--slurm-time", "60"], "no sbatch on PATH"),
    (["--launcher", "submitit", "--slurm-time", "4h"], "--slurm-time '4h': minutes, H:MM:SS or D-H:MM:SS"),
    (["--launcher", "submitit-local", "--gpus-per-run", "3", "--nodes-per-run", "2"], "not a multiple"),
    (["--launcher", "submitit-local", "--nodes-per-run", "2"], "local executor has one node"),
    (["--launcher", "submitit-local", "--slurm-param", "constraint"], "--slurm-param 'constraint': KEY=VALUE"),
    (["--launcher", "submitit-local", "--tasks-per-node", "0"], "--tasks-per-node 0: must be >= 1"),
])
def test_bad_job_options_are_refused_before_anything_is_submitted(tmp_path, capsys, extra, expected):
    out = tmp_path / "out"
    assert cli.main(["sweep", str(HERE / "tiny_grid.yaml"), "--dir", str(out), *extra]) == 2
    assert expected in capsys.readouterr().err
    assert not any(out.glob("*/job.json"))


def test_jax_variables_for_each_task():
    one_host = jax_process_env(2, 1, ["vm"], "4242")
    assert one_host == {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:24242", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    hosts = ["gpu-017", "gpu-018"]
    lead, other = jax_process_env(8, 0, hosts, "123456"), jax_process_env(8, 7, hosts, "123456")
    assert lead["JAX_COORDINATOR_ADDRESS"] == other["JAX_COORDINATOR_ADDRESS"] == "gpu-017:23456"
    assert (lead["JAX_PROCESS_ID"], other["JAX_PROCESS_ID"], other["JAX_NUM_PROCESSES"]) == ("0", "7", "8")


ECHO_ENV = ("import json, os, sys; keys = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'); "
            "open(os.path.join(sys.argv[1], 'task-' + os.environ['JAX_PROCESS_ID']), 'w')"
            ".write(json.dumps({k: os.environ[k] for k in keys}))")


def test_a_multi_process_job_gives_each_task_its_jax_variables(tmp_path):
    """Two tasks of one job through submitit's local executor, each running the run's command (here a
    stand-in that writes what it was given); task 0 records the job in job.json; a failing command
    fails its job and records its exit code."""
    two, failing = tmp_path / "two", tmp_path / "failing"
    two.mkdir(), failing.mkdir()
    job = executor(JobOptions(cluster="local", tasks_per_node=2, time_min=5), two / "submitit" / "%j", "two").submit(
        run_task, [sys.executable, "-c", ECHO_ENV, str(two)], str(two), str(tmp_path))
    bad = executor(JobOptions(cluster="local", time_min=5), failing / "submitit" / "%j", "failing").submit(
        run_task, [sys.executable, "-c", "raise SystemExit(3)"], str(failing), str(tmp_path))
    assert job.results() == [0, 0]
    tasks = [json.loads((two / f"task-{i}").read_text()) for i in (0, 1)]
    assert [t["JAX_PROCESS_ID"] for t in tasks] == ["0", "1"] and {t["JAX_NUM_PROCESSES"] for t in tasks} == {"2"}
    assert tasks[0]["JAX_COORDINATOR_ADDRESS"] == tasks[1]["JAX_COORDINATOR_ADDRESS"]
    assert tasks[0]["JAX_COORDINATOR_ADDRESS"].startswith("127.0.0.1:")
    record = json.loads((two / "job.json").read_text())
    assert record["state"] == "finished" and record["exit_code"] == 0 and record["ended"] >= record["started"]
    with pytest.raises(Exception, match="distill run exited 3"):
        bad.result()
    assert json.loads((failing / "job.json").read_text())["exit_code"] == 3


# ----------------------------------------------------------------------------- real tiny sweeps

def sweep_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", "sweep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.slow  # two real runs as concurrent jobs: 6 min on the shared 2-core box
def test_jobs_report_while_queued_or_running_are_not_submitted_twice_then_complete(tmp_path):
    out = tmp_path / "out"
    grid = "tests/sweep/tiny_grid.yaml"
    submitted = sweep_cli(grid, "--dir", str(out), "--launcher", "submitit-local")
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    names = ["max_bytes-200000_seed-0", "max_bytes-120000_seed-0"]
    jobs = {name: json.loads((out / name / "job.json").read_text())["job_id"] for name in names}
    assert all(f"submitted {name}: job {jobs[name]}" in submitted.stdout for name in names)

    while_running = sweep_cli(grid, "--dir", str(out), "--report")
    assert while_running.returncode == 0, while_running.stderr[-3000:]
    rows = {r["name"]: r for r in csv.DictReader((out / "summary.csv").open())}
    if not all(json.loads((out / name / "job.json").read_text())["state"] == "finished" for name in names):
        assert {rows[name]["status"] for name in names} <= {"queued", "running", "completed"}
        assert "job " in while_running.stdout  # the note names the job

    again = sweep_cli(grid, "--dir", str(out), "--launcher", "submitit-local", "--wait")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for name in names:  # each run once: the second sweep waited for the first one's jobs
        assert json.loads((out / name / "job.json").read_text())["job_id"] == jobs[name]
        assert json.loads((out / name / "summary.json").read_text())["status"] == "completed"
        assert (out / name / "sweep.log").read_text().count("=== ") == 1
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed"] * 2 and [r["exit_code"] for r in rows] == ["0"] * 2
    assert all(float(r["train_seconds"]) > 0 and float(r["wall_seconds"]) > 0 for r in rows)

    done = sweep_cli(grid, "--dir", str(out), "--launcher", "submitit-local")
    assert done.returncode == 0 and done.stdout.count("skipped") == 2


def test_a_failing_job_is_recorded_and_the_other_completes(tmp_path):
    result = sweep_cli(str(HERE / "tiny_failing.yaml"), "--dir", str(tmp_path), "--launcher", "submitit-local",
                       "--wait")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 of 2 runs did not complete: source-nonexistent-corpus.txt" in result.stderr
    rows = {r["name"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    assert rows["source-nonexistent-corpus.txt"]["status"] == "failed"
    assert rows["source-nonexistent-corpus.txt"]["exit_code"] == "2"
    assert rows["source-stdlib"]["status"] == "completed" and rows["source-stdlib"]["exit_code"] == "0"
    assert "no such file or directory" in (tmp_path / "summary.md").read_text()


def test_report_reads_the_job_records_without_the_scheduler(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(HERE / "tiny_grid.yaml", out=tmp_path / "out")
    first, second = sweep.runs
    for run, state, job in ((first, "queued", "11"), (second, "running", "12")):
        prepare_run_dir(run, sweep.configs[run.name])
        write_job(run.run_dir, state=state, job_id=job, cluster="slurm", submitted=1.0)
    table = report(sweep)
    assert {r.name: (r.status, r.note, r.exit_code) for r in table.rows} == {
        first.name: ("queued", "job 11", None), second.name: ("running", "job 12", None)}
    assert "- max_bytes-200000_seed-0: queued: job 11" in table.markdown()
    (second.run_dir / "sweep.log").write_text("distill run: data.source: no such file\n")
    write_job(second.run_dir, state="finished", exit_code=2, started=2.0, ended=5.0)
    rows = {r["name"]: r for r in csv.DictReader((sweep.out / "summary.csv").open())} if report(sweep) else {}
    assert (rows[second.name]["status"], rows[second.name]["exit_code"]) == ("failed", "2")
    assert rows[second.name]["wall_seconds"] == "3.0" and rows[first.name]["status"] == "queued"
    assert "failed: distill run: data.source: no such file" in (sweep.out / "summary.md").read_text()


FAKE_SBATCH = """#!/bin/bash
# records its arguments; answers as sbatch does, or refuses like a bad partition when REFUSE exists
calls="$(dirname "$0")/calls"
echo "sbatch $*" >> "$calls"
if [ -e "$(dirname "$0")/REFUSE" ]; then echo "sbatch: error: invalid partition specified: nope" >&2; exit 1; fi
echo "Submitted batch job $((4241 + $(wc -l < "$calls")))"
"""
FAKE_SQUEUE = """#!/bin/bash
# squeue -h -j ID -o %T: PENDING for the jobs listed in ./queue
grep -qx "$3" "$(dirname "$0")/queue" 2>/dev/null && echo PENDING
exit 0
"""


def test_slurm_submission_with_a_stand_in_sbatch_and_squeue(tmp_path, monkeypatch, capsys):
    """The SLURM path without SLURM: sbatch and squeue stand-ins on PATH. A run is submitted once,
    not again while squeue lists its job, and anew once squeue no longer does; a refused submission
    is one error (exit 2)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("srun", "#!/bin/bash\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "out"
    args = ["sweep", str(HERE / "tiny_grid.yaml"), "--dir", str(out), "--launcher", "submitit", "--slurm-time", "10",
            "--slurm-partition", "debug"]
    monkeypatch.chdir(ROOT)
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert "submitted max_bytes-200000_seed-0: job 4242" in first and "submitted max_bytes-120000_seed-0: job 4243" in first
    record = json.loads((out / "max_bytes-200000_seed-0" / "job.json").read_text())
    assert (record["state"], record["job_id"], record["cluster"]) == ("queued", "4242", "slurm")
    script = (out / "max_bytes-200000_seed-0" / "submitit" / "4242" / "4242_submission.sh").read_text()
    assert "#SBATCH --partition=debug" in script and "#SBATCH --time=10" in script
    assert "#SBATCH --job-name=max_bytes-200000_seed-0" in script

    (bin_dir / "queue").write_text("4242\n")  # 4242 still pending, 4243 gone (e.g. cancelled)
    assert cli.main(args) == 0
    again = capsys.readouterr().out
    assert "queued    max_bytes-200000_seed-0: job 4242 (not submitted again)" in again
    assert "submitted max_bytes-120000_seed-0: job 4244" in again
    assert (bin_dir / "calls").read_text().count("sbatch ") == 3

    assert cli.main(["sweep", str(HERE / "tiny_grid.yaml"), "--dir", str(out), "--report"]) == 0
    assert capsys.readouterr().out.count("| queued |") == 2

    (bin_dir / "queue").write_text("")
    (bin_dir / "REFUSE").write_text("")
    assert cli.main(args) == 2
    assert "the job was not submitted" in capsys.readouterr().err
