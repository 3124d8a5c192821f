"""`distill compare`: one metric of several runs (or every run of a sweep) on one plot, or of every
model of one run (`--by-model`: TensorBoard's per-model chart), for papers and for readers who do
not open TensorBoard; also a table of each run's (or model's) last value."""

from __future__ import annotations

import difflib
from pathlib import Path

from distill.errors import ConfigError
from distill.run_logger import read_metrics_jsonl
from distill.rundir import MODEL_BOARDS_DIR, tensorboard_route


def run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run directories (holding config.yaml) named directly or found one level down (a sweep)."""
    found = []
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            found.append(path)
        elif path.is_dir() and (inner := sorted(p for p in path.iterdir() if (p / "config.yaml").is_file())):
            found.extend(inner)
        else:
            raise ConfigError(f"{path}: neither a run directory (no config.yaml) nor a folder of runs")
    return found


def curves(runs: list[Path], metric: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of `metric` per run, labelled by the run's path relative to their common parent."""
    series, seen = {}, set()
    root = Path(*Path(runs[0]).absolute().parts[:-1]) if len(runs) == 1 else _common(runs)
    for run in runs:
        rows = read_metrics_jsonl(run)
        seen.update(k for row in rows for k in row)
        points = [(int(row["step"]), float(row[metric])) for row in rows if metric in row]
        if points:
            series[str(Path(run).absolute().relative_to(root))] = points
    if not series:
        close = difflib.get_close_matches(metric, sorted(seen), n=3, cutoff=0.4)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ConfigError(f"--metric {metric}: logged by none of the {len(runs)} runs{hint}")
    return series


def model_curves(run: Path, metric: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of a model-free `metric` (`eval/bpb`, `train/ce`, as TensorBoard's per-model
    sub-runs name it) for every model of one run: teacher, then the students."""
    series: dict[str, list[tuple[int, float]]] = {}
    seen = set()
    for row in read_metrics_jsonl(run):
        for tag, value in row.items():
            subrun, board_tag = tensorboard_route(tag)
            if subrun.startswith(f"{MODEL_BOARDS_DIR}/"):
                seen.add(board_tag)
                if board_tag == metric:
                    series.setdefault(subrun.split("/", 1)[1], []).append((int(row["step"]), float(value)))
    if not series:
        close = difflib.get_close_matches(metric, sorted(seen), n=3, cutoff=0.4)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ConfigError(f"--metric {metric}: no model of {run} logged it (per-model metrics are named like "
                          f"eval/bpb or train/ce){hint}")
    return dict(sorted(series.items(), key=lambda item: item[0] != "teacher"))


def _common(runs: list[Path]) -> Path:
    parts = [Path(r).absolute().parts for r in runs]
    shared = [p[0] for p in zip(*parts) if len(set(p)) == 1]
    return Path(*shared)


def plot(series: dict[str, list[tuple[int, float]]], metric: str, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, points in series.items():
        steps, values = zip(*points)
        axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out


def table(series: dict[str, list[tuple[int, float]]], metric: str) -> str:
    """Markdown: each run's (or model's) last step and value of the metric, best (lowest) first."""
    rows = sorted(series.items(), key=lambda item: item[1][-1][1])
    lines = [f"| run or model | step | {metric} |", "|---|---|---|"]
    lines += [f"| {label} | {points[-1][0]} | {points[-1][1]:.4f} |" for label, points in rows]
    return "\n".join(lines)
