"""Sweeps: many runs of one base config over dotted keys, resumable, with a summary table.

A sweep file (YAML, docs/sweeps.md)::

    base: experiments/quickstart.yaml          # relative paths are from the current directory
    overrides: {train.steps: 400}              # fixed for every run
    grid: {loss.temperature: [1.0, 2.0, 4.0]}  # cartesian product
    zip: {optim.learning_rate: [1.0e-3, 3.0e-3], optim.warmup_steps: [20, 50]}  # paired lists
    random: {count: 4, seed: 0, keys: {loss.weighting.alpha: {uniform: [0.2, 0.8]}}}
    seeds: [0, 1, 2]                           # repeats: train.seed

```python
sweep = load_sweep("experiments/sweeps/temperature.yaml")   # every run's config built and checked
[(run.name, run.run_dir) for run in sweep.runs]
results = run_sweep(sweep, parallel=2)                       # skips finished runs, resumes the others
table = report(sweep)                                        # OUT/summary.csv, OUT/summary.md
```

The pure part (parsing, expansion, naming, aggregation) is separate from the process handling
(`run_sweep`), which starts one `python -m distill.cli run BASE k=v ... run.dir=OUT/<name>` per run.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import itertools
import json
import math
import os
import random as _random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.config import Config, build_config, save_config
from distill.errors import ConfigError

SEED_KEY = "train.seed"
SECTIONS = ("name", "base", "overrides", "grid", "zip", "random", "seeds")
DISTRIBUTIONS = ("uniform", "log_uniform", "choice")
LOG_NAME = "sweep.log"
TAIL_LINES = 20


class SweepError(ConfigError):
    """A bad sweep file or a run whose config does not build; the message names the field and the fix."""


# ----------------------------------------------------------------------------- the sweep file

@dataclass(frozen=True)
class RandomAxis:
    """`random:`: `count` points, each drawing every key from its distribution, reproducible by `seed`."""

    count: int
    seed: int
    keys: dict[str, tuple[str, Any]]  # dotted key -> (distribution, its argument)


@dataclass(frozen=True)
class SweepSpec:
    """The sweep file as written, checked for shape (the keys are checked later, by building configs)."""

    name: str
    base: str
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    zip: dict[str, list] = field(default_factory=dict)
    random: RandomAxis | None = None
    seeds: tuple[int, ...] | None = None

    @property
    def axes(self) -> tuple[str, ...]:
        """The varied keys, in name order: grid, zip, random, then train.seed."""
        keys = [*self.grid, *self.zip, *(self.random.keys if self.random else {})]
        return tuple(keys + [SEED_KEY] if self.seeds is not None else keys)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _mapping(raw, where: str, example: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise SweepError(f"{where}: expected a mapping of dotted keys, e.g. {example}")
    return dict(raw)


def _value_lists(raw, where: str, example: str) -> dict[str, list]:
    lists = _mapping(raw, where, example)
    for key, values in lists.items():
        if not isinstance(values, list):
            raise SweepError(f"{where}.{key}={values!r}: expected a list of values, e.g. {example}")
        if not values:
            raise SweepError(f"{where}.{key}: an empty list gives no runs; give at least one value")
    return lists


def _random_axis(raw) -> RandomAxis | None:
    if raw is None:
        return None
    example = "{count: 8, seed: 0, keys: {optim.learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}}}"
    if not isinstance(raw, dict):
        raise SweepError(f"random: expected a mapping, e.g. {example}")
    for key in raw:
        if key not in ("count", "seed", "keys"):
            raise SweepError(f"random.{key}: unknown key.{_suggest(str(key), ('count', 'seed', 'keys'))} "
                             "Known keys: count, keys, seed")
    count, seed = raw.get("count"), raw.get("seed", 0)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SweepError(f"random.count={count!r}: the number of random points, an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SweepError(f"random.seed={seed!r}: an integer (the same seed draws the same points)")
    keys = {}
    for key, spec in _mapping(raw.get("keys"), "random.keys", example).items():
        where = f"random.keys.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise SweepError(f"{where}={spec!r}: one of {{uniform: [lo, hi]}}, {{log_uniform: [lo, hi]}}, "
                             "{choice: [v1, v2, ...]}")
        kind, arg = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise SweepError(f"{where}.choice={arg!r}: a non-empty list of values")
        else:
            if (not isinstance(arg, list) or len(arg) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)):
                raise SweepError(f"{where}.{kind}={arg!r}: two numbers [lo, hi] (write floats as 1.0e-3: "
                                 "YAML reads 1e-3 as a string)")
            if not arg[0] < arg[1]:
                raise SweepError(f"{where}.{kind}={arg!r}: needs lo < hi")
            if kind == "log_uniform" and arg[0] <= 0:
                raise SweepError(f"{where}.log_uniform={arg!r}: needs 0 < lo")
        keys[key] = (kind, arg)
    if not keys:
        raise SweepError(f"random.keys: at least one key to draw, e.g. {example}")
    return RandomAxis(count=count, seed=seed, keys=keys)


def _seeds(raw) -> tuple[int, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        raise SweepError(f"seeds={raw!r}: a non-empty list of integers (train.seed of each repeat), e.g. [0, 1, 2]")
    if len(set(raw)) != len(raw):
        raise SweepError(f"seeds={raw!r}: repeated seeds would be identical runs; list each seed once")
    return tuple(raw)


def parse_spec(raw, name: str) -> SweepSpec:
    """A `SweepSpec` from a parsed sweep file; `name` (the file stem) unless the file gives one."""
    if not isinstance(raw, dict):
        raise SweepError(f"the sweep file: expected a mapping with {', '.join(SECTIONS)}")
    for key in raw:
        if key not in SECTIONS:
            raise SweepError(f"{key}: unknown key of the sweep file.{_suggest(str(key), SECTIONS)} "
                             f"Known keys: {', '.join(SECTIONS)}")
    base = raw.get("base")
    if not isinstance(base, str) or not base:
        raise SweepError("base: required, the path of the run config every run starts from, "
                         "e.g. base: experiments/quickstart.yaml")
    zipped = _value_lists(raw.get("zip"), "zip", "{optim.learning_rate: [1.0e-3, 3.0e-3], optim.warmup_steps: [20, 50]}")
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        raise SweepError("zip: the lists must have equal lengths (the i-th values go together), got "
                         + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
    spec = SweepSpec(
        name=str(raw.get("name") or name), base=base,
        overrides=_mapping(raw.get("overrides"), "overrides", "{train.steps: 400}"),
        grid=_value_lists(raw.get("grid"), "grid", "{loss.temperature: [1.0, 2.0]}"),
        zip=zipped, random=_random_axis(raw.get("random")), seeds=_seeds(raw.get("seeds")))
    _check_keys(spec)
    return spec


def _check_keys(spec: SweepSpec) -> None:
    if not spec.axes:
        raise SweepError("the sweep varies nothing: give grid, zip, random or seeds")
    owner: dict[str, str] = {}
    sections = [("overrides", spec.overrides), ("grid", spec.grid), ("zip", spec.zip),
                ("random.keys", spec.random.keys if spec.random else {}),
                ("seeds", {SEED_KEY: None} if spec.seeds is not None else {})]
    for section, keys in sections:
        for key in keys:
            if key == "run.dir":
                raise SweepError(f"{section}.run.dir: the sweep sets each run's directory (OUT/<name>); "
                                 "use --dir OUT to place the sweep")
            if key in owner:
                fix = "; drop seeds or the key" if SEED_KEY == key else ""
                raise SweepError(f"{key}: given in both {owner[key]} and {section}; give it once{fix}")
            owner[key] = section


# ----------------------------------------------------------------------------- expansion and names

def draw_random(axis: RandomAxis) -> list[dict[str, Any]]:
    """`axis.count` points; floats are rounded to 4 significant digits (kept inside [lo, hi])."""
    rng = _random.Random(axis.seed)
    points = []
    for _ in range(axis.count):
        point = {}
        for key, (kind, arg) in axis.keys.items():
            if kind == "choice":
                point[key] = rng.choice(arg)
                continue
            lo, hi = float(arg[0]), float(arg[1])
            x = rng.uniform(lo, hi) if kind == "uniform" else math.exp(rng.uniform(math.log(lo), math.log(hi)))
            point[key] = min(max(float(f"{x:.4g}"), lo), hi)
        points.append(point)
    return points


def expand(spec: SweepSpec) -> list[dict[str, Any]]:
    """The varied values of every run, in run order: seeds outermost (so a partly done sweep already
    covers every configuration at the first seed), then grid (last key fastest), zip, random."""
    grid = [dict(zip(spec.grid, values)) for values in itertools.product(*spec.grid.values())]
    length = len(next(iter(spec.zip.values()))) if spec.zip else 1
    zipped = [{key: values[i] for key, values in spec.zip.items()} for i in range(length)]
    drawn = draw_random(spec.random) if spec.random else [{}]
    configs = [{**g, **z, **r} for g in grid for z in zipped for r in drawn]
    if spec.seeds is None:
        return configs
    return [{**c, SEED_KEY: seed} for seed in spec.seeds for c in configs]


def format_value(value: Any) -> str:
    """`value` as YAML text that reads back to the same value (how an override is written)."""
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        text = f"{mantissa}.0e{exponent}" if exponent and "." not in mantissa else text  # PyYAML wants 1.0e-05
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(format_value(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{format_value(k)}: {format_value(v)}" for k, v in value.items()) + "}"
    elif isinstance(value, str):
        text = value if value and value == value.strip() and _reads_back(value, value) else json.dumps(value)
    else:
        text = yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
    if not _reads_back(text, value):
        raise SweepError(f"value {value!r}: cannot be written as a command-line override; use a plain "
                         "number, string, boolean, list or mapping")
    return text


def _reads_back(text: str, value: Any) -> bool:
    try:
        back = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    same = back == value or (isinstance(value, float) and math.isnan(value) and isinstance(back, float) and math.isnan(back))
    return same and type(back) is type(value) if not isinstance(value, tuple) else back == list(value)


def short_names(keys) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key shares: `loss.temperature` -> `temperature`."""
    keys = list(keys)
    depth = dict.fromkeys(keys, 1)
    while True:
        suffix = {k: ".".join(k.split(".")[-depth[k]:]) for k in keys}
        clashes = [k for k in keys if list(suffix.values()).count(suffix[k]) > 1]
        if not clashes:
            return suffix
        for k in clashes:
            depth[k] += 1


def _safe(text: str) -> str:
    """Runs of characters other than letters, digits and `._+-` become one `-` (a leading minus sign stays)."""
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", text)
    return (safe if text.startswith("-") else safe.lstrip("-")).rstrip("-") or "x"


def _digest(values: dict) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=repr).encode()).hexdigest()[:6]


def run_names(points: list[dict[str, Any]], axes) -> list[str]:
    """A readable, filesystem-safe, unique name per run: `temperature-2.0_seed-1`."""
    short = short_names(axes)
    names = []
    for point in points:
        name = "_".join(f"{_safe(short[key])}-{_safe(format_value(point[key]))}" for key in axes) or "run"
        names.append(name if len(name) <= 120 else f"{name[:110]}_{_digest(point)}")
    for name in {n for n in names if names.count(n) > 1}:
        names = [f"{n}_{_digest(p)}" if n == name else n for n, p in zip(names, points)]
    return names


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
        """`run` completed with this sweep's config (a finished run of an edited sweep is not skipped:
        `distill run` then refuses its directory, naming the changed keys)."""
        return is_finished(run.run_dir) and holds_config(run.run_dir, self.configs[run.name])


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
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

def read_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def is_finished(run_dir: Path) -> bool:
    """The run completed: its summary says so and its final step's checkpoint is there."""
    summary = read_summary(run_dir)
    return bool(summary and summary.get("status") == "completed"
                and (Path(run_dir) / "checkpoints" / str(summary.get("steps"))).is_dir())


def holds_config(run_dir: Path, cfg: Config) -> bool:
    """`run_dir/config.yaml` is `cfg` (run.dir aside): the directory's run is this run, not an older sweep's."""
    try:
        previous = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    resolved = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    for tree in (previous, resolved):
        if isinstance(tree, dict) and isinstance(tree.get("run"), dict):
            tree["run"].pop("dir", None)
    return previous == resolved


@dataclass
class RunResult:
    name: str
    status: str  # completed | failed | submitted, or a run's own summary status: interrupted, preempted, ...
    exit_code: int | None = None
    wall_seconds: float | None = None
    skipped: bool = False  # finished before this invocation
    log_tail: list[str] = field(default_factory=list)  # the last lines of OUT/<name>/sweep.log when not completed


def _log_tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


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


# ----------------------------------------------------------------------------- report aggregation (pure)

@dataclass
class Row:
    name: str
    values: dict[str, Any]
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    wall_seconds: float | None = None
    exit_code: int | None = None
    note: str = ""


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
    for each non-control student against the first control, then every final eval metric."""
    bpb = {m: v for m, v in (summary.get("bpb") or {}).items() if v is not None}
    metrics = {f"bpb/{m}": float(v) for m, v in bpb.items()}
    controls = [c for c in summary.get("controls") or [] if c in bpb]
    if controls:
        ref = bpb[controls[0]]
        for model, value in bpb.items():
            if model != "teacher" and model not in controls:
                metrics[diff_column(model, controls[0])] = (value - ref) / ref * 100
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
    raise SweepError(f"--metric {metric!r}: not a metric of the runs.{_suggest(metric, columns)} "
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
            writer.writerow(["rank", "name", *self.axes, "status", "exit_code", "wall_seconds", *columns])
            for i, row in enumerate(self.rows, 1):
                writer.writerow([i, row.name, *(_cell(row.values.get(a)) for a in self.axes), row.status,
                                 "" if row.exit_code is None else row.exit_code,
                                 "" if row.wall_seconds is None else f"{row.wall_seconds:.1f}",
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


# ----------------------------------------------------------------------------- report from disk

def collect_rows(sweep: Sweep) -> tuple[list[Row], list[dict]]:
    """One row per run from its summary.json and the sweep's recorded results; the summaries found."""
    recorded = read_results(sweep.out)
    rows, summaries = [], []
    for run in sweep.runs:
        summary = read_summary(run.run_dir)
        result = recorded.get(run.name)
        if sweep.finished(run):
            status = "completed"
        elif is_finished(run.run_dir):
            status, result = "stale", None
        elif result is not None:
            status = result.status
        else:
            status = summary.get("status", "pending") if summary else "pending"
        row = Row(name=run.name, values=run.values, status=status,
                  exit_code=result.exit_code if result else None,
                  wall_seconds=(summary or {}).get("wall_seconds") if status == "completed" else None)
        if status == "completed" and summary:
            row.metrics = summary_metrics(summary)
            summaries.append(summary)
        elif status == "stale":
            row.note = f"{run.run_dir} holds a finished run of another config; delete it or use another --dir"
        elif result is not None and result.log_tail:
            row.note = next((line.strip() for line in reversed(result.log_tail) if line.strip()), "")
        rows.append(row)
    return rows, summaries


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


# ----------------------------------------------------------------------------- processes

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


def _prepare_run_dir(run: Run, cfg: Config) -> None:
    """Create OUT/<name> with its config.yaml (as `distill run` writes it) so the log can live there:
    `distill run` takes a directory with a config.yaml for its own and refuses other non-empty ones."""
    if (run.run_dir / "config.yaml").is_file() or (run.run_dir.exists() and any(run.run_dir.iterdir())):
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.run_dir / "config.yaml")


def _bpb_text(run_dir: Path) -> str:
    summary = read_summary(run_dir) or {}
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
              metric: str | None = None, maximize: bool = False,
              echo: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict[str, RunResult]:
    """Run every unfinished run (`parallel` processes at a time, or through `launcher`), skip finished
    ones, record each result in OUT/sweep.json, then write the report. Returns name -> result."""
    parallel = default_parallel() if parallel is None else parallel
    if parallel < 1:
        raise SweepError(f"--parallel {parallel}: must be >= 1")
    results: dict[str, RunResult] = {}
    pending = []
    for run in sweep.runs:
        if sweep.finished(run):
            results[run.name] = RunResult(run.name, "completed", skipped=True)
            echo(f"skipped  {run.name}: already completed ({_bpb_text(run.run_dir)})")
        else:
            pending.append(run)
    earlier = {name: r for name, r in read_results(sweep.out).items() if name not in results}  # until re-run
    write_sweep_json(sweep, {**earlier, **results})
    total, done = len(sweep.runs), len(results)
    echo(f"sweep {sweep.name}: {total} runs, {done} already completed, {len(pending)} to run"
         + (f", {parallel} at a time" if not launcher else f" through {launcher!r}") + f"; out {sweep.out}")

    def finish(run: Run, result: RunResult) -> None:
        nonlocal done
        results[run.name] = result
        done += 1
        write_sweep_json(sweep, {**earlier, **results})
        wall = f" in {result.wall_seconds:.1f}s" if result.wall_seconds is not None else ""
        detail = _bpb_text(run.run_dir) if result.status == "completed" else (
            f"exit {result.exit_code}; log {run.run_dir / LOG_NAME}")
        failed = sum(r.status not in ("completed", "submitted") for r in results.values())
        echo(f"[{done}/{total}] {result.status:<9} {run.name}{wall}: {detail}"
             + (f" ({failed} not completed so far)" if failed else ""))

    try:
        if launcher:
            _launch_all(sweep, pending, launcher, finish, echo)
        else:
            _run_local(sweep, pending, parallel, finish, lambda line: echo(f"[{done}/{total}] {line}"))
    finally:
        write_sweep_json(sweep, {**earlier, **results})
    table = report(sweep, metric=metric, maximize=maximize)
    echo("\n" + table.markdown() + f"\nwritten: {sweep.out / 'summary.md'}, {sweep.out / 'summary.csv'}")
    return results


def _start(sweep: Sweep, run: Run, env: dict, cpus: list[int] | None) -> tuple[subprocess.Popen, Any]:
    _prepare_run_dir(run, sweep.configs[run.name])
    command = sweep.command(run)
    log = open(run.run_dir / LOG_NAME, "a")  # noqa: SIM115 (open while the run writes to it)
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(command)}\n")
    log.flush()
    previous = os.sched_getaffinity(0) if cpus and hasattr(os, "sched_setaffinity") else None
    try:
        if previous is not None:  # the child inherits this thread's CPU set
            os.sched_setaffinity(0, cpus)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True)
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
                env, cpus = process_env(parallel, slot, cores, accelerator)
                process, log = _start(sweep, run, env, cpus)
                active.append(_Active(run, process, log, slot, time.time()))
                echo(f"start    {run.name}" + (f" (cpus {','.join(map(str, cpus))})" if cpus else ""))
            time.sleep(0.2)
            for item in [a for a in active if a.process.poll() is not None]:
                active.remove(item)
                free_slots.append(item.slot)
                item.log.close()
                finish(item.run, _local_result(item))
    except (KeyboardInterrupt, _Stop) as stop:
        signum = signal.SIGTERM if isinstance(stop, _Stop) else signal.SIGINT
        echo(f"stopping {len(active)} running run(s) at their next step (Ctrl-C again: at once); "
             "run the sweep again to resume them")
        _stop_all(active, signum)
        for item in active:
            item.log.close()
            finish(item.run, _local_result(item))
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


def _local_result(item: _Active) -> RunResult:
    """completed (exit 0, finished), the status of the summary the run wrote (interrupted, preempted,
    nonfinite, ...), or failed."""
    code, run_dir = item.process.returncode, item.run.run_dir
    summary_file = run_dir / "summary.json"
    fresh = summary_file.is_file() and summary_file.stat().st_mtime >= item.started - 1
    if code == 0 and is_finished(run_dir):
        status = "completed"
    elif fresh and (read_summary(run_dir) or {}).get("status") not in (None, "completed"):
        status = read_summary(run_dir)["status"]
    else:
        status = "failed"
    tail = [] if status == "completed" else _log_tail(run_dir / LOG_NAME)
    return RunResult(item.run.name, status, exit_code=code, wall_seconds=time.time() - item.started, log_tail=tail)


def _launch_all(sweep: Sweep, pending: list[Run], launcher: str, finish, echo) -> None:
    """Hand each run to `launcher` (e.g. sbatch): the run counts as submitted when it exits 0 (completed
    when the launcher waited for the run and its summary says so)."""
    for run in pending:
        _prepare_run_dir(run, sweep.configs[run.name])
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
        tail = [] if status == "completed" else _log_tail(run.run_dir / LOG_NAME)
        finish(run, RunResult(run.name, status, exit_code=code, wall_seconds=time.time() - started, log_tail=tail))


def metric_names(sweep: Sweep) -> list[str]:
    """The report columns every run will have (from the configs): bpb per model and students vs control."""
    names = []
    for cfg in sweep.configs.values():
        controls = [s.name for s in cfg.students if s.control]
        names += [f"bpb/{m}" for m in ["teacher", *(s.name for s in cfg.students)]]
        names += [diff_column(s.name, controls[0]) for s in cfg.students if controls and not s.control]
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


__all__ = ["Group", "Report", "Row", "Run", "RunResult", "Sweep", "SweepError", "SweepSpec", "build_report",
           "build_sweep", "check_metric", "default_parallel", "describe", "draw_random", "expand", "format_value",
           "group_over_seeds", "holds_config", "is_finished", "launcher_command", "load_sweep", "parse_spec", "process_env",
           "report", "run_names", "run_sweep", "short_names", "sort_rows", "summary_metrics"]
