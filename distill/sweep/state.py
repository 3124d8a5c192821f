"""The resolved sweep (every run's overrides, directory and built config) and what is on disk
about it: each run's state, OUT/sweep.json (the runs and their last results) and the report
files (OUT/summary.csv, OUT/summary_seeds.csv, OUT/summary.md)."""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill import rundir
from distill.config import Config, build_config, save_config
from distill.configtools import load_yaml
from distill.errors import ConfigError
from distill.experiment import resolve
from distill.guards import EXIT_CODES
from distill.sweep.spec import SweepError, SweepSpec, expand, format_value, parse_spec, run_names
from distill.sweep.tables import Report, Row, build_report, diff_column, resolve_metric, summary_metrics

# ----------------------------------------------------------------------------- the resolved sweep

@dataclass(frozen=True)
class Run:
    """One run: its name, the varied values, every override (run.dir last) and its directory."""

    name: str
    values: dict[str, Any]
    overrides: dict[str, Any]
    run_dir: Path

    @property
    def args(self) -> list[str]:
        """The overrides as `distill run` arguments: `key=value`."""
        return [f"{key}={format_value(value)}" for key, value in self.overrides.items()]


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path | None  # the sweep file
    base: str  # the base config, as given (relative paths are from the current directory)
    out: Path  # OUT: every run's directory is OUT/<name>
    axes: tuple[str, ...]
    runs: tuple[Run, ...]
    configs: dict[str, Config] = field(default_factory=dict, repr=False, compare=False)  # name -> resolved

    def command(self, run: Run, python: str | None = None) -> list[str]:
        """The process that runs (or resumes) `run`."""
        return [python or sys.executable, "-m", "distill.cli", "run", self.base, *run.args]

    def finished(self, run: Run) -> bool:
        """`run` completed and is the same run as this sweep's (`distill.rundir.finished_summary`): a
        finished run of an edited sweep is not skipped, and `distill run` then refuses its directory,
        naming the changed keys."""
        return rundir.finished_summary(self.configs[run.name]) is not None


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return load_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise SweepError(f"{what} {path}: not valid YAML ({error})") from None


def _base_file(base: str, sweep_path: Path | None) -> Path:
    path = Path(base)
    if path.is_file():
        return path
    hint = ""
    if sweep_path is not None and not path.is_absolute() and (sweep_path.parent / path).is_file():
        hint = (f"; it exists relative to the sweep file, but base paths are relative to the current directory: "
                f"write base: {sweep_path.parent / path}")
    raise SweepError(f"base={base!r}: no such file (relative paths are from the current directory, {Path.cwd()}; "
                     f"run from the repository root or give an absolute path){hint}")


def build_sweep(spec: SweepSpec, out: str | Path, path: Path | None = None) -> Sweep:
    """Expand `spec` and build every run's config; any error names the run and the key, before anything runs."""
    raw = _read_yaml(_base_file(spec.base, path), "base config")
    if not isinstance(raw, dict):
        raise SweepError(f"base={spec.base!r}: expected a run config (a mapping of sections)")
    out = Path(out)
    points = expand(spec)
    runs, configs = [], {}
    for name, point in zip(run_names(points, spec.axes), points):
        run = Run(name=name, values=point, run_dir=out / name,
                  overrides={**spec.overrides, **point, "run.dir": str(out / name)})
        try:
            configs[name] = build_config(raw, run.args)  # the very strings the run process will parse
            resolve(configs[name])  # and what they point at, the models against each other
        except ConfigError as error:
            raise SweepError(f"run {name}: {error}") from None
        runs.append(run)
    return Sweep(name=spec.name, path=path, base=spec.base, out=out, axes=spec.axes, runs=tuple(runs),
                 configs=configs)


def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    """Read, expand and validate a sweep file; `out` defaults to runs/sweeps/<file stem>."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path}: not found")
    spec = parse_spec(_read_yaml(path, "sweep file"), path.stem)
    return build_sweep(spec, out if out is not None else Path("runs") / "sweeps" / path.stem, path)


# ----------------------------------------------------------------------------- run state on disk

LOG_NAME = "sweep.log"  # OUT/<name>/sweep.log: the run's output, every attempt appended
JOB_FILE = "job.json"  # OUT/<name>/job.json: the run's scheduler job (`distill.sweep.jobs`)
TAIL_LINES = 20


def log_tail(run_dir: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        return (run_dir / LOG_NAME).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def prepare_run_dir(run: Run, cfg: Config) -> None:
    """Create OUT/<name> with its config.yaml (as `distill run` writes it) so the log can live there:
    `distill run` takes a directory with a config.yaml for its own and refuses other non-empty ones."""
    if (run.run_dir / rundir.CONFIG_FILE).is_file() or (run.run_dir.exists() and any(run.run_dir.iterdir())):
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.run_dir / rundir.CONFIG_FILE)


def write_job(run_dir: Path, **fields) -> None:
    """Update OUT/<name>/job.json (atomically): `state` queued | running | finished, `job_id`,
    `cluster`, `exit_code`, `started` / `ended` (epoch seconds), `host`."""
    record = {**(read_job(run_dir) or {}), **fields}
    scratch = run_dir / f".{JOB_FILE}.tmp"
    scratch.write_text(json.dumps(record, indent=2))
    scratch.replace(run_dir / JOB_FILE)


def read_job(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None


def result_of_exit(run: Run, code: int, started: float, ended: float | None = None) -> RunResult:
    """What a run's process (started at `started`) exiting with `code` means: completed (exit 0 and
    finished), the status of the summary it wrote (interrupted, preempted, nonfinite, ...), or failed."""
    run_dir, ended = run.run_dir, time.time() if ended is None else ended
    summary_file = run_dir / rundir.SUMMARY_FILE
    fresh = summary_file.is_file() and summary_file.stat().st_mtime >= started - 1
    own = (rundir.read_summary(run_dir) or {}).get("status") if fresh else None
    if code == 0 and rundir.completed(run_dir) is not None:
        status = "completed"
    elif own not in (None, "completed"):
        status = own
    else:
        status = "failed"
    tail = [] if status == "completed" else log_tail(run_dir)
    return RunResult(run.name, status, exit_code=code, wall_seconds=ended - started, log_tail=tail)

@dataclass
class RunResult:
    name: str
    status: str  # completed | failed | submitted, or a run's own summary status: interrupted, preempted, ...
    exit_code: int | None = None
    wall_seconds: float | None = None  # the run's processes, summed over every attempt of the sweep
    skipped: bool = False  # finished before this invocation
    job_id: str | None = None  # the scheduler's job (submitit launchers)
    log_tail: list[str] = field(default_factory=list)  # the last lines of OUT/<name>/sweep.log when not completed


def write_sweep_json(sweep: Sweep, results: dict[str, RunResult]) -> Path:
    """OUT/sweep.json: the resolved runs (values, overrides, command) and the last known results."""
    data = {"name": sweep.name, "sweep_file": str(sweep.path) if sweep.path else None, "base": sweep.base,
            "out": str(sweep.out), "axes": list(sweep.axes),
            "runs": [{"name": r.name, "values": r.values, "overrides": r.overrides, "run_dir": str(r.run_dir),
                      "command": shlex.join(sweep.command(r)),
                      "result": vars(results[r.name]) if r.name in results else None} for r in sweep.runs]}
    sweep.out.mkdir(parents=True, exist_ok=True)
    target = sweep.out / "sweep.json"
    scratch = target.with_suffix(".json.tmp")
    scratch.write_text(json.dumps(data, indent=2, default=str))
    scratch.replace(target)
    return target


def read_results(out: Path) -> dict[str, RunResult]:
    try:
        data = json.loads((Path(out) / "sweep.json").read_text())
    except (OSError, ValueError):
        return {}
    known = set(RunResult.__dataclass_fields__)
    return {r["name"]: RunResult(**{k: v for k, v in r["result"].items() if k in known})
            for r in data.get("runs", []) if r.get("result")}


# ----------------------------------------------------------------------------- report from disk

def collect_rows(sweep: Sweep) -> tuple[list[Row], list[dict]]:
    """One row per run from its summary.json and the sweep's recorded results; the summaries found."""
    recorded = read_results(sweep.out)
    rows, summaries = [], []
    for run in sweep.runs:
        summary = rundir.read_summary(run.run_dir)
        result = recorded.get(run.name)
        if sweep.finished(run):
            status = "completed"
        elif rundir.completed(run.run_dir) is not None:
            status, result = "stale", None
        elif (job := _job_result(run, result)) is not None:
            status, result = job.status, job
        elif result is not None:
            status = result.status
        else:
            status = summary.get("status", "pending") if summary else "pending"
        row = Row(name=run.name, values=run.values, status=status, exit_code=_exit_code(status, result),
                  wall_seconds=result.wall_seconds if result and result.wall_seconds is not None else (
                      (summary or {}).get("wall_seconds") if status == "completed" else None),
                  train_seconds=(summary or {}).get("train_seconds") if status != "stale" else None)
        if status == "completed" and summary:
            row.metrics = summary_metrics(summary)
            summaries.append(summary)
        elif status == "stale":
            row.note = f"{run.run_dir} holds a finished run of another config; delete it or use another --dir"
        elif result is not None and result.log_tail:
            row.note = next((line.strip() for line in reversed(result.log_tail) if line.strip()), "")
        elif result is not None and result.job_id:
            row.note = f"job {result.job_id}"
        rows.append(row)
    return rows, summaries


def _job_result(run: Run, recorded: RunResult | None) -> RunResult | None:
    """What the run's job.json knows beyond the sweep's record: queued, running, or how it ended."""
    job = read_job(run.run_dir)
    if job is None or (recorded is not None and recorded.status not in ("queued", "running")):
        return None
    if job.get("state") == "finished":
        return result_of_exit(run, job["exit_code"], job.get("started") or job["ended"], job["ended"])
    return RunResult(run.name, job.get("state", "queued"), job_id=job.get("job_id"))


def _exit_code(status: str, result: RunResult | None) -> int | None:
    """The run's last exit code: as recorded by the sweep, else the one its summary's status means
    (a completed run exits 0, an interrupted one 130, ...: distill.guards.EXIT_CODES)."""
    if status == "completed":
        return 0
    if result is not None and result.exit_code is not None:
        return result.exit_code
    return EXIT_CODES.get(status)


def report(sweep: Sweep, metric: str | None = None, maximize: bool = False, write: bool = True) -> Report:
    """The sweep's table: OUT/summary.csv (per run), OUT/summary_seeds.csv (over seeds) and OUT/summary.md."""
    rows, summaries = collect_rows(sweep)
    table = build_report(sweep.axes, rows, summaries, metric, maximize)
    if write:
        sweep.out.mkdir(parents=True, exist_ok=True)
        table.write_csv(sweep.out / "summary.csv")
        if table.groups:
            table.write_group_csv(sweep.out / "summary_seeds.csv")
        (sweep.out / "summary.md").write_text(f"# Sweep {sweep.name}\n\n" + table.markdown())
    return table


# ----------------------------------------------------------------------------- before running

def metric_names(sweep: Sweep) -> list[str]:
    """The report columns every run will have (from the configs): bpb per model and each student
    against its own control (`distill.rundir.control_for`)."""
    names = []
    for cfg in sweep.configs.values():
        controls = [s.name for s in cfg.students if s.control]
        names += [f"bpb/{m}" for m in ["teacher", *(s.name for s in cfg.students)]]
        names += [diff_column(s.name, rundir.control_for(s.name, controls))
                  for s in cfg.students if controls and not s.control]
    return list(dict.fromkeys(names))


def check_metric(sweep: Sweep, metric: str | None) -> None:
    """Fail before running on a `--metric` no run will report (any `eval/...` key is accepted)."""
    if metric and not metric.startswith("eval/"):
        resolve_metric(metric, metric_names(sweep))


def describe(sweep: Sweep) -> str:
    """The runs and their exact commands (`--dry-run`)."""
    lines = [f"sweep {sweep.name}: {len(sweep.runs)} runs over {', '.join(sweep.axes)}; out {sweep.out}"]
    for run in sweep.runs:
        state = " (completed: would be skipped)" if sweep.finished(run) else ""
        lines += [f"{run.name}{state}", f"  {shlex.join(sweep.command(run))}"]
    return "\n".join(lines)
