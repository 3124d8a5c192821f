"""End-to-end runs of the tiny config: CLI, run directory contract, resume, teacher modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

import distill
from distill import cli as distill_cli
from distill.data import build_data
from distill.errors import ConfigError
from distill.run_logger import read_metrics_jsonl, read_scalars
from distill.runs import checkpoint_tree, load_models
from distill.rundir import finished_summary

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def tiny(run_dir: Path, **overrides):
    return distill.load_config(TINY, [f"run.dir={run_dir}"] + [f"{k}={v}" for k, v in overrides.items()])


def restore_raw(run_dir: Path, step: int | None = None) -> dict:
    return checkpoint_tree(run_dir, step)[1]


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_cli_run_writes_the_run_directory_contract(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(TINY), f"run.dir={run_dir}"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vs control" in result.stdout and "distilled" in result.stdout
    assert (run_dir / "config.yaml").is_file()
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 10 and resolved["students"][1]["control"] is True
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and set(summary["bpb"]) == {"teacher", "distilled", "control"}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "5"]
    lines = read_metrics_jsonl(run_dir)
    assert [line["step"] for line in lines if "teacher/ce" in line] == [2, 4, 6, 8, 10]
    tags = set().union(*lines)
    for name in ("distilled", "control"):
        for metric in ("ce", "kd", "loss", "alpha"):
            assert f"student/{name}/{metric}" in tags
        assert f"eval/student/{name}/bpb" in tags
    assert "eval/teacher/bpb" in tags
    # TensorBoard: a sub-run per model under model-free tags (one chart per metric, a line per model)
    assert sorted(p.name for p in (run_dir / "tb").iterdir()) == ["control", "distilled", "teacher"]
    assert [step for step, _ in read_scalars(run_dir / "tb" / "distilled")["train/kd"]] == [4, 6, 8, 10]  # after warm-up
    assert [step for step, _ in read_scalars(run_dir / "tb" / "control")["eval/bpb"]] == [5, 10]
    assert set(read_scalars(run_dir)) == {"perf/tokens_per_second", "perf/step_seconds"}  # the run's own
    assert not [p for p in run_dir.iterdir() if p.is_dir() and p.name not in ("checkpoints", "tb")]


def test_resume_equals_an_uninterrupted_run(tmp_path):
    whole = distill.run(tiny(tmp_path / "whole"))
    first = distill.run(tiny(tmp_path / "split"), stop_after=8)
    assert first["status"] == "stopped"
    second = distill.run(tiny(tmp_path / "split"))
    assert second["resumed_from"] == 8 and second["status"] == "completed"
    for a, b in zip(leaves(restore_raw(tmp_path / "whole")), leaves(restore_raw(tmp_path / "split")), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit on CPU
    assert whole["final"] == second["final"]
    # Training time adds up over the commands (the second trains 2 steps, the first 8 and compiles
    # both steps); re-reporting a finished run adds none.
    assert 0 < first["train_seconds"] < second["train_seconds"] <= first["train_seconds"] + second["wall_seconds"]
    again = distill.run(tiny(tmp_path / "split"))
    assert again["train_seconds"] == second["train_seconds"] and again["final"] == second["final"]
    strip = lambda lines: [{k: v for k, v in line.items() if not k.startswith("perf/")} for line in lines]  # noqa
    assert strip(read_metrics_jsonl(tmp_path / "whole")) == strip(read_metrics_jsonl(tmp_path / "split"))


def test_frozen_teacher_gets_no_updates(tmp_path):
    cfg = tiny(tmp_path / "frozen", **{"teacher.trainable": "false", "teacher.warmup_steps": 0})
    distill.run(cfg)
    saved = restore_raw(tmp_path / "frozen")
    fresh = distill.build_model(distill.resolve(cfg).teacher.model, seed=cfg.train.seed)
    from flax import nnx
    for a, b in zip(leaves(nnx.to_pure_dict(nnx.state(fresh, nnx.Param))), leaves(saved["teacher"]["params"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert saved["teacher"]["opt_state"] is None


def test_teacher_from_a_run_is_that_runs_teacher(tmp_path):
    # The source is a teacher pre-trained alone (no students): offline distillation's first half.
    pretrain = distill.load_config(TINY, students=[], **{"run.dir": str(tmp_path / "source"), "train.steps": 6})
    assert pretrain.teacher_warmup() == 6
    summary = distill.run(pretrain)
    assert summary["status"] == "completed" and set(summary["bpb"]) == {"teacher"}
    lines = read_metrics_jsonl(tmp_path / "source")
    assert [line["step"] for line in lines if "teacher/ce" in line] == [2, 4, 6]
    assert not [tag for line in lines for tag in line if tag.startswith(("student/", "eval/student/"))]
    assert len(checkpoint_tree(tmp_path / "source")[1]["students"]) == 0
    cfg = tiny(tmp_path / "reuse", **{"teacher.source": "run", "teacher.path": str(tmp_path / "source"),
                                      "teacher.warmup_steps": 0, "train.steps": 4})
    assert cfg.teacher.trains is False
    distill.run(cfg)
    for a, b in zip(leaves(restore_raw(tmp_path / "source")["teacher"]["params"]),
                    leaves(restore_raw(tmp_path / "reuse")["teacher"]["params"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_run_directory_with_another_config_is_refused(tmp_path):
    assert finished_summary(tiny(tmp_path / "run", **{"train.steps": 4, "teacher.warmup_steps": 0})) is None
    summary = distill.run(tiny(tmp_path / "run", **{"train.steps": 4, "teacher.warmup_steps": 0}))
    # What the results scripts use to skip a finished run: only a run of the same config counts.
    assert finished_summary(tiny(tmp_path / "run", **{"train.steps": 4, "teacher.warmup_steps": 0})) == summary
    assert finished_summary(tiny(tmp_path / "run", **{"train.steps": 5, "teacher.warmup_steps": 0})) is None
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="different config.*loss.temperature"):
        distill.run(tiny(tmp_path / "run", **{"train.steps": 4, "teacher.warmup_steps": 0, "loss.temperature": 2.0}))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_notebook_style_python_api(tmp_path):
    cfg = distill.load_config(TINY, steps=4, teacher__warmup_steps=0, **{"run.dir": str(tmp_path / "nb")})
    assert cfg.train.steps == 4 and cfg.run.path == tmp_path / "nb"
    summary = distill.run(cfg)
    assert summary["status"] == "completed" and summary["bpb"]["distilled"] > 0


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(TINY), "train.stpes=3",
                             f"run.dir={tmp_path / 'x'}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "train.stpes: unknown key. Did you mean 'steps'?" in result.stderr
    assert not (tmp_path / "x").exists()


def test_eval_export_and_import_hf_commands(tmp_path, capsys):
    from transformers import Llama4ForCausalLM

    from distill import hf

    run_dir = tmp_path / "run"
    summary = distill.run(tiny(run_dir, **{"train.steps": 4, "teacher.warmup_steps": 0}))
    cli = [sys.executable, "-m", "distill.cli"]
    result = subprocess.run(cli + ["eval", str(run_dir)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout)
    assert metrics["step"] == 4
    assert metrics["eval/student/distilled/bpb"] == pytest.approx(summary["bpb"]["distilled"], rel=1e-6)

    # The checkpoint's models, called eagerly (as in a notebook), give the evaluation's logits.
    _, step, teacher, students = load_models(run_dir)
    tokens = np.arange(32, dtype=np.int32).reshape(2, 16)
    assert step == 4 and teacher(tokens).logits.shape == (2, 16, 256)
    np.testing.assert_allclose(np.asarray(students["distilled"](tokens).logits),
                               np.asarray(nnx.jit(lambda m, t: m(t).logits)(students["distilled"], tokens)),
                               rtol=1e-5, atol=1e-5)

    result = subprocess.run(cli + ["export", str(run_dir), "--hf", str(tmp_path / "hf")], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    exported = Llama4ForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.config.hidden_size == 16  # the distilled student
    # The same commands in-process (the subprocesses above prove the entry point; these save start-ups).
    assert distill_cli.main(["export", str(run_dir), "--hf", str(tmp_path / "hf")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    distilled = (tmp_path / "hf" / "model.safetensors").read_bytes()
    assert distill_cli.main(["export", str(run_dir), "--hf", str(tmp_path / "hf"), "--model", "control",
                             "--overwrite"]) == 0  # what the refusal suggests: the control's weights written over
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() != distilled
    assert distill_cli.main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    # The imported directory is a teacher source; the exported student comes back as a frozen teacher.
    student_model = distill.resolve(distill.load_config(TINY)).students[0].model
    cfg = tiny(tmp_path / "from-import", **{"teacher.source": "run", "teacher.path": str(tmp_path / "imported"),
                                            "teacher.model": "{}", "teacher.warmup_steps": 0, "train.steps": 2})
    assert distill.resolve(cfg).teacher.model.hidden_size == student_model.hidden_size
    distill.run(cfg)
    reference = hf.from_hf(tmp_path / "hf")
    for a, b in zip(leaves(restore_raw(tmp_path / "from-import")["teacher"]["params"]),
                    leaves(restore_raw(tmp_path / "imported")["teacher"]["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert reference.cfg.hidden_size == 16


def test_a_filtering_student_logs_what_it_dropped(tmp_path):
    """Per log step: kept share and scores as scalars, the row scores as a histogram, and the
    text of the easiest and hardest rows (which must be rows of that step's batch)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny(tmp_path / "run", **{"students.0.loss": "{filter: {score: teacher_loss, drop_fraction: 0.5}}"})
    distill.run(cfg)
    rows = [line for line in read_metrics_jsonl(tmp_path / "run") if "student/distilled/filter_kept" in line]
    assert [line["step"] for line in rows] == [4, 6, 8, 10]  # the students' steps
    assert all(line["student/distilled/filter_kept"] == 0.5 for line in rows)  # full rows: half the tokens
    assert all(line["student/distilled/filter_score_dropped"] <= line["student/distilled/filter_threshold"]
               <= line["student/distilled/filter_score_kept"] for line in rows)
    assert not any("student/control/filter" in key for line in rows for key in line)
    events = EventAccumulator(str(tmp_path / "run" / "tb" / "distilled"),
                              size_guidance={"tensors": 0, "histograms": 0})
    events.Reload()
    assert "train/filter_row_scores" in events.Tags()["histograms"]
    texts = events.Tensors("train/filter_examples")
    assert [t.step for t in texts] == [4, 6, 8, 10]
    shown = texts[-1].tensor_proto.string_val[0].decode()
    assert "**easiest row" in shown and "**hardest row (kept)**" in shown
    data = build_data(cfg.data, seed=cfg.train.seed)
    iterator = data.train_iterator()
    last = [next(iterator) for _ in range(10)][-1]
    decoded = {data.tokenizer.decode(row).replace("`", "'")[:600] for row in last["tokens"]}
    for block in shown.split("```")[1::2]:
        assert block.strip("\n") in decoded


def test_an_on_policy_student_logs_what_it_wrote(tmp_path):
    """Per log step: its on-policy scalars, and the text of a row it wrote, whose prompt is the
    start of a row of that step's batch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny(tmp_path / "run", **{"students.0.loss": "{on_policy: {fraction: 0.5, prompt_tokens: 12}}"})
    distill.run(cfg)
    rows = [line for line in read_metrics_jsonl(tmp_path / "run") if "student/distilled/on_policy_kd" in line]
    assert [line["step"] for line in rows] == [4, 6, 8, 10]
    assert all(line["student/distilled/on_policy_teacher_nll"] > 0 for line in rows)
    assert not any("student/control/on_policy" in key for line in rows for key in line)
    events = EventAccumulator(str(tmp_path / "run" / "tb" / "distilled"), size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("train/on_policy_written")
    assert [t.step for t in texts] == [4, 6, 8, 10]
    shown = texts[-1].tensor_proto.string_val[0].decode()
    prompt, written = shown.split("```")[1::2]
    data = build_data(cfg.data, seed=cfg.train.seed)
    iterator = data.train_iterator()
    last = [next(iterator) for _ in range(10)][-1]
    assert prompt.strip("\n") in {data.tokenizer.decode(row[:12]).replace("`", "'").strip("\n")
                                     for row in last["tokens"]}
    assert written.strip("\n")  # the student wrote something


def test_a_second_run_compiles_nothing_the_first_compiled(tmp_path):
    """The persistent compilation cache (`run.compilation_cache`): a new process running the same
    config (another run directory) adds no executable to it; both end with the same numbers."""
    cache = tmp_path / "xla"

    def run(name: str) -> dict:
        result = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(TINY), f"run.dir={tmp_path / name}",
                                 "train.steps=4", "teacher.warmup_steps=2", f"run.compilation_cache={cache}"],
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / name / "summary.json").read_text())

    first = run("first")
    compiled = sorted(p.name for p in cache.iterdir())
    assert len(compiled) >= 3  # the teacher-only step, the co-distillation step, the evaluation, ...
    second = run("second")
    assert sorted(p.name for p in cache.iterdir()) == compiled
    assert second["final"] == first["final"]
