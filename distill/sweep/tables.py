"""The sweep's tables (pure): a row per run, groups over seeds, the Markdown and CSV files."""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill import rundir
from distill.sweep.spec import SEED_KEY, SweepError, format_value, short_names, suggest


@dataclass
class Row:
    name: str
    values: dict[str, Any]
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    wall_seconds: float | None = None  # every attempt the sweep made at the run (else the run's last command)
    exit_code: int | None = None
    note: str = ""
    train_seconds: float | None = None  # the run's training loop over all its commands (its summary.json)


@dataclass
class Group:
    values: dict[str, Any]  # the configuration (every varied value but the seed)
    runs: int  # runs in the group
    n: dict[str, int]  # metric -> runs with a value
    mean: dict[str, float]
    std: dict[str, float | None]  # sample standard deviation; None when n < 2


def diff_column(student: str, control: str) -> str:
    return f"{student}_vs_{control}_pct"


def summary_metrics(summary: dict) -> dict[str, float]:
    """`bpb/<model>` for every model, `<student>_vs_<control>_pct` (100 (s - c) / c, negative is better)
    for each non-control student against its own control (`distill.rundir.control_for`, as the run's
    final table pairs them), then every final eval metric."""
    bpb = {m: v for m, v in (summary.get("bpb") or {}).items() if v is not None}
    metrics = {f"bpb/{m}": float(v) for m, v in bpb.items()}
    metrics.update({diff_column(student, control): pct for student, control, pct in rundir.comparisons(summary)})
    metrics.update({k: float(v) for k, v in (summary.get("final") or {}).items() if isinstance(v, (int, float))})
    return metrics


def default_metric(summary: dict) -> str:
    """The first non-control student's bits per byte (the teacher's when every student is a control)."""
    controls = set(summary.get("controls") or [])
    students = [m for m in summary.get("bpb") or {} if m != "teacher" and m not in controls]
    return f"bpb/{students[0] if students else 'teacher'}"


def resolve_metric(metric: str, columns) -> str:
    """A column name; a model name means its bits per byte."""
    columns = list(columns)
    if metric in columns:
        return metric
    if f"bpb/{metric}" in columns:
        return f"bpb/{metric}"
    raise SweepError(f"--metric {metric!r}: not a metric of the runs.{suggest(metric, columns)} "
                     f"Known: {', '.join(columns)}")


def sort_rows(rows: list[Row], metric: str, maximize: bool = False) -> list[Row]:
    """Best first by `metric` (lowest, or highest with `maximize`); runs without it last, in run order."""
    sign = -1 if maximize else 1
    return sorted(rows, key=lambda r: (metric not in r.metrics, sign * r.metrics.get(metric, 0.0)))


def group_over_seeds(rows: list[Row], metric: str, maximize: bool = False) -> list[Group]:
    """Mean and sample std of every metric over the runs that differ only by train.seed, best first."""
    groups: dict[str, tuple[dict, list[Row]]] = {}
    for row in rows:
        values = {k: v for k, v in row.values.items() if k != SEED_KEY}
        groups.setdefault(json.dumps(values, sort_keys=True, default=repr), (values, []))[1].append(row)
    result = []
    for values, members in groups.values():
        columns = list(dict.fromkeys(k for r in members for k in r.metrics))
        samples = {c: [r.metrics[c] for r in members if c in r.metrics] for c in columns}
        result.append(Group(values=values, runs=len(members), n={c: len(s) for c, s in samples.items()},
                            mean={c: statistics.fmean(s) for c, s in samples.items()},
                            std={c: statistics.stdev(s) if len(s) > 1 else None for c, s in samples.items()}))
    sign = -1 if maximize else 1
    return sorted(result, key=lambda g: (metric not in g.mean, sign * g.mean.get(metric, 0.0)))


def _cell(value: Any) -> str:
    return format_value(value) if not isinstance(value, str) else value


def _label(column: str) -> str:
    """A Markdown header: `distilled_vs_control_pct` -> `distilled vs control`."""
    return column[:-4].replace("_vs_", " vs ") if column.endswith("_pct") else column


def _number(column: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}%" if column.endswith("_pct") else f"{value:.4f}"


@dataclass
class Report:
    metric: str
    maximize: bool
    axes: tuple[str, ...]
    rows: list[Row]  # best first
    groups: list[Group]  # best first; empty unless the sweep has seeds
    headline: list[str]  # the metric columns of the tables: bpb per model, students vs control

    def markdown(self) -> str:
        short = short_names(self.axes)
        order = "highest" if self.maximize else "lowest"
        lines = [f"Runs, best first by {self.metric} ({order} first):", ""]
        head = ["#", "run", *(short[a] for a in self.axes), "status", *map(_label, self.headline), "wall (s)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, row in enumerate(self.rows, 1):
            status = row.status + (f" (exit {row.exit_code})" if row.status == "failed" and row.exit_code else "")
            wall = "-" if row.wall_seconds is None else f"{row.wall_seconds:.0f}"
            cells = [str(i), row.name, *(_cell(row.values.get(a)) for a in self.axes), status,
                     *(_number(c, row.metrics.get(c)) for c in self.headline), wall]
            lines.append("| " + " | ".join(cells) + " |")
        if self.groups:
            keys = [a for a in self.axes if a != SEED_KEY]
            lines += ["", f"Over seeds (mean +- sample std, n = runs with a result), best first by {self.metric}:", ""]
            head = [*(short[a] for a in keys), "n", *map(_label, self.headline)]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for g in self.groups:
                n = max(g.n.values(), default=0)
                cells = [*(_cell(g.values.get(a)) for a in keys), f"{n}/{g.runs}" if n != g.runs else str(n)]
                for c in self.headline:
                    std = g.std.get(c)
                    cells.append("-" if c not in g.mean else _number(c, g.mean[c]) + (
                        "" if std is None else f" +- {_number(c, std).lstrip('+')}"))
                lines.append("| " + " | ".join(cells) + " |")
        failed = [r for r in self.rows if r.note]
        if failed:
            lines += ["", "Not completed:", ""] + [f"- {r.name}: {r.status}: {r.note}" for r in failed]
        return "\n".join(lines) + "\n"

    def write_csv(self, path: Path) -> None:
        columns = list(dict.fromkeys([*self.headline, *(k for r in self.rows for k in r.metrics)]))
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["rank", "name", *self.axes, "status", "exit_code", "wall_seconds", "train_seconds",
                             *columns])
            for i, row in enumerate(self.rows, 1):
                writer.writerow([i, row.name, *(_cell(row.values.get(a)) for a in self.axes), row.status,
                                 "" if row.exit_code is None else row.exit_code,
                                 "" if row.wall_seconds is None else f"{row.wall_seconds:.1f}",
                                 "" if row.train_seconds is None else f"{row.train_seconds:.1f}",
                                 *("" if c not in row.metrics else repr(row.metrics[c]) for c in columns)])

    def write_group_csv(self, path: Path) -> None:
        keys = [a for a in self.axes if a != SEED_KEY]
        columns = list(dict.fromkeys(c for g in self.groups for c in g.mean))
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*keys, "runs", *(f"{c}{s}" for c in columns for s in ("_mean", "_std", "_n"))])
            for g in self.groups:
                cells = [*(_cell(g.values.get(a)) for a in keys), g.runs]
                for c in columns:
                    std = g.std.get(c)
                    cells += ["" if c not in g.mean else repr(g.mean[c]), "" if std is None else repr(std), g.n.get(c, 0)]
                writer.writerow(cells)


def build_report(axes, rows: list[Row], summaries: list[dict], metric: str | None = None,
                 maximize: bool = False) -> Report:
    """Rows sorted by `metric` (default: the first non-control student's bpb) and the groups over seeds."""
    columns = list(dict.fromkeys(k for r in rows for k in r.metrics))
    metric = resolve_metric(metric, columns) if metric and columns else (
        metric or (default_metric(summaries[0]) if summaries else "bpb/teacher"))
    headline = [c for c in columns if c.startswith("bpb/") or c.endswith("_pct")]
    if metric not in headline:
        headline.append(metric)
    groups = group_over_seeds(rows, metric, maximize) if SEED_KEY in axes else []
    return Report(metric=metric, maximize=maximize, axes=tuple(axes), rows=sort_rows(rows, metric, maximize),
                  groups=groups, headline=headline)
