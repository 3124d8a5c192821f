"""A run directory that holds another config's run: refused by default, continued with --resume
(same shapes only), moved aside with --force-new; the old run's files are never lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

import distill
import distill.trainer
from distill import cli
from distill.errors import ConfigError
from distill.run_logger import read_metrics_jsonl
from distill.rundir import finished_summary

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"
SHORT = ["train.steps=4", "train.checkpoint_every=2", "train.eval_every=4", "teacher.warmup_steps=0"]


def tiny(run_dir: Path, *overrides: str):
    return distill.load_config(TINY, [f"run.dir={run_dir}", *SHORT, *overrides])


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("policy") / "run"
    assert distill.run(tiny(run_dir))["status"] == "completed"
    return run_dir


@pytest.fixture
def finished(finished_once, tmp_path) -> Path:
    """A finished 4-step run of its own for each test (a copy: the run directory moves freely)."""
    return Path(shutil.copytree(finished_once, tmp_path / "run"))


def test_resume_continues_a_finished_run_under_more_steps(finished, capsys):
    before = yaml.safe_load((finished / "config.yaml").read_text())
    code = cli.main(["run", str(TINY), f"run.dir={finished}", *SHORT, "train.steps=6", "--resume"])
    assert code == 0
    assert "resuming" in capsys.readouterr().err
    [kept] = finished.glob("config.before-*.yaml")
    assert yaml.safe_load(kept.read_text()) == before  # the old config stays beside the new one
    assert yaml.safe_load((finished / "config.yaml").read_text())["train"]["steps"] == 6
    logged = [row["step"] for row in read_metrics_jsonl(finished) if "teacher/ce" in row]
    assert logged == [2, 4, 6]  # continued from step 4, nothing twice


def test_resume_refuses_other_shapes_and_changes_nothing(finished, digests):
    before = digests(finished, ignore={".lock"})
    with pytest.raises(ConfigError, match=r"holds another state than this config's models.*--force-new"):
        distill.run(tiny(finished, "students.0.model.hidden_size=32"), on_changed_config="resume")
    assert digests(finished, ignore={".lock"}) == before


def test_force_new_moves_the_old_run_aside_whole(finished, capsys, digests):
    before = digests(finished, ignore={".lock"})
    code = cli.main(["run", str(TINY), f"run.dir={finished}", *SHORT, "loss.temperature=2.0", "--force-new"])
    assert code == 0
    [moved] = finished.parent.glob("run.replaced-*")
    assert f"now in {moved}" in capsys.readouterr().err
    assert digests(moved, ignore={".lock"}) == before  # every file of the old run, unchanged
    summary = yaml.safe_load((finished / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"] == 0


def test_resume_and_force_new_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", str(TINY), "--resume", "--force-new"])
    assert exit_.value.code == 2


def test_a_run_written_before_an_option_existed_is_the_same_config(finished):
    """config.yaml of an older version lacks fields added since: they take their defaults, so the
    run still counts as finished (scripts read it) and resumes without --resume; a real change is
    still refused, and a config.yaml that no longer loads is compared as written."""
    cfg = tiny(finished)
    written = yaml.safe_load((finished / "config.yaml").read_text())
    del written["loss"]["teacher_tail"], written["students"][0]["loss"]
    (finished / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    assert finished_summary(cfg)["status"] == "completed"
    assert distill.run(cfg)["status"] == "completed"  # nothing left to train: it reports
    assert finished_summary(tiny(finished, "loss.teacher_tail=renormalize")) is None
    with pytest.raises(ConfigError, match=r"different config \(changed: loss.teacher_tail\)"):
        distill.run(tiny(finished, "loss.teacher_tail=renormalize"))
    written["loss"]["option_of_another_version"] = 1
    (finished / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    assert finished_summary(cfg) is None


def test_a_resumed_run_reads_its_checkpoint_without_building_its_models(finished, monkeypatch):
    """The checkpoint is read straight into the state's shardings: no model is initialised, and no
    teacher loaded, only to be overwritten (a teacher from a HF directory was converted again on
    every resume)."""
    monkeypatch.setattr(distill.trainer, "placed_initial_state", lambda *args: pytest.fail("models built to resume"))
    summary = distill.run(tiny(finished, "train.steps=6"), on_changed_config="resume")
    assert summary["status"] == "completed"
    assert [row["step"] for row in read_metrics_jsonl(finished) if "student/distilled/loss" in row][-1] == 6
