"""The run directory: its layout, when two configs are the same run, when a run is finished, the
summary's schema and which control each student is compared with.

    RUN_DIR/config.yaml       the resolved config (`save_config`)
    RUN_DIR/metrics.jsonl     one JSON object per logged step (`distill.run_logger`)
    RUN_DIR/events.*          TensorBoard event files: the run directory is the TensorBoard run
                              (its HParams session, the config text, perf/...)
    RUN_DIR/tb/<model>/       a sub-run per model (teacher, each student): its metrics under
                              model-free tags (`tensorboard_route`), one line per model per chart
    RUN_DIR/checkpoints/<s>/  orbax checkpoints, one folder per kept step (`distill.checkpoint`)
    RUN_DIR/summary.json      final metrics, wall time, status, newest checkpoint (`summary`)
    RUN_DIR/orbax.log         orbax's own log messages and tracebacks (`distill.checkpoint.library_log`)
    RUN_DIR/.lock             held by the process that trains the run (`distill.guards.RunLock`)

Everything that reads or writes a run directory (the trainer, `distill.runs`, the sweep, the HF
import) takes these names and rules from here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import yaml

from distill.checkpoint import committed_steps
from distill.config import Config, build_config, save_config
from distill.configtools import read_config_mapping
from distill.errors import ConfigError
from distill.guards import RunLock
from distill.job import from_process_0

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
LIBRARY_LOG = "orbax.log"
MODEL_BOARDS_DIR = "tb"
ON_CHANGED_CONFIG = ("refuse", "resume", "new")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def tensorboard_route(tag: str) -> tuple[str, str]:
    """Where a metric goes in TensorBoard: a model's (`teacher/ce`, `student/<name>/kd`,
    `eval/student/<name>/bpb`, ...) to its sub-run `tb/<model>` as `train/<metric>` or
    `eval/<metric>`, so every model's `eval/bpb` is one chart with a line per model (and per run
    of a sweep); anything else (`perf/...`, the config) to the run directory as it is. metrics.jsonl
    keeps the full tags."""
    phase, rest = ("eval", tag.split("/")[1:]) if tag.startswith("eval/") else ("train", tag.split("/"))
    if rest[0] == "teacher" and len(rest) > 1:
        return f"{MODEL_BOARDS_DIR}/teacher", "/".join([phase, *rest[1:]])
    if rest[0] == "student" and len(rest) > 2:
        return f"{MODEL_BOARDS_DIR}/{rest[1]}", "/".join([phase, *rest[2:]])
    return "", tag


def read_config_tree(run_dir: str | Path, where: str | None = None) -> dict:
    """The run's config.yaml as written (a mapping); a ConfigError starting with `where` (default:
    the directory) when there is none."""
    config_file = Path(run_dir) / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{where or run_dir}: not a run directory (no {CONFIG_FILE})")
    return read_config_mapping(config_file, f"{where or run_dir}: its {CONFIG_FILE}")


def run_config(run_dir: str | Path) -> Config:
    """The config a run directory was trained with."""
    return build_config(read_config_tree(run_dir))


# ----------------------------------------------------------------------------- the summary

def summary(cfg: Config, status: str, final: dict, *, wall_seconds: float, train_seconds: float,
            resumed_from: int, checkpoint: int | None) -> dict:
    """summary.json's content. `status` is one of distill.guards.EXIT_CODES; `steps` the steps the
    config asks for; `checkpoint` the newest intact (committed) checkpoint's step, where a rerun
    resumes (None: none); `bpb` holds every model's final validation bits per byte (None when not
    evaluated); `controls` the students trained on hard labels only; `final` every final
    validation metric. `wall_seconds`: the last command; `train_seconds`: the training loop summed
    over every command that trained the run."""
    bpb = {"teacher": final.get("eval/teacher/bpb")}
    bpb.update({s.name: final.get(f"eval/student/{s.name}/bpb") for s in cfg.students})
    return {"status": status, "run_dir": str(cfg.run.path), "steps": cfg.train.steps, "checkpoint": checkpoint,
            "resumed_from": resumed_from, "wall_seconds": wall_seconds, "train_seconds": train_seconds, "bpb": bpb,
            "controls": [s.name for s in cfg.students if s.control], "final": final}


def read_summary(run_dir: str | Path) -> dict | None:
    """summary.json, or None when there is none (or it does not read)."""
    try:
        return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_summary(run_dir: str | Path, content: dict) -> None:
    (Path(run_dir) / SUMMARY_FILE).write_text(json.dumps(content, indent=2))


def control_for(student: str, controls: list[str]) -> str | None:
    """The control a student is compared with: the one named after it (`x` -> `x-control`), else
    the first control."""
    named = [c for c in controls if c.startswith(student)]
    return named[0] if named else (controls[0] if controls else None)


def comparisons(content: dict) -> list[tuple[str, str, float]]:
    """(student, its control, 100 (student - control) / control) for every evaluated student that is
    not a control, from a summary; negative is better."""
    bpb = {model: value for model, value in (content.get("bpb") or {}).items() if value is not None}
    controls = [c for c in content.get("controls") or [] if c in bpb]
    pairs = []
    for model, value in bpb.items():
        if model != "teacher" and model not in controls and controls:
            control = control_for(model, controls)
            pairs.append((model, control, (value - bpb[control]) / bpb[control] * 100))
    return pairs


def control_gains(content: dict) -> dict[str, float]:
    """`eval/student/<name>/vs_control_pct`: each student's final bpb against its own control's, in
    percent (negative is better), from a summary: the HParams dashboard's comparison column."""
    return {f"eval/student/{student}/vs_control_pct": pct for student, _, pct in comparisons(content)}


def format_table(content: dict) -> str:
    """Validation bits per byte of every model, and each distilled student against its control."""
    bpb = content["bpb"]
    versus = {student: (control, pct) for student, control, pct in comparisons(content)}
    several = len([c for c in content["controls"] if bpb.get(c) is not None]) > 1
    width = max([20, *(len(name) + 1 for name in bpb)])
    lines = [f"{'model':<{width}} {'val bpb':>9}  vs control", "-" * (width + 24)]
    for name, value in bpb.items():
        cell = "" if value is None else f"{value:9.4f}"
        compared = ""
        if name in versus:
            control, pct = versus[name]
            compared = f"{pct:+.1f}% ({'better' if pct < 0 else 'worse'})" + (f" vs {control}" if several else "")
        lines.append(f"{name:<{width}} {cell:>9}  {compared}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- same run, finished

def _without(section, key: str):
    """`section` minus `key`; a hand-written config.yaml may lack or misshape a section: kept as it is."""
    return {k: v for k, v in section.items() if k != key} if isinstance(section, dict) else section


def _placement_free(resolved: dict) -> dict:
    """A resolved config minus where things live (mesh, sharding rules, run.dir, the compilation
    cache): a run may resume on another mesh, after its directory was moved, or with another cache."""
    kept = _without(resolved, "mesh")
    kept["run"] = _without(_without(kept.get("run"), "dir"), "compilation_cache")
    kept["teacher"] = _without(kept.get("teacher"), "sharding")
    students = kept.get("students")
    kept["students"] = [_without(s, "sharding") for s in students] if isinstance(students, list) else students
    return kept


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
        yield prefix.rstrip(".")


def _as_written(cfg: Config) -> dict:
    return yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_changes(cfg: Config, run_dir: Path) -> tuple[dict, dict, list[str]]:
    """(the run's previous config, `cfg` as written, the keys `cfg` changes, placement aside).

    "Same run" means no changed key. The previous config is read as this version resolves it: a
    field added since the run was written takes its default there, so a new option alone does not
    make an old run "different"; a config.yaml that no longer loads is compared as written."""
    previous = read_config_tree(run_dir)
    try:
        previous = _as_written(build_config(previous, {}))
    except ConfigError:
        pass
    resolved = _as_written(cfg)
    return previous, resolved, sorted(_diff_keys(_placement_free(previous), _placement_free(resolved)))


def completed(run_dir: str | Path) -> dict | None:
    """The summary of a run that completed (its summary says so and its final step's checkpoint
    is committed), whatever its config; None otherwise."""
    content = read_summary(run_dir)
    if not content or content.get("status") != "completed":
        return None
    return content if content.get("steps") in committed_steps(checkpoints_dir(run_dir)) else None


def finished_summary(cfg: Config) -> dict | None:
    """The summary of the completed run of `cfg` (the same run) in `cfg.run.path`, or None when
    there is none (absent, unfinished, or another config): a script or a sweep skips it."""
    run_dir = cfg.run.path
    content = completed(run_dir)
    try:
        return content if content is not None and not config_changes(cfg, run_dir)[2] else None
    except ConfigError:  # no config.yaml, or one that does not read: not this run
        return None


# ----------------------------------------------------------------------------- preparing a run

def prepare(cfg: Config, on_changed_config: str) -> tuple[bool, RunLock | None]:
    """Create or reuse the run directory and lock it; what happens when it holds a run of another
    config is `on_changed_config`'s choice: "refuse", "resume" (continue it under `cfg`) or "new"
    (move it to a sibling `<dir>.replaced-<time>`). Returns (resuming?, the held lock).

    A run resumes under a different mesh or sharding rules, or from a moved directory, without
    asking (config.yaml then records the new values). With several processes, process 0 decides
    and writes; the others wait for it and take its answer (run.dir must be on a shared filesystem).
    """
    if on_changed_config not in ON_CHANGED_CONFIG:
        raise ConfigError(f"on_changed_config={on_changed_config!r}: choose one of {', '.join(ON_CHANGED_CONFIG)}")
    run_dir = cfg.run.path
    if jax.process_index() != 0:
        answer = from_process_0("prepared", "")
        if answer.startswith("refused:"):
            raise ConfigError(answer.removeprefix("refused:"))
        return answer == "resumes", None
    try:
        existing, lock = _prepare_as_writer(cfg, run_dir, on_changed_config)
    except ConfigError as error:
        from_process_0("prepared", f"refused:{error}")
        raise
    from_process_0("prepared", "resumes" if existing else "fresh")
    return existing, lock


def check_writable(run_dir: Path) -> None:
    """ConfigError unless `run_dir` is a directory this process can write, or can be made as one:
    not a file, not under a file, not on a read-only file system or without permission."""
    where = f"run.dir={str(run_dir)!r}"
    try:
        existing = next(p for p in [run_dir, *run_dir.absolute().parents] if p.exists())
    except OSError as error:  # e.g. a component longer than the file system allows
        raise ConfigError(f"{where}: not a usable path ({error.strerror}); choose another run.dir") from None
    if existing == run_dir and not run_dir.is_dir():
        raise ConfigError(f"{where} is a file, not a directory; choose another run.dir")
    if not existing.is_dir():
        raise ConfigError(f"{where}: {existing} is a file, so no directory can be made under it; choose another "
                          "run.dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: {existing} is not writable (a read-only file system, or no permission); "
                          "choose another run.dir")


def _prepare_as_writer(cfg: Config, run_dir: Path, on_changed_config: str) -> tuple[bool, RunLock]:
    check_writable(run_dir)
    config_file = run_dir / CONFIG_FILE
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if on_changed_config == "resume" and not config_file.is_file():
        raise ConfigError(f"--resume: run.dir={str(run_dir)!r} holds no run to resume (no {CONFIG_FILE}); "
                          "drop --resume to start a new run there")
    if occupied and not config_file.is_file() and on_changed_config != "new":
        raise ConfigError(f"run.dir={str(run_dir)!r} exists and is not a distill run directory; choose "
                          "another (or pass --force-new to move its contents aside)")
    if occupied and on_changed_config == "new":
        _move_aside(run_dir)
    if on_changed_config == "refuse" and config_file.is_file():
        _refuse_changes(cfg, run_dir)  # before touching anything (the lock file too)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # what check_writable cannot see in advance (a quota, a name too long)
        raise ConfigError(f"run.dir={str(run_dir)!r}: cannot be made ({error.strerror}); choose another run.dir") \
            from None
    lock = RunLock(run_dir)
    lock.acquire()  # before anything in the directory changes
    try:
        return _write_config(cfg, run_dir, on_changed_config), lock
    except BaseException:
        lock.release()
        raise


def _refuse_changes(cfg: Config, run_dir: Path) -> tuple[dict, dict, list[str]]:
    previous, resolved, changed = config_changes(cfg, run_dir)
    if changed:
        raise ConfigError(f"run.dir={str(run_dir)!r} holds a run with a different config (changed: "
                          f"{', '.join(changed[:6])}); pass --resume to continue it under the new config, "
                          "--force-new to move it aside and start anew, or choose another run.dir")
    return previous, resolved, changed


def _write_config(cfg: Config, run_dir: Path, on_changed_config: str) -> bool:
    """Write config.yaml for a new run, or check it against a previous run's; True: resume."""
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        save_config(cfg, config_file)
        return False
    previous, resolved, changed = (config_changes(cfg, run_dir) if on_changed_config == "resume"
                                   else _refuse_changes(cfg, run_dir))  # again, under the lock
    if changed:  # resume under the new config; the old one stays beside it
        kept = _unused_path(run_dir / f"config.before-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        config_file.rename(kept)
        print(f"distill run: resuming {run_dir} under a changed config ({', '.join(changed[:6])}); the previous "
              f"config is {kept.name}", file=sys.stderr)
    if previous != resolved:
        save_config(cfg, config_file)
    return True


def _unused_path(path: Path) -> Path:
    candidates = (path.with_name(f"{path.stem}-{n}{path.suffix}") for n in range(1, 10_000))
    return path if not path.exists() else next(p for p in candidates if not p.exists())


def _move_aside(run_dir: Path) -> None:
    """--force-new: the old run keeps all its files, renamed to a sibling directory; refused
    while another process holds the run."""
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        kept = _unused_path(run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
        run_dir.rename(kept)
    finally:
        lock.release()
    print(f"distill run: --force-new: the previous contents of {run_dir} are now in {kept}", file=sys.stderr)
