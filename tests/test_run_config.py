"""Run-config loading, overrides and validation errors (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

import distill
from distill.config import TrainConfig, build_config
from distill.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = Path(__file__).parent / "configs" / "tiny.yaml"


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")) + [TINY], ids=lambda p: p.name)
def test_every_config_file_loads(path):
    exp = distill.resolve(distill.load_config(path))
    assert exp.students and exp.teacher.model.vocab_size == exp.students[0].model.vocab_size


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "train.stpes: unknown key. Did you mean 'steps'?"),
    ("trian.steps=3", "trian: unknown key. Did you mean 'train'?"),
    ("loss.weighting.shedule=cosine", "loss.weighting.shedule: unknown key. Did you mean 'schedule'?"),
    ("train.steps=many", "train.steps='many': expected an integer"),
    ("teacher.target=average", "teacher.target='average': allowed values are live, ema, stale"),
    ("loss.kd=kl", "kd='kl': allowed values are"),
    ("students.0.name=teacher", "students.name='teacher': the teacher's name"),
    ("loss.kd_kwargs={lam: 0.3}", "kd='forward_kl': kd_kwargs: ['lam'] not parameters of 'forward_kl'"),
    ("optim.learning_rate=-1", "learning_rate=-1.0: must be > 0"),
    ("students.0.model.num_key_value_heads=3", "num_key_value_heads=3: must divide num_attention_heads"),
    ("students.0.model.vocab_size=300", "students[0].model.vocab_size=300: differs from the teacher's 256"),
    ("data.seq_len=100000", "data.seq_len=100000: longer than teacher.model.max_position_embeddings"),
    ("teacher.source=hf", "teacher.path: required when teacher.source is 'hf'"),
    ("students.5.name=x", "students.5: list index out of range"),
    ("train.grad_accum=3", "train.grad_accum=3: must divide data.batch_size"),
    ("teacher.preset=llama5", "teacher preset 'llama5' is unknown"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError) as error:
        distill.load_config(TINY, [override])
    assert message in str(error.value)


def test_keyword_overrides_resolve_unique_field_names():
    cfg = distill.load_config(TINY, steps=7, teacher__warmup_steps=1, **{"loss.temperature": 2.0})
    assert (cfg.train.steps, cfg.teacher.warmup_steps, cfg.loss.temperature) == (7, 1, 2.0)
    with pytest.raises(ConfigError, match="warmup_steps: ambiguous, a field of teacher, optim"):
        distill.load_config(TINY, warmup_steps=1)
    with pytest.raises(ConfigError, match="nonsense: not a field of any section"):
        distill.load_config(TINY, nonsense=1)


def test_a_keyword_naming_a_section_replaces_it():
    students = [{"name": "a", "preset": "cpu-student-tiny"}, {"name": "b", "preset": "cpu-student-tiny",
                                                               "control": True}]
    cfg = distill.load_config(TINY, students=students, train={"steps": 7})
    assert [(s.name, s.control) for s in cfg.students] == [("a", False), ("b", True)]
    assert cfg.train.steps == 7 and cfg.train.eval_every == TrainConfig().eval_every  # the file's train: replaced


def test_student_shorthand_and_list_overrides():
    cfg = build_config({"student": {"name": "solo", "preset": "cpu-student-tiny"}}, ["student.control=true"])
    assert [s.name for s in cfg.students] == ["solo"] and cfg.students[0].control
    cfg = distill.load_config(TINY, ["students.1.name=baseline"])
    assert [s.name for s in cfg.students] == ["distilled", "baseline"]
    with pytest.raises(ConfigError, match="give one of them"):
        build_config({"student": {}, "students": [{}]})


def test_duplicate_student_names_are_refused():
    with pytest.raises(ConfigError, match="names must be unique"):
        distill.load_config(TINY, ["students.1.name=distilled"])


def test_no_students_pretrains_the_teacher_and_needs_it_trainable():
    cfg = distill.load_config(TINY, ["students=[]", "train.steps=7"])
    assert cfg.students == () and cfg.teacher_warmup() == 7  # every step teacher-only
    with pytest.raises(ConfigError, match="students: at least one student is required when the teacher is frozen"):
        distill.load_config(TINY, ["students=[]", "teacher.trainable=false"])


def test_resolved_config_round_trips():
    cfg = distill.load_config(TINY)
    assert build_config(cfg.to_dict()) == cfg


def test_the_compilation_cache_folder_follows_the_config_then_the_environment(tmp_path):
    from distill.compile_cache import cache_dir

    assert cache_dir(str(tmp_path / "c"), {}) == tmp_path / "c"
    assert cache_dir("off", {"DISTILL_COMPILATION_CACHE": str(tmp_path)}) is None
    assert cache_dir(None, {"DISTILL_COMPILATION_CACHE": "OFF"}) is None
    assert cache_dir(None, {"DISTILL_COMPILATION_CACHE": str(tmp_path / "e")}) == tmp_path / "e"
    assert cache_dir(None, {"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "distill" / "xla"
