"""Sweeps: expansion, names, validation and report aggregation (pure), then `distill sweep` end to end."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill import cli
from distill.config import save_config
from distill.sweep import (
    RandomAxis,
    RunResult,
    SweepError,
    build_report,
    check_metric,
    draw_random,
    expand,
    format_value,
    launcher_command,
    load_sweep,
    parse_spec,
    process_env,
    report,
    run_names,
    run_sweep,
    short_names,
    summary_metrics,
)
from distill.sweep.state import write_sweep_json

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def write_sweep(tmp_path: Path, body: dict, name: str = "s") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base": str(TINY), **body}, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- expansion and names

def test_grid_zip_seeds_expand_in_order_with_readable_names():
    spec = parse_spec({"base": "b.yaml", "overrides": {"train.steps": 20},
                       "grid": {"loss.temperature": [1.0, 2.0], "loss.kd": ["forward_kl", "jsd"]},
                       "zip": {"optim.learning_rate": [1.0e-3, 3.0e-3], "optim.warmup_steps": [10, 20]},
                       "seeds": [0, 1]}, "s")
    points = expand(spec)
    assert spec.axes == ("loss.temperature", "loss.kd", "optim.learning_rate", "optim.warmup_steps", "train.seed")
    assert len(points) == 2 * 2 * 2 * 2
    assert points[:3] == [
        {"loss.temperature": 1.0, "loss.kd": "forward_kl", "optim.learning_rate": 1.0e-3, "optim.warmup_steps": 10,
         "train.seed": 0},
        {"loss.temperature": 1.0, "loss.kd": "forward_kl", "optim.learning_rate": 3.0e-3, "optim.warmup_steps": 20,
         "train.seed": 0},
        {"loss.temperature": 1.0, "loss.kd": "jsd", "optim.learning_rate": 1.0e-3, "optim.warmup_steps": 10,
         "train.seed": 0}]
    assert [p["train.seed"] for p in points] == [0] * 8 + [1] * 8  # every configuration at seed 0 first
    names = run_names(points, spec.axes)
    assert names[:2] == ["temperature-1.0_kd-forward_kl_learning_rate-0.001_warmup_steps-10_seed-0",
                         "temperature-1.0_kd-forward_kl_learning_rate-0.003_warmup_steps-20_seed-0"]
    assert len(set(names)) == 16


def test_the_minimal_form_names_runs_by_value_and_seed():
    spec = parse_spec({"base": "b.yaml", "overrides": {"train.steps": 20}, "grid": {"loss.temperature": [1.0, 2.0]},
                       "seeds": [0, 1]}, "s")
    assert run_names(expand(spec), spec.axes) == ["temperature-1.0_seed-0", "temperature-2.0_seed-0",
                                                  "temperature-1.0_seed-1", "temperature-2.0_seed-1"]


def test_names_are_filesystem_safe_unique_and_short_keys_disambiguate():
    assert short_names(["loss.temperature", "students.0.loss.temperature", "train.steps"]) == {
        "loss.temperature": "loss.temperature", "students.0.loss.temperature": "0.loss.temperature",
        "train.steps": "steps"}
    points = [{"data.source": "/a/b c.txt"}, {"data.source": "/a/b?c.txt"}, {"data.source": "stdlib"}]
    names = run_names(points, ["data.source"])
    assert names[2] == "source-stdlib"
    assert names[0].startswith("source-a-b-c.txt_") and names[1].startswith("source-a-b-c.txt_")
    assert len(set(names)) == 3 and all("/" not in n and " " not in n for n in names)


def test_values_are_written_as_yaml_that_reads_back():
    assert format_value(1e-5) == "1.0e-05" and yaml.safe_load("1.0e-05") == 1e-5
    assert format_value(2.0) == "2.0" and format_value(True) == "true" and format_value(None) == "null"
    assert format_value("1.0") == '"1.0"' and format_value("stdlib") == "stdlib"
    assert format_value([1, 2.5e-7]) == "[1, 2.5e-07]"
    assert yaml.safe_load(format_value({"schedule": "fixed", "alpha": 1e-3})) == {"schedule": "fixed", "alpha": 1e-3}


def test_random_draws_are_reproducible_by_seed_and_in_range():
    axis = RandomAxis(count=50, seed=3, keys={"optim.learning_rate": ("log_uniform", [1e-4, 1e-2]),
                                              "loss.temperature": ("uniform", [1.0, 4.0]),
                                              "loss.kd": ("choice", ["forward_kl", "jsd"])})
    points = draw_random(axis)
    assert points == draw_random(axis)
    assert points != draw_random(RandomAxis(count=50, seed=4, keys=axis.keys))
    assert all(1e-4 <= p["optim.learning_rate"] <= 1e-2 and 1.0 <= p["loss.temperature"] <= 4.0 for p in points)
    assert {p["loss.kd"] for p in points} == {"forward_kl", "jsd"}
    logs = [math.log10(p["optim.learning_rate"]) for p in points]
    assert min(logs) < -3.5 and max(logs) > -2.5  # spread over the decades, not the top one only
    assert all(float(f"{p['loss.temperature']:.4g}") == p["loss.temperature"] for p in points)


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("body, expected", [
    ({"grid": {"loss.temprature": [1.0, 2.0]}},
     ["run temprature-1.0", "loss.temprature: unknown key", "Did you mean 'temperature'?"]),
    ({"grid": {"loss.temperature": [1.0, -1.0]}}, ["run temperature--1.0", "temperature=-1.0: must be > 0"]),
    ({"zip": {"loss.temperature": [1.0, 2.0], "optim.learning_rate": [1.0e-3]}},
     ["zip: the lists must have equal lengths", "loss.temperature: 2", "optim.learning_rate: 1"]),
    ({"grid": {"loss.temperature": []}}, ["grid.loss.temperature: an empty list gives no runs"]),
    ({"grid": {}}, ["the sweep varies nothing"]),
    ({"gird": {"loss.temperature": [1.0]}}, ["gird: unknown key", "Did you mean 'grid'?"]),
    ({"overrides": {"run.dir": "x"}, "seeds": [0]}, ["overrides.run.dir: the sweep sets each run's directory"]),
    ({"grid": {"train.seed": [0, 1]}, "seeds": [0]}, ["train.seed: given in both grid and seeds"]),
    ({"random": {"count": 2, "keys": {"loss.temperature": {"uniform": [2.0, 1.0]}}}}, ["needs lo < hi"]),
])
def test_bad_sweeps_fail_up_front_naming_the_key(tmp_path, body, expected):
    with pytest.raises(SweepError) as error:
        load_sweep(write_sweep(tmp_path, body), out=tmp_path / "out")
    for text in expected:
        assert text in str(error.value)
    assert not (tmp_path / "out").exists()


def test_base_paths_are_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text(TINY.read_text())
    path = tmp_path / "sub" / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "seeds": [0]}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SweepError, match="relative to the current directory.*write base: .*sub/base.yaml"):
        load_sweep(path)
    monkeypatch.chdir(tmp_path / "sub")
    sweep = load_sweep(path)
    assert [r.name for r in sweep.runs] == ["seed-0"] and sweep.out == Path("runs/sweeps/s")
    assert sweep.runs[0].run_dir == Path("runs/sweeps/s/seed-0")


def test_cli_reports_a_bad_key_with_exit_2_and_runs_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path, {"grid": {"loss.temprature": [1.0]}})
    assert cli.main(["sweep", str(path), "--dir", str(tmp_path / "out")]) == 2
    assert "distill sweep: run temprature-1.0: loss.temprature: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli.main(["sweep", str(write_sweep(tmp_path, {"seeds": [0]})), "--metric", "bpb/distiled"]) == 2
    assert "Did you mean 'bpb/distilled'?" in capsys.readouterr().err


# ----------------------------------------------------------------------------- reports

FAKE = {  # (temperature, seed) -> (distilled, control) bits per byte
    (1.0, 0): (1.00, 1.25), (1.0, 1): (1.10, 1.10), (2.0, 0): (0.90, 1.00), (2.0, 1): (0.70, 1.00)}


def fake_sweep(tmp_path: Path, skip=()):
    sweep = load_sweep(write_sweep(tmp_path, {"grid": {"loss.temperature": [1.0, 2.0]}, "seeds": [0, 1]}),
                       out=tmp_path / "out")
    for run in sweep.runs:
        key = (run.values["loss.temperature"], run.values["train.seed"])
        if key in skip:
            continue
        distilled, control = FAKE[key]
        (run.run_dir / "checkpoints" / "10").mkdir(parents=True)
        save_config(sweep.configs[run.name], run.run_dir / "config.yaml")
        (run.run_dir / "summary.json").write_text(json.dumps({
            "status": "completed", "steps": 10, "wall_seconds": 3.0, "controls": ["control"],
            "bpb": {"teacher": 0.5, "distilled": distilled, "control": control},
            "final": {"eval/student/distilled/kl": 0.1}}))
    return sweep


def test_report_sorts_best_first_and_aggregates_over_seeds(tmp_path):
    sweep = fake_sweep(tmp_path)
    table = report(sweep)
    assert table.metric == "bpb/distilled"
    assert [r.name for r in table.rows] == ["temperature-2.0_seed-1", "temperature-2.0_seed-0",
                                            "temperature-1.0_seed-0", "temperature-1.0_seed-1"]
    assert table.rows[0].metrics["distilled_vs_control_pct"] == pytest.approx(-30.0)
    assert table.rows[3].metrics["distilled_vs_control_pct"] == pytest.approx(0.0)
    best, worst = table.groups
    assert best.values == {"loss.temperature": 2.0} and best.n["bpb/distilled"] == 2
    assert best.mean["bpb/distilled"] == pytest.approx(0.80) and best.std["bpb/distilled"] == pytest.approx(0.2 / 2 ** 0.5)
    assert best.mean["distilled_vs_control_pct"] == pytest.approx(-20.0)
    assert best.std["distilled_vs_control_pct"] == pytest.approx(10 * 2 ** 0.5)
    assert worst.mean["bpb/distilled"] == pytest.approx(1.05) and worst.std["bpb/distilled"] == pytest.approx(0.1 / 2 ** 0.5)
    assert worst.mean["distilled_vs_control_pct"] == pytest.approx(-10.0)
    rows = list(csv.DictReader((sweep.out / "summary.csv").open()))
    assert [r["name"] for r in rows] == [r.name for r in table.rows]
    assert float(rows[0]["bpb/distilled"]) == 0.7 and rows[0]["loss.temperature"] == "2.0" and rows[0]["train.seed"] == "1"
    assert float(rows[0]["eval/student/distilled/kl"]) == 0.1
    grouped = list(csv.DictReader((sweep.out / "summary_seeds.csv").open()))
    assert float(grouped[0]["bpb/distilled_mean"]) == pytest.approx(0.8) and grouped[0]["bpb/distilled_n"] == "2"
    markdown = (sweep.out / "summary.md").read_text()
    assert "| 1 | temperature-2.0_seed-1 | 2.0 | 1 | completed | 0.5000 | 0.7000 | 1.0000 | -30.00% | 3 |" in markdown
    assert "| 2.0 | 2 | 0.5000 +- 0.0000 | 0.8000 +- 0.1414 | 1.0000 +- 0.0000 | -20.00% +- 14.14% |" in markdown


def test_report_by_another_metric_and_with_missing_runs(tmp_path):
    sweep = fake_sweep(tmp_path, skip={(1.0, 1)})
    table = report(sweep, metric="distilled_vs_control_pct", maximize=True)
    assert [r.name for r in table.rows] == ["temperature-2.0_seed-0", "temperature-1.0_seed-0",
                                            "temperature-2.0_seed-1", "temperature-1.0_seed-1"]
    assert table.rows[-1].status == "pending" and not table.rows[-1].metrics
    lonely = next(g for g in table.groups if g.values == {"loss.temperature": 1.0})
    assert lonely.runs == 2 and lonely.n["bpb/distilled"] == 1 and lonely.std["bpb/distilled"] is None
    assert "| 1.0 | 1/2 |" in table.markdown()
    assert report(sweep, metric="control").metric == "bpb/control"
    with pytest.raises(SweepError, match="Did you mean 'bpb/teacher'"):
        report(sweep, metric="bpb/teacer")


def test_a_finished_run_of_an_edited_sweep_is_not_skipped(tmp_path, capsys):
    sweep = fake_sweep(tmp_path)
    edited = write_sweep(tmp_path, {"overrides": {"loss.kd": "jsd"}, "grid": {"loss.temperature": [1.0, 2.0]},
                                    "seeds": [0, 1]}, name="edited")
    assert cli.main(["sweep", str(edited), "--dir", str(sweep.out), "--report"]) == 0
    assert capsys.readouterr().out.count("| stale |") == 4
    assert cli.main(["sweep", str(edited), "--dir", str(sweep.out), "--launcher", "true"]) == 0
    out = capsys.readouterr().out
    assert "skipped" not in out and out.count("submitted") >= 4
    assert cli.main(["sweep", str(tmp_path / "s.yaml"), "--dir", str(sweep.out), "--launcher", "true"]) == 0
    assert capsys.readouterr().out.count("skipped  temperature") == 4


def test_a_finished_run_on_another_mesh_is_the_same_run(tmp_path):
    """"Same run?" is distill.rundir's rule, the trainer's: placement (mesh, sharding rules, run.dir) aside."""
    sweep = fake_sweep(tmp_path)
    run = sweep.runs[0]
    written = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    written["mesh"]["data"], written["run"]["dir"] = 1, "elsewhere"
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    assert sweep.finished(run)
    assert {r.name: r.status for r in report(sweep, write=False).rows}[run.name] == "completed"


def test_each_student_is_compared_with_its_own_control(tmp_path):
    """Two students, each with its control (experiments/experts.yaml's shape): the sweep pairs them as the
    run's final table does (distill.rundir.control_for), not every student with the first control."""
    base = yaml.safe_load(TINY.read_text())
    model = base["students"][0]["model"]
    base["students"] = [{"name": "a", "preset": None, "model": model}, {"name": "b", "preset": None, "model": model},
                        {"name": "a-control", "preset": None, "control": True, "model": model},
                        {"name": "b-control", "preset": None, "control": True, "model": model}]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"base": str(tmp_path / "base.yaml"), "seeds": [0]}))
    sweep = load_sweep(path, out=tmp_path / "out")
    summary = {"status": "completed", "steps": 10, "wall_seconds": 3.0, "controls": ["a-control", "b-control"],
               "bpb": {"teacher": 0.5, "a": 1.0, "b": 0.9, "a-control": 1.25, "b-control": 1.0}, "final": {}}
    run = sweep.runs[0]
    (run.run_dir / "checkpoints" / "10").mkdir(parents=True)
    save_config(sweep.configs[run.name], run.run_dir / "config.yaml")
    (run.run_dir / "summary.json").write_text(json.dumps(summary))

    pcts = {k: v for k, v in summary_metrics(summary).items() if k.endswith("_pct")}
    assert pcts == {"a_vs_a-control_pct": pytest.approx(-20.0), "b_vs_b-control_pct": pytest.approx(-10.0)}
    check_metric(sweep, "b_vs_b-control_pct")
    with pytest.raises(SweepError, match="not a metric of the runs"):
        check_metric(sweep, "b_vs_a-control_pct")
    report(sweep)
    row = next(csv.DictReader((sweep.out / "summary.csv").open()))
    assert float(row["a_vs_a-control_pct"]) == pytest.approx(-20.0)
    assert float(row["b_vs_b-control_pct"]) == pytest.approx(-10.0) and "b_vs_a-control_pct" not in row
    markdown = (sweep.out / "summary.md").read_text()
    assert "| a vs a-control | b vs b-control |" in markdown and "| -20.00% | -10.00% |" in markdown


def test_report_without_seeds_has_no_group_table():
    table = build_report(["loss.temperature"], [], [], None)
    assert table.groups == [] and table.metric == "bpb/teacher" and "Over seeds" not in table.markdown()


# ----------------------------------------------------------------------------- process handling (no runs)

def test_parallel_runs_split_the_cores():
    env, cpus = process_env(2, 1, [0, 1, 2, 3], accelerator=False, base={"XLA_FLAGS": "--xla_dump_to=x"})
    assert cpus == [2, 3] and env["NPROC"] == env["OMP_NUM_THREADS"] == "2" and env["XLA_FLAGS"] == "--xla_dump_to=x"
    env, cpus = process_env(4, 3, [0, 1, 2, 3], accelerator=False, base={})
    assert cpus == [3] and env["NPROC"] == "1" and env["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false"
    env, cpus = process_env(1, 0, [0, 1], accelerator=False, base={})
    assert cpus is None and "NPROC" not in env
    env, cpus = process_env(2, 0, [0, 1], accelerator=True, base={})
    assert cpus is None and env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.45"


def test_launcher_templates(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"seeds": [0]}), out=tmp_path / "o u t")
    run, command = sweep.runs[0], sweep.command(sweep.runs[0])
    assert launcher_command("srun -n 1", command, run) == (["srun", "-n", "1", *command], False)
    line, shell = launcher_command('sbatch -J {name} -o {dir}/slurm.log --wrap "{command}"', command, run)
    assert shell and line.startswith(f"sbatch -J seed-0 -o '{tmp_path}/o u t/seed-0'/slurm.log --wrap \"")
    assert "'run.dir=" in line and line.endswith('seed-0\'"')


def test_a_launcher_submits_and_a_failing_launcher_fails(tmp_path, capsys):
    path = write_sweep(tmp_path, {"grid": {"loss.temperature": [1.0, 2.0]}})
    assert cli.main(["sweep", str(path), "--dir", str(tmp_path / "out"), "--launcher", "echo submitted {name}"]) == 0
    out = capsys.readouterr().out
    assert "[2/2] submitted temperature-2.0" in out
    assert "submitted temperature-1.0" in (tmp_path / "out" / "temperature-1.0" / "sweep.log").read_text()
    assert yaml.safe_load((tmp_path / "out" / "temperature-1.0" / "config.yaml").read_text())["loss"]["temperature"] == 1.0
    results = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [r["result"]["status"] for r in results["runs"]] == ["submitted", "submitted"]
    assert cli.main(["sweep", str(path), "--dir", str(tmp_path / "out"), "--launcher", "false"]) == 1
    assert "failed" in capsys.readouterr().out


# ----------------------------------------------------------------------------- end to end (real runs)

def sweep_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", "sweep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    result = sweep_cli("tests/sweep/tiny_grid.yaml", "--dir", str(out), "--parallel", "1")
    return out, result


def test_sweep_runs_every_run_and_writes_the_tables(tiny_sweep):
    out, result = tiny_sweep
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = ["max_bytes-200000_seed-0", "max_bytes-120000_seed-0"]
    for name in names:
        assert json.loads((out / name / "summary.json").read_text())["status"] == "completed"
        assert "val bpb" in (out / name / "sweep.log").read_text()
        assert f"completed {name}" in result.stdout
    assert "[2/2]" in result.stdout
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert sorted(r["name"] for r in rows) == sorted(names) and all(r["status"] == "completed" for r in rows)
    assert all(float(r["bpb/distilled"]) > 0 and r["distilled_vs_control_pct"] for r in rows)
    assert (out / "summary.md").read_text().count("| completed |") == 2
    assert [r["name"] for r in json.loads((out / "sweep.json").read_text())["runs"]] == names


def test_running_the_sweep_again_skips_finished_runs(tiny_sweep):
    out, _ = tiny_sweep
    result = sweep_cli("tests/sweep/tiny_grid.yaml", "--dir", str(out), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("skipped") == 2 and "0 to run" in result.stdout
    report_only = sweep_cli("tests/sweep/tiny_grid.yaml", "--dir", str(out), "--report", "--metric", "bpb/control")
    assert report_only.returncode == 0 and "best first by bpb/control" in report_only.stdout


def test_a_failing_run_is_recorded_and_the_others_complete(tmp_path):
    result = sweep_cli(str(HERE / "tiny_failing.yaml"), "--dir", str(tmp_path), "--parallel", "1")
    assert result.returncode == 1
    assert "1 of 2 runs did not complete: source-nonexistent-corpus.txt" in result.stderr
    runs = {r["name"]: r["result"] for r in json.loads((tmp_path / "sweep.json").read_text())["runs"]}
    failed = runs["source-nonexistent-corpus.txt"]
    assert failed["status"] == "failed" and failed["exit_code"] == 2
    assert any("no such file or directory" in line for line in failed["log_tail"])
    assert runs["source-stdlib"]["status"] == "completed"
    markdown = (tmp_path / "summary.md").read_text()
    assert "failed (exit 2)" in markdown and "Not completed:" in markdown


def test_dry_run_lists_the_commands_and_runs_nothing(tmp_path):
    result = sweep_cli("tests/sweep/tiny_grid.yaml", "--dir", str(tmp_path / "dry"), "--dry-run", timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "max_bytes-200000_seed-0"
    assert lines[2].split()[1:] == ["-m", "distill.cli", "run", "tests/configs/tiny.yaml", "train.steps=2",
                                    "teacher.warmup_steps=0", "train.eval_every=2", "train.eval_batches=1",
                                    "train.checkpoint_every=2", "data.max_bytes=200000", "train.seed=0",
                                    f"run.dir={tmp_path / 'dry' / 'max_bytes-200000_seed-0'}"]
    assert not (tmp_path / "dry").exists()


def test_every_sweep_file_in_the_repository_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for path in [*HERE.glob("*.yaml"), *(ROOT / "experiments" / "sweeps").glob("*.yaml")]:
        assert load_sweep(path, out=tmp_path / path.stem).runs


def test_the_minimal_form_on_the_quickstart_validates_every_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = tmp_path / "minimal.yaml"
    spec.write_text("{base: experiments/quickstart.yaml, overrides: {train.steps: 20}, "
                    "grid: {loss.temperature: [1.0, 2.0]}, seeds: [0, 1]}\n")
    runs = load_sweep(spec, out=tmp_path / "out").runs
    assert [run.name for run in runs] == ["temperature-1.0_seed-0", "temperature-2.0_seed-0",
                                          "temperature-1.0_seed-1", "temperature-2.0_seed-1"]


def test_summary_csv_gives_every_run_its_exit_code_and_training_seconds(tmp_path):
    """Completed runs exit 0 (skipped ones too, keeping the wall seconds the sweep recorded); a run
    stopped by a signal has the exit code its summary's status means; train_seconds is the run's own."""
    sweep = fake_sweep(tmp_path, skip={(1.0, 1)})
    stopped = sweep.runs[2]  # temperature-1.0_seed-1: not finished
    for run in sweep.runs[:2] + sweep.runs[3:]:
        content = json.loads((run.run_dir / "summary.json").read_text())
        (run.run_dir / "summary.json").write_text(json.dumps({**content, "train_seconds": 2.5}))
    stopped.run_dir.mkdir(parents=True)
    save_config(sweep.configs[stopped.name], stopped.run_dir / "config.yaml")
    (stopped.run_dir / "summary.json").write_text(json.dumps({
        "status": "preempted", "steps": 10, "wall_seconds": 1.0, "train_seconds": 4.0, "controls": ["control"],
        "bpb": {"teacher": None, "distilled": None, "control": None}, "final": {}}))
    write_sweep_json(sweep, {sweep.runs[0].name: RunResult(sweep.runs[0].name, "completed", exit_code=0,
                                                           wall_seconds=7.0)})
    report(sweep)
    rows = {r["name"]: r for r in csv.DictReader((sweep.out / "summary.csv").open())}
    assert [rows[r.name]["exit_code"] for r in sweep.runs] == ["0", "0", "143", "0"]
    assert [rows[r.name]["wall_seconds"] for r in sweep.runs] == ["7.0", "3.0", "", "3.0"]
    assert [rows[r.name]["train_seconds"] for r in sweep.runs] == ["2.5", "2.5", "4.0", "2.5"]
    results = run_sweep(sweep, launcher="true", echo=lambda line: None)
    assert results[sweep.runs[0].name] == RunResult(sweep.runs[0].name, "completed", exit_code=0, wall_seconds=7.0,
                                                    skipped=True)
    recorded = {r["name"]: r["result"] for r in json.loads((sweep.out / "sweep.json").read_text())["runs"]}
    assert recorded[sweep.runs[1].name]["exit_code"] == 0 and recorded[stopped.name]["status"] == "submitted"
