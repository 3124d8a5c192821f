"""Presets at full size, through `nnx.eval_shape` (no memory is allocated)."""

import math

import jax
import pytest
from flax import nnx

from distill.errors import ConfigError
from distill.model import build_model
from student import STUDENT_PRESETS, student_preset
from teacher import TEACHER_PRESETS, teacher_preset

# Published sizes: Scout 17B active / 109B total, Maverick 17B active / 400B total.
PUBLISHED = {"llama4-scout": (17e9, 109e9), "llama4-maverick": (17e9, 400e9)}


def abstract_param_count(cfg) -> int:
    state = nnx.state(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_llama4_presets_have_the_published_sizes(name):
    cfg = teacher_preset(name)
    counts = cfg.param_counts()
    active, total = PUBLISHED[name]
    assert abs(counts["active"] - active) / active < 0.03
    assert abs(counts["total"] - total) / total < 0.03
    assert abstract_param_count(cfg) == counts["total"]


@pytest.mark.parametrize("name", sorted(STUDENT_PRESETS))
def test_students_are_smaller_than_the_cpu_teacher(name):
    teacher = teacher_preset("cpu-teacher")
    student = student_preset(name)
    assert student.vocab_size == teacher.vocab_size
    assert student.param_counts()["total"] < teacher.param_counts()["total"]
    assert abstract_param_count(student) == student.param_counts()["total"]


def test_unknown_preset_names_the_close_match():
    with pytest.raises(ConfigError, match="did you mean 'llama4-scout'"):
        teacher_preset("llama4-scot")


def test_overrides_apply_and_validate():
    assert teacher_preset("cpu-teacher", num_hidden_layers=2).num_hidden_layers == 2
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        student_preset("cpu-student", num_experts_per_tok=99)
    assert set(TEACHER_PRESETS).isdisjoint(STUDENT_PRESETS)
