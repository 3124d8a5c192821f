"""Student initialisation from the teacher: chosen layers and experts, shape errors."""

import numpy as np
import pytest

from distill.errors import ConfigError
from distill.model import ModelConfig, build_model
from distill.model.layout import canonical_params
from student import default_layer_map, init_from_teacher

TEACHER = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=16, intermediate_size_mlp=24,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
                      interleave_moe_layer_step=2, no_rope_layer_interval=4)


def test_chosen_layers_and_experts_are_copied():
    teacher = build_model(TEACHER, seed=0)
    student = build_model(TEACHER.replace(num_hidden_layers=2, num_local_experts=3), seed=1)
    init_from_teacher(student, teacher, layers=(2, 3), experts=(5, 0, 2))
    t, s = canonical_params(teacher), canonical_params(student)
    np.testing.assert_array_equal(s["embed"], t["embed"])
    np.testing.assert_array_equal(s["layers/0/attention/q"], t["layers/2/attention/q"])
    np.testing.assert_array_equal(s["layers/1/feed_forward/gate"], t["layers/3/feed_forward/gate"][[5, 0, 2]])
    np.testing.assert_array_equal(s["layers/1/feed_forward/router"], t["layers/3/feed_forward/router"][:, [5, 0, 2]])
    np.testing.assert_array_equal(s["layers/1/feed_forward/shared_expert/down"],
                                  t["layers/3/feed_forward/shared_expert/down"])


def test_default_layer_map_keeps_layer_kinds():
    student = TEACHER.replace(num_hidden_layers=2)
    layers = default_layer_map(student, TEACHER)
    for j, t in enumerate(layers):
        assert (student.layer_uses_rope[j], student.layer_is_moe[j]) == (TEACHER.layer_uses_rope[t],
                                                                          TEACHER.layer_is_moe[t])


def test_mismatched_widths_and_kinds_are_named():
    teacher = build_model(TEACHER, seed=0)
    narrow = build_model(TEACHER.replace(hidden_size=16), seed=1)
    with pytest.raises(ConfigError, match="parameter embed has shape"):
        init_from_teacher(narrow, teacher)
    student = build_model(TEACHER.replace(num_hidden_layers=2), seed=1)
    with pytest.raises(ConfigError, match="student layer 1 is MoE but teacher layer 0 is not"):
        init_from_teacher(student, teacher, layers=(0, 0))
    with pytest.raises(ConfigError, match="init_experts"):
        init_from_teacher(student, teacher, experts=(0, 1, 2, 3, 4, 9))
