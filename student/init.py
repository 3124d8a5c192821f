"""Student initialisation from a teacher: chosen layers, chosen experts, when shapes allow."""

from __future__ import annotations

import numpy as np

from distill.errors import ConfigError
from distill.model import ModelConfig, Transformer
from distill.model.layout import assign_canonical_params, canonical_params

_EXPERT_PARAMS = ("feed_forward/gate", "feed_forward/up", "feed_forward/down")


def init_from_teacher(student: Transformer, teacher: Transformer, *, layers: tuple[int, ...] | None = None,
                      experts: tuple[int, ...] | None = None) -> None:
    """Copy teacher weights into `student`, in place.

    Student layer j takes teacher layer `layers[j]` (default: evenly spaced teacher layers of the same
    kind); a student MoE layer takes teacher experts `experts` (default: the first E_student).
    Embeddings, final norm and head are copied too. Any shape mismatch raises a ConfigError naming
    the parameter: widths, heads and vocabulary must match; depth and expert count may shrink.
    """
    s_cfg, t_cfg = student.cfg, teacher.cfg
    layers = tuple(layers) if layers is not None else default_layer_map(s_cfg, t_cfg)
    if len(layers) != s_cfg.num_hidden_layers:
        raise ConfigError(f"init_layers: {len(layers)} entries for {s_cfg.num_hidden_layers} student layers")
    bad = [t for t in layers if not 0 <= t < t_cfg.num_hidden_layers]
    if bad:
        raise ConfigError(f"init_layers: teacher layers {bad} do not exist (the teacher has {t_cfg.num_hidden_layers})")
    experts = tuple(experts) if experts is not None else tuple(range(s_cfg.num_local_experts))
    if len(experts) != s_cfg.num_local_experts or not all(0 <= e < t_cfg.num_local_experts for e in experts):
        raise ConfigError(f"init_experts: need {s_cfg.num_local_experts} teacher expert indices in "
                          f"0..{t_cfg.num_local_experts - 1}, got {list(experts)}")
    teacher_params = canonical_params(teacher)
    target = canonical_params(student)
    copied = {}
    for key, like in target.items():
        source_key, moe_layer = key, False
        if key.startswith("layers/"):
            _, j, rest = key.split("/", 2)
            t_layer = layers[int(j)]
            if s_cfg.layer_is_moe[int(j)] != t_cfg.layer_is_moe[t_layer]:
                raise ConfigError(f"init_layers: student layer {j} is {'MoE' if s_cfg.layer_is_moe[int(j)] else 'dense'}"
                                  f" but teacher layer {t_layer} is not")
            source_key, moe_layer = f"layers/{t_layer}/{rest}", t_cfg.layer_is_moe[t_layer]
        value = teacher_params[source_key]
        if moe_layer and source_key.split("/", 2)[-1] in _EXPERT_PARAMS:
            value = value[list(experts)]
        elif moe_layer and source_key.endswith("feed_forward/router"):
            value = value[:, list(experts)]
        if value.shape != like.shape:
            raise ConfigError(f"student.init=teacher: parameter {key} has shape {like.shape} in the student but "
                              f"{value.shape} from the teacher; widths, heads and vocabulary must match")
        copied[key] = np.asarray(value)
    assign_canonical_params(student, copied)


def default_layer_map(student: ModelConfig, teacher: ModelConfig) -> tuple[int, ...]:
    """For each student layer, the nearest evenly spaced teacher layer with the same (rope, moe) kind."""
    kinds = list(zip(teacher.layer_uses_rope, teacher.layer_is_moe))
    n_s, n_t = student.num_hidden_layers, teacher.num_hidden_layers
    out = []
    for j in range(n_s):
        want = (student.layer_uses_rope[j], student.layer_is_moe[j])
        ideal = (j + 0.5) * n_t / n_s - 0.5
        candidates = [t for t in range(n_t) if kinds[t] == want] or [t for t in range(n_t)
                                                                     if kinds[t][1] == want[1]]
        if not candidates:
            raise ConfigError(f"init=teacher: the teacher has no {'MoE' if want[1] else 'dense'} layer for "
                              f"student layer {j}")
        out.append(min(candidates, key=lambda t: abs(t - ideal)))
    return tuple(out)
