"""Runs as scheduler jobs through submitit: one job per run (a job of several tasks for a multi-host
run), on SLURM (`--launcher submitit`) or on this machine through submitit's local executor
(`--launcher submitit-local`, to try the same sweep before booking a cluster).

Every task of a run's job runs `run_task`: the run's `distill run` command, with JAX's coordinator
variables (`jax_process_env`) when the job has several tasks. Task 0 records the job in
OUT/<name>/job.json (queued -> running -> finished with the exit code), which is how `--report`
and a later sweep know a run's state while its job is queued or running, without the scheduler.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from distill.sweep.ownership import dies_with_parent
from distill.sweep.spec import SweepError
from distill.sweep.state import (
    JOB_FILE,
    LOG_NAME,
    Run,
    RunResult,
    Sweep,
    prepare_run_dir,
    read_job,
    result_of_exit,
    write_job,
)

try:  # optional: pip install 'distill[slurm]'
    import submitit
    from submitit.core import utils as submitit_utils
    from submitit.slurm import slurm as submitit_slurm
except ImportError:  # pragma: no cover (installed with the dev extra)
    submitit = submitit_slurm = submitit_utils = None

LAUNCHERS = {"submitit": "slurm", "submitit-local": "local"}
JOBS_DIR = "submitit"  # OUT/<name>/submitit/: submitit's pickles, sbatch script and per-task logs
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # the local executor's time limit when --slurm-time is not given
JAX_PORTS = (20_000, 40_000)  # the coordinator listens on a port in this range, chosen by the job id


@dataclass(frozen=True)
class JobOptions:
    """What each run's job asks the scheduler for (`distill sweep --launcher submitit ...`)."""

    cluster: str  # slurm | local
    gpus_per_run: int = 0  # split evenly over the nodes
    nodes: int = 1  # hosts of a run: a multi-host JAX job
    tasks_per_node: int = 1  # processes per host; JAX processes = nodes x tasks_per_node
    time_min: int | None = None  # the job's time limit, minutes
    partition: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None  # per node, as sbatch writes it: 64G
    account: str | None = None
    qos: str | None = None
    params: dict[str, str] = field(default_factory=dict)  # any other sbatch option: constraint=a100
    setup: tuple[str, ...] = ()  # shell lines run before the job's tasks: module load cuda

    @property
    def processes(self) -> int:
        return self.nodes * self.tasks_per_node


def parse_time(text: str) -> int:
    """SLURM's time formats as whole minutes (seconds round up): MIN, MIN:SEC, H:MM:SS, D-H,
    D-H:MM, D-H:MM:SS."""
    days, _, clock = text.strip().rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        if days:
            hours, minutes, seconds = (parts + [0, 0])[:3]
        else:  # MIN, MIN:SEC, H:MM:SS
            hours, minutes, seconds = parts if len(parts) == 3 else (0, parts[0], parts[1] if parts[1:] else 0)
        total = int(days or 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    except ValueError:
        total = -1
    if total <= 0 or len(parts) > 3 or min(parts) < 0:
        raise SweepError(f"--slurm-time {text!r}: minutes, H:MM:SS or D-H:MM:SS, e.g. 240 or 4:00:00")
    return total


def parse_params(items: list[str]) -> dict[str, str]:
    """`--slurm-param KEY=VALUE` options as sbatch options."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--slurm-param {item!r}: KEY=VALUE, an sbatch option without its dashes, "
                             "e.g. constraint=a100 or mail-type=END")
        params[key.strip().lstrip("-")] = value
    return params


def check_options(options: JobOptions, submitting: bool = True) -> None:
    """One clear error (exit 2) before anything is submitted (`submitting`: SLURM must be here)."""
    if submitit is None:
        raise SweepError("--launcher submitit: the submitit package is not installed; pip install 'distill[slurm]'")
    for name in ("gpus_per_run", "nodes", "tasks_per_node"):
        value = getattr(options, name)
        if value < (0 if name == "gpus_per_run" else 1):
            flag = {"nodes": "--nodes-per-run"}.get(name, "--" + name.replace("_", "-"))
            raise SweepError(f"{flag} {value}: must be >= {0 if name == 'gpus_per_run' else 1}")
    if options.gpus_per_run % options.nodes:
        raise SweepError(f"--gpus-per-run {options.gpus_per_run}: not a multiple of --nodes-per-run "
                         f"{options.nodes} (each node gets the same number of GPUs)")
    if options.cluster == "local" and options.nodes > 1:
        raise SweepError(f"--nodes-per-run {options.nodes}: submitit's local executor has one node; use "
                         "--tasks-per-node for several processes here")
    if options.cluster == "slurm":
        if options.time_min is None:
            raise SweepError("--slurm-time: required with --launcher submitit (submitit would ask for 5 minutes), "
                             "e.g. --slurm-time 4:00:00")
        if submitting and shutil.which("sbatch") is None:
            raise SweepError("--launcher submitit: no sbatch on PATH (not a SLURM login node); "
                             "--launcher submitit-local runs the same jobs on this machine")


def slurm_parameters(options: JobOptions, name: str) -> dict:
    """A run's job as submitit's SlurmExecutor parameters (sbatch's options, with `_` for `-`)."""
    params = {"job_name": name, "time": options.time_min, "nodes": options.nodes,
              "ntasks_per_node": options.tasks_per_node, "gpus_per_node": options.gpus_per_run // options.nodes or None,
              "cpus_per_task": options.cpus_per_task, "partition": options.partition, "mem": options.mem,
              "account": options.account, "qos": options.qos, "additional_parameters": options.params or None,
              "setup": list(options.setup) or None}
    return {key: value for key, value in params.items() if value is not None}


def executor(options: JobOptions, folder: Path, name: str):
    """A submitit executor for one run's job (its files in `folder`)."""
    if options.cluster == "slurm":
        ex = submitit.SlurmExecutor(folder)
        ex.update_parameters(**slurm_parameters(options, name))
        return ex
    ex = submitit.LocalExecutor(folder)
    local = {"timeout_min": options.time_min or LOCAL_TIMEOUT_MIN, "tasks_per_node": options.tasks_per_node,
             "gpus_per_node": options.gpus_per_run, "setup": list(options.setup) or None}
    ex.update_parameters(**{key: value for key, value in local.items() if value is not None})
    return ex


def sbatch_script(options: JobOptions, folder: Path, name: str) -> str:
    """The sbatch script submitit's SlurmExecutor writes for a run's job (`--dry-run` prints it; it
    needs no SLURM here)."""
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return submitit_slurm._make_sbatch_string(command=command, folder=folder, **slurm_parameters(options, name))


def jax_process_env(num_tasks: int, rank: int, hostnames: list[str], job_id: str) -> dict[str, str]:
    """JAX's coordinator variables for task `rank` of a job of `num_tasks` tasks (the lead process
    listens on the first host; on 127.0.0.1 when the job has one host)."""
    low, high = JAX_PORTS
    port = low + (int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())) % (high - low)
    host = hostnames[0] if len(set(hostnames)) > 1 else "127.0.0.1"
    return {"JAX_COORDINATOR_ADDRESS": f"{host}:{port}", "JAX_NUM_PROCESSES": str(num_tasks),
            "JAX_PROCESS_ID": str(rank)}


class RunFailed(RuntimeError):
    """The run's `distill run` exited non-zero: the job fails (its exit code is in job.json)."""


def run_task(command: list[str], run_dir: str, cwd: str) -> int:
    """One task of a run's job (on the scheduler's node): the run's command, from the directory the
    sweep was started in; task 0 records the job's progress in job.json and logs to sweep.log."""
    env = submitit.JobEnvironment()
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if env.num_tasks > 1:
        child_env.update(jax_process_env(env.num_tasks, env.global_rank, env.hostnames, str(env.job_id)))
    lead, folder = env.global_rank == 0, Path(cwd) / run_dir
    if lead:
        write_job(folder, state="running", started=time.time(), host=socket.gethostname())
    with open(folder / LOG_NAME if lead else os.devnull, "a") as log:
        if lead:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} job {env.job_id} on {socket.gethostname()} $ "
                      f"{' '.join(command)}\n")
            log.flush()
        code = subprocess.Popen(command, cwd=cwd, env=child_env, stdin=subprocess.DEVNULL,
                                stdout=log if lead else None, stderr=subprocess.STDOUT if lead else None,
                                preexec_fn=dies_with_parent()).wait()  # noqa: PLW1509 (prctl only)
    if lead:
        write_job(folder, state="finished", exit_code=code, ended=time.time())
    if code != 0:
        raise RunFailed(f"task {env.global_rank}: distill run exited {code}; log {folder / LOG_NAME}")
    return code


def job_alive(record: dict) -> bool:
    """The scheduler still has the job (queued or running): squeue on SLURM, the job's controller
    process for the local executor."""
    job_id = str(record.get("job_id") or "")
    if not job_id:
        return False  # never submitted
    if record.get("cluster") == "local":
        return _pid_alive(job_id)
    try:
        listed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                                timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot ask: do not submit it twice
    return bool(listed.stdout.strip())


def _pid_alive(pid: str) -> bool:
    """A running process (a zombie no one has reaped yet has ended)."""
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ValueError, IndexError):
        return False
    except OSError:  # no such process, or no /proc (not Linux)
        pass
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def state_of(run: Run) -> str | None:
    """queued / running while the run's job is (job.json and the scheduler agree), else None."""
    record = read_job(run.run_dir)
    if record and record.get("state") in ("queued", "running") and job_alive(record):
        return record["state"]
    return None


def submit(sweep: Sweep, run: Run, options: JobOptions) -> RunResult:
    """Submit `run` as a job; its result says `queued` with the job id."""
    prepare_run_dir(run, sweep.configs[run.name])
    # recorded before the job exists: a job that starts at once then says "running" (job_id follows)
    (run.run_dir / JOB_FILE).unlink(missing_ok=True)
    write_job(run.run_dir, state="queued", cluster=options.cluster, submitted=time.time())
    ex = executor(options, run.run_dir / JOBS_DIR / "%j", run.name)
    try:
        job = ex.submit(run_task, sweep.command(run), str(run.run_dir), os.getcwd())
    except (OSError, submitit_utils.FailedJobError, submitit_utils.FailedSubmissionError) as error:  # sbatch said no
        (run.run_dir / JOB_FILE).unlink(missing_ok=True)
        raise SweepError(f"run {run.name}: the job was not submitted: {error}") from None
    write_job(run.run_dir, job_id=str(job.job_id))
    return RunResult(run.name, "queued", job_id=str(job.job_id))


def result_of_job(run: Run) -> RunResult | None:
    """The run's result from job.json once its job finished (None while it is queued or running)."""
    record = read_job(run.run_dir) or {}
    if record.get("state") != "finished":
        return None
    result = result_of_exit(run, record["exit_code"], record.get("started") or record["ended"], record["ended"])
    result.job_id = record.get("job_id")
    return result
