"""Running a sweep: local `distill run` processes sharing the machine (CPU sets, thread counts,
device memory), or a launcher (e.g. sbatch) per run; Ctrl-C and SIGTERM passed on to the runs.

The sweep owns its runs: on Linux each dies with it (PR_SET_PDEATHSIG: SIGTERM, so it checkpoints
and stops), and a later sweep stops any run a killed sweep left behind (`stop_orphan`) before it
resumes it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import rundir
from distill.sweep import jobs
from distill.sweep.jobs import JobOptions
from distill.sweep.ownership import SWEEP_PID_VAR, dies_with_parent, stop_orphan
from distill.sweep.spec import SweepError
from distill.sweep.state import (
    LOG_NAME,
    Run,
    RunResult,
    Sweep,
    log_tail,
    prepare_run_dir,
    read_job,
    read_results,
    report,
    result_of_exit,
    write_sweep_json,
)

WAITING = ("queued", "running", "submitted")  # not finished, not failed: the scheduler has the run



def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def default_parallel(cores: int | None = None) -> int:
    """1 on a machine with <= 2 cores, else half the cores."""
    cores = len(available_cores()) if cores is None else cores
    return 1 if cores <= 2 else cores // 2


def _has_accelerator() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] != "cpu"
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/accel0", "/dev/kfd"))


def process_env(parallel: int, slot: int, cores: list[int], accelerator: bool,
                base: dict[str, str] | None = None) -> tuple[dict[str, str], list[int] | None]:
    """The environment (and CPU set) of the run in `slot` when `parallel` runs share this machine.

    CPU: each run gets `len(cores) // parallel` cores: its own CPU set (inherited affinity, which
    XLA's thread pools size themselves by), NPROC / PJRT_NPROC (XLA's intra-op pool size), the
    OpenMP / MKL / OpenBLAS thread counts, and with one core `--xla_cpu_multi_thread_eigen=false`.
    Accelerator: each run may allocate 1 / parallel of the device memory (XLA_PYTHON_CLIENT_MEM_FRACTION).
    """
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    if parallel <= 1:
        return env, None
    if accelerator:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / parallel:.2f}")
        return env, None
    per_run = max(1, len(cores) // parallel)
    for name in ("NPROC", "PJRT_NPROC", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(per_run)
    if per_run == 1 and "xla_cpu_multi_thread_eigen" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    chosen = cores[slot * per_run:(slot + 1) * per_run]
    return env, chosen if len(chosen) == per_run else None


def launcher_command(template: str, command: list[str], run: Run) -> tuple[list[str] | str, bool]:
    """(what to execute, through a shell?): `template` with {command}/{name}/{dir} substituted (a shell
    line), or without placeholders the template's words followed by the run's command."""
    if not any(p in template for p in ("{command}", "{name}", "{dir}")):
        return shlex.split(template) + command, False
    line = (template.replace("{command}", shlex.join(command)).replace("{name}", shlex.quote(run.name))
            .replace("{dir}", shlex.quote(str(run.run_dir))))
    return line, True


def _bpb_text(run_dir: Path) -> str:
    summary = rundir.read_summary(run_dir) or {}
    bpb = {m: v for m, v in (summary.get("bpb") or {}).items() if v is not None}
    return ("bpb " + " ".join(f"{m} {v:.4f}" for m, v in bpb.items())) if bpb else ""


@dataclass
class _Active:
    run: Run
    process: subprocess.Popen
    log: Any
    slot: int
    started: float


def run_sweep(sweep: Sweep, *, parallel: int | None = None, launcher: str | None = None,
              jobs_options: JobOptions | None = None, wait: bool = False,
              metric: str | None = None, maximize: bool = False,
              echo: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict[str, RunResult]:
    """Run every unfinished run (`parallel` processes at a time, through `launcher`, or as submitit
    jobs with `jobs_options`, waiting for them with `wait`), skip finished ones, record each result
    in OUT/sweep.json, then write the report. Returns name -> result."""
    parallel = default_parallel() if parallel is None else parallel
    if parallel < 1:
        raise SweepError(f"--parallel {parallel}: must be >= 1")
    if jobs_options is not None:
        jobs.check_options(jobs_options)
    results: dict[str, RunResult] = {}
    recorded = read_results(sweep.out)
    pending = []
    for run in sweep.runs:
        if sweep.finished(run):
            before = recorded.get(run.name)
            results[run.name] = RunResult(run.name, "completed", exit_code=0, skipped=True,
                                          wall_seconds=before.wall_seconds if before else None)
            echo(f"skipped  {run.name}: already completed ({_bpb_text(run.run_dir)})")
        else:
            pending.append(run)
    earlier = {name: r for name, r in recorded.items() if name not in results}  # until re-run
    write_sweep_json(sweep, {**earlier, **results})
    total, done = len(sweep.runs), len(results)
    how = (f"as {jobs_options.cluster} jobs" if jobs_options else f"through {launcher!r}" if launcher
           else f"{parallel} at a time")
    echo(f"sweep {sweep.name}: {total} runs, {done} already completed, {len(pending)} to run, {how}; out {sweep.out}")

    def record(run: Run, result: RunResult) -> None:
        results[run.name] = result
        write_sweep_json(sweep, {**earlier, **results})

    def finish(run: Run, result: RunResult) -> None:
        nonlocal done
        before = earlier.get(run.name)
        if before is not None and before.wall_seconds is not None and result.wall_seconds is not None:
            result.wall_seconds += before.wall_seconds  # every attempt at the run
        record(run, result)
        done += 1
        wall = f" in {result.wall_seconds:.1f}s" if result.wall_seconds is not None else ""
        detail = (_bpb_text(run.run_dir) if result.status == "completed" else
                  f"job {result.job_id}" if result.status in WAITING and result.job_id else
                  "" if result.status in WAITING else f"exit {result.exit_code}; log {run.run_dir / LOG_NAME}")
        failed = sum(r.status not in ("completed", *WAITING) for r in results.values())
        echo(f"[{done}/{total}] {result.status:<9} {run.name}{wall}: {detail}"
             + (f" ({failed} not completed so far)" if failed else ""))

    try:
        if jobs_options:
            _submit_all(sweep, pending, jobs_options, wait, record, finish, echo)
        elif launcher:
            _launch_all(sweep, pending, launcher, finish, echo)
        else:
            _run_local(sweep, pending, parallel, finish, lambda line: echo(f"[{done}/{total}] {line}"))
    finally:
        write_sweep_json(sweep, {**earlier, **results})
    table = report(sweep, metric=metric, maximize=maximize)
    echo("\n" + table.markdown() + f"\nwritten: {sweep.out / 'summary.md'}, {sweep.out / 'summary.csv'}")
    return results


def _start(sweep: Sweep, run: Run, env: dict, cpus: list[int] | None) -> tuple[subprocess.Popen, Any]:
    prepare_run_dir(run, sweep.configs[run.name])
    env = {**env, SWEEP_PID_VAR: str(os.getpid())}  # the run's owner: see distill.sweep.ownership
    command = sweep.command(run)
    log = open(run.run_dir / LOG_NAME, "a")  # noqa: SIM115 (open while the run writes to it)
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(command)}\n")
    log.flush()
    previous = os.sched_getaffinity(0) if cpus and hasattr(os, "sched_setaffinity") else None
    try:
        if previous is not None:  # the child inherits this thread's CPU set
            os.sched_setaffinity(0, cpus)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True,
                                   preexec_fn=dies_with_parent())  # noqa: PLW1509 (prctl only: takes no lock)
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)
    return process, log


class _Stop(Exception):
    """SIGTERM reached the sweep (e.g. its own job was preempted)."""


def _raise_stop(signum, frame):
    raise _Stop()


def _run_local(sweep: Sweep, pending: list[Run], parallel: int, finish, echo) -> None:
    """`parallel` runs at a time. The runs live in their own sessions, so a Ctrl-C (or SIGTERM) reaches
    the sweep only, which passes one SIGINT (SIGTERM) on: each run checkpoints the step it is at and
    stops; a second Ctrl-C passes a second SIGINT, which stops the runs at once."""
    cores, accelerator = available_cores(), _has_accelerator()
    queue, active = list(pending), []
    free_slots = list(range(parallel))
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_stop) if main else None
    try:
        while queue or active:
            while queue and free_slots:
                run, slot = queue.pop(0), free_slots.pop(0)
                stop_orphan(run.run_dir, echo)
                env, cpus = process_env(parallel, slot, cores, accelerator)
                process, log = _start(sweep, run, env, cpus)
                active.append(_Active(run, process, log, slot, time.time()))
                echo(f"start    {run.name}" + (f" (cpus {','.join(map(str, cpus))})" if cpus else ""))
            time.sleep(0.2)
            for item in [a for a in active if a.process.poll() is not None]:
                active.remove(item)
                free_slots.append(item.slot)
                item.log.close()
                finish(item.run, result_of_exit(item.run, item.process.returncode, item.started))
    except (KeyboardInterrupt, _Stop) as stop:
        signum = signal.SIGTERM if isinstance(stop, _Stop) else signal.SIGINT
        echo(f"stopping {len(active)} running run(s) at their next step (Ctrl-C again: at once); "
             "run the sweep again to resume them")
        _stop_all(active, signum)
        for item in active:
            item.log.close()
            finish(item.run, result_of_exit(item.run, item.process.returncode, item.started))
        raise KeyboardInterrupt from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _stop_all(active: list[_Active], signum: int) -> None:
    for item in active:
        if item.process.poll() is None:
            item.process.send_signal(signum)
    try:
        for item in active:
            item.process.wait()
    except KeyboardInterrupt:
        for item in active:
            if item.process.poll() is None:
                item.process.send_signal(signal.SIGINT)  # the second: the run stops at once
        for item in active:
            item.process.wait()


def _launch_all(sweep: Sweep, pending: list[Run], launcher: str, finish, echo) -> None:
    """Hand each run to `launcher` (e.g. sbatch): the run counts as submitted when it exits 0 (completed
    when the launcher waited for the run and its summary says so)."""
    for run in pending:
        prepare_run_dir(run, sweep.configs[run.name])
        target, shell = launcher_command(launcher, sweep.command(run), run)
        echo(f"launch   {run.name}: {target if shell else shlex.join(target)}")
        started = time.time()
        with open(run.run_dir / LOG_NAME, "a") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} launcher $ {target if shell else shlex.join(target)}\n")
            log.flush()
            try:
                code = subprocess.run(target, shell=shell, check=False, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL).returncode
            except OSError as error:
                log.write(f"launcher could not start: {error}\n")
                code = 127
        status = "completed" if code == 0 and sweep.finished(run) else "submitted" if code == 0 else "failed"
        tail = [] if status == "completed" else log_tail(run.run_dir)
        wall = None if status == "submitted" else time.time() - started  # the run's time is not the launcher's
        finish(run, RunResult(run.name, status, exit_code=code, wall_seconds=wall, log_tail=tail))



def _submit_all(sweep: Sweep, pending: list[Run], options: JobOptions, wait: bool, record, finish, echo) -> None:
    """Submit each run as a submitit job (a run whose job is still queued or running is not submitted
    twice); with `wait`, wait for every job and record how its run ended."""
    waiting = []
    for run in pending:
        state = jobs.state_of(run)
        if state is not None:
            result = RunResult(run.name, state, job_id=_job_id(run))
            echo(f"{state:<9} {run.name}: job {result.job_id} (not submitted again)")
        else:
            result = jobs.submit(sweep, run, options)
            echo(f"submitted {run.name}: job {result.job_id}, log {run.run_dir / LOG_NAME}")
        if wait:
            record(run, result)
            waiting.append(run)
        else:
            finish(run, result)
    while waiting:
        time.sleep(1.0)
        for run in list(waiting):
            result = jobs.result_of_job(run)
            if result is None and jobs.state_of(run) is None:  # gone without recording its end
                gone = f"job ended without a result (cancelled, time limit, node failure?): see {run.run_dir / jobs.JOBS_DIR}"
                result = RunResult(run.name, "failed", job_id=_job_id(run), log_tail=[*log_tail(run.run_dir), gone])
            if result is not None:
                waiting.remove(run)
                finish(run, result)


def _job_id(run: Run) -> str | None:
    return (read_job(run.run_dir) or {}).get("job_id")
