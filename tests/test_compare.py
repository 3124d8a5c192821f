"""`distill compare` on run directories with known metrics: the plot file, the table, the errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def fake_run(path: Path, values: list[float]) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("run: {name: fake}\n")
    rows = [{"step": 10 * (i + 1), "eval/student/distilled/bpb": v, "teacher/ce": 1.0} for i, v in enumerate(values)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", "compare", *args], capture_output=True, text=True,
                          timeout=120)


def test_compare_plots_a_sweep_and_tables_the_last_values_best_first(tmp_path):
    fake_run(tmp_path / "sweep" / "a", [3.0, 2.5, 2.2])
    fake_run(tmp_path / "sweep" / "b", [3.1, 2.4, 2.1])
    out = tmp_path / "plot.png"
    result = compare(str(tmp_path / "sweep"), "--metric", "eval/student/distilled/bpb", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2:4] == ["| b | 30 | 2.1000 |", "| a | 30 | 2.2000 |"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_compare_names_close_tags_for_an_unknown_metric(tmp_path):
    run = fake_run(tmp_path / "a", [1.0])
    result = compare(str(run), "--metric", "eval/student/distiled/bpb")
    assert result.returncode == 2
    assert "logged by none of the 1 runs; close: eval/student/distilled/bpb" in result.stderr


def test_compare_refuses_a_folder_without_runs(tmp_path):
    result = compare(str(tmp_path), "--metric", "x")
    assert result.returncode == 2 and "neither a run directory" in result.stderr


def test_by_model_draws_a_line_per_model_of_one_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {name: fake}\n")
    rows = [{"step": s, "eval/teacher/bpb": 2.0 / s, "eval/student/distilled/bpb": 3.0 / s,
             "eval/student/control/bpb": 4.0 / s, "perf/step_seconds": 0.1} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "models.png"
    result = compare(str(run), "--by-model", "--metric", "eval/bpb", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2:5] == ["| teacher | 2 | 1.0000 |", "| distilled | 2 | 1.5000 |",
                                               "| control | 2 | 2.0000 |"]
    assert out.stat().st_size > 5000
    refused = compare(str(run), "--by-model", "--metric", "eval/bpp")
    assert refused.returncode == 2 and "close: eval/bpb" in refused.stderr
