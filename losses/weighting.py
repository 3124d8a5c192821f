"""Dynamic soft/hard weighting: per token, loss = (1 - a) * CE(hard) + a * KD, a in [0, 1].

a = clip(a_s(step) * g, 0, 1), with no gradient: a_s is a schedule over training steps and g in
[0, 1] a difficulty factor per token or per sequence computed from the teacher (and for one
policy the student) at temperature 1. Easy tokens lean on the hard label, hard ones on the
teacher's distribution. The formulas are in `WeightingConfig`'s field docs and docs/losses.md.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from losses._chunking import DEFAULT_CHUNK_SIZE, map_tokens
from losses._common import clamp_nonnegative, kl_rows, token_mask
from losses._kd import check_teacher
from losses._reduce import masked_quantiles, token_mean
from losses._vocab import Columns, SparseTeacher, resolve_columns, student_columns, teacher_columns

GRANULARITIES = ("token", "sequence")
ALPHA_QUANTILES = (0.1, 0.5, 0.9)


def _allowed(name: str, value, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise ValueError(f"WeightingConfig.{name}: got {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _in_range(name: str, value, low: float, high: float, *, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"WeightingConfig.{name}: got {value!r}; must be a number")
    if not ((low < value) if open_low else (low <= value)) or not value <= high:
        raise ValueError(f"WeightingConfig.{name}: got {value!r}; must be in {'(' if open_low else '['}{low}, {high}]")


def _count(name: str, value, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
        raise ValueError(f"WeightingConfig.{name}: got {value!r}; must be an int >= {1 if positive else 0}")


@dataclasses.dataclass(frozen=True)
class WeightingConfig:
    """The soft/hard weighting policy: a schedule over steps times a difficulty factor.

    a(step, token) = clip(ramp(step) * base(step) * g(token), 0, 1), with
    ramp(step) = min(1, step / warmup_steps) (1 when warmup_steps = 0).
    """

    schedule: str = "fixed"
    """base(step), a name in `SCHEDULES`: "fixed" = alpha; "linear" = alpha + (alpha_end - alpha) * u;
    "cosine" = alpha_end + (alpha - alpha_end) * (1 + cos(pi * u)) / 2, with
    u = clip((step - warmup_steps) / schedule_steps, 0, 1); "step" = values[i] where i is the
    number of boundaries <= step."""
    alpha: float = 0.5
    """The fixed weight, and the start of "linear" / "cosine". In [0, 1]."""
    alpha_end: float = 0.5
    """The end of "linear" / "cosine". In [0, 1]."""
    warmup_steps: int = 0
    """Steps over which a ramps linearly from 0 (hard labels only, e.g. while a co-trained teacher
    is still random) to the schedule. Multiplies every schedule. Int >= 0."""
    schedule_steps: int = 0
    """Length in steps of "linear" / "cosine", counted after the warm-up. Int >= 1 for them."""
    boundaries: tuple[int, ...] = ()
    """"step": the training steps (absolute, increasing) at which the value changes."""
    values: tuple[float, ...] = ()
    """"step": len(boundaries) + 1 weights in [0, 1]; values[0] before boundaries[0]."""
    difficulty: str = "none"
    """g, a name in `DIFFICULTIES`, from the teacher's distribution p (temperature 1) and the label
    y:
    "none": g = 1.
    "teacher_entropy": g = clip((H(p) / log n - entropy_low) / (entropy_high - entropy_low), 0, 1),
      n the number of columns the teacher has mass on: an uncertain teacher -> more soft.
    "teacher_label_prob": g = (1 - p(y)) ** label_prob_power: confident and right -> the hard
      label suffices; the teacher finds the label unlikely -> lean on its distribution.
    "teacher_correctness": g = 0 where argmax p != y and max p >= confidence (the teacher is
      confidently wrong: trust the label), else 1.
    "divergence": g = 1 - exp(-KL(p || q) / divergence_scale), q the student: where the student
      is far from the teacher -> more soft."""
    granularity: str = "token"
    """"token": g per token; "sequence": g averaged over the unmasked tokens of each sequence (the
    last axis of labels), the same for all of them."""
    entropy_low: float = 0.0
    """"teacher_entropy": normalised entropy (in [0, 1]) at and below which g = 0."""
    entropy_high: float = 0.5
    """"teacher_entropy": normalised entropy at and above which g = 1. > entropy_low, <= 1."""
    label_prob_power: float = 1.0
    """"teacher_label_prob": the exponent gamma > 0; larger keeps more tokens on the hard label."""
    confidence: float = 0.5
    """"teacher_correctness": the teacher's top probability from which a wrong argmax counts as
    confidently wrong. In [0, 1]; 0 gates every wrong token."""
    divergence_scale: float = 1.0
    """"divergence": the KL (nats) at which g = 1 - 1/e. > 0."""

    def __post_init__(self):
        for name in ("boundaries", "values"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _allowed("schedule", self.schedule, SCHEDULES)
        _allowed("difficulty", self.difficulty, DIFFICULTIES)
        _allowed("granularity", self.granularity, GRANULARITIES)
        _in_range("alpha", self.alpha, 0.0, 1.0)
        _in_range("alpha_end", self.alpha_end, 0.0, 1.0)
        _count("warmup_steps", self.warmup_steps)
        schedule_fields = SCHEDULES[self.schedule].fields
        _count("schedule_steps", self.schedule_steps, positive="schedule_steps" in schedule_fields)
        if not isinstance(self.boundaries, tuple) or not isinstance(self.values, tuple):
            raise TypeError("WeightingConfig.boundaries and .values: must be tuples or lists")
        for i, b in enumerate(self.boundaries):
            _count(f"boundaries[{i}]", b)
        if any(b >= c for b, c in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"WeightingConfig.boundaries: got {self.boundaries}; must be strictly increasing")
        for i, v in enumerate(self.values):
            _in_range(f"values[{i}]", v, 0.0, 1.0)
        if "values" in schedule_fields and len(self.values) != len(self.boundaries) + 1:
            raise ValueError(f"WeightingConfig.values: got {len(self.values)} values for "
                             f"{len(self.boundaries)} boundaries; \"{self.schedule}\" needs len(boundaries) + 1")
        _in_range("entropy_low", self.entropy_low, 0.0, 1.0)
        _in_range("entropy_high", self.entropy_high, self.entropy_low, 1.0, open_low=True)
        _in_range("label_prob_power", self.label_prob_power, 0.0, math.inf, open_low=True)
        _in_range("confidence", self.confidence, 0.0, 1.0)
        _in_range("divergence_scale", self.divergence_scale, 0.0, math.inf, open_low=True)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A schedule of a over training steps, base(step), before the warm-up ramp.

    Attributes:
      name: its key in `SCHEDULES` (`WeightingConfig.schedule`).
      base: `base(config, step) -> float32`, for `step` a float32 array (a scalar where it does
        not depend on the step).
      fields: the `WeightingConfig` fields it reads (the config checks them for it).
      formula: one line for the docs table.
    """

    name: str
    base: Callable[[WeightingConfig, jax.Array], jax.Array]
    fields: tuple[str, ...]
    formula: str


def _fixed(config: WeightingConfig, step: jax.Array) -> jax.Array:
    del step
    return jnp.float32(config.alpha)


def _progress(config: WeightingConfig, step: jax.Array) -> jax.Array:
    return jnp.clip((step - config.warmup_steps) / config.schedule_steps, 0.0, 1.0)


def _linear(config: WeightingConfig, step: jax.Array) -> jax.Array:
    u = _progress(config, step)
    return config.alpha + (config.alpha_end - config.alpha) * u


def _cosine(config: WeightingConfig, step: jax.Array) -> jax.Array:
    u = _progress(config, step)
    return config.alpha_end + (config.alpha - config.alpha_end) * 0.5 * (1.0 + jnp.cos(jnp.pi * u))


def _step(config: WeightingConfig, step: jax.Array) -> jax.Array:
    boundaries = jnp.asarray(config.boundaries or (), jnp.float32)
    index = jnp.sum(step[..., None] >= boundaries, axis=-1)
    return jnp.asarray(config.values, jnp.float32)[index]


SCHEDULES: Mapping[str, Schedule] = types.MappingProxyType({schedule.name: schedule for schedule in (
    Schedule("fixed", _fixed, ("alpha",), "alpha"),
    Schedule("linear", _linear, ("alpha", "alpha_end", "schedule_steps"), "alpha + (alpha_end − alpha) u"),
    Schedule("cosine", _cosine, ("alpha", "alpha_end", "schedule_steps"),
             "alpha_end + (alpha − alpha_end)(1 + cos πu)/2"),
    Schedule("step", _step, ("boundaries", "values"), "values[i], i = the number of boundaries ≤ step"),
)})
"""The schedules of a by name (`WeightingConfig.schedule`); u = clip((step − warmup_steps) /
schedule_steps, 0, 1)."""


def schedule_alpha(config: WeightingConfig, step) -> jax.Array:
    """The scheduled weight ramp(step) * base(step), before the difficulty factor.

    Args:
      config: the policy.
      step: the integer training step, or an array of steps (may be traced).

    Returns:
      float32 in [0, 1], of `step`'s shape.
    """
    step = jnp.asarray(step, jnp.float32)
    ramp = jnp.clip(step / config.warmup_steps, 0.0, 1.0) if config.warmup_steps else jnp.float32(1.0)
    base = SCHEDULES[config.schedule].base(config, step)
    return jnp.clip(jnp.broadcast_to(ramp * base, step.shape), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class StatsRow:
    """Row function of the per-token teacher statistics at temperature 1 (no gradient):
    normalised entropy, probability of the label, correctness of the argmax, top probability and,
    when asked, KL(teacher || student)."""

    cols: Columns
    with_divergence: bool

    def __call__(self, student: jax.Array, rows: dict[str, Any], consts: Any = None) -> dict[str, jax.Array]:
        del consts  # no hyperparameters: the statistics are at temperature 1
        keep = rows["mask"]
        t = jnp.where(keep[:, None], teacher_columns(rows["teacher"], self.cols), 0.0)
        logp = jax.nn.log_softmax(t, axis=-1)
        p = jnp.exp(logp)
        labels = jnp.where(keep, rows["labels"], 0)
        entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
        support = jnp.sum(jnp.isfinite(t), axis=-1)
        label_logp = jnp.take_along_axis(logp, labels[:, None], axis=-1, mode="fill", fill_value=jnp.nan)[:, 0]
        out = {
            "teacher_entropy": jnp.where(support > 1, entropy / jnp.log(jnp.maximum(support, 2)), 0.0),
            "teacher_label_prob": jnp.exp(label_logp),
            "teacher_correct": (jnp.argmax(logp, axis=-1) == labels).astype(jnp.float32),
            "teacher_max_prob": jnp.exp(jnp.max(logp, axis=-1)),
        }
        if self.with_divergence:
            s = jnp.where(keep[:, None], jax.lax.stop_gradient(student_columns(student, self.cols)), 0.0)
            out["divergence"] = clamp_nonnegative(kl_rows(logp, jax.nn.log_softmax(s, axis=-1)))
        return {k: jnp.where(keep, v, 0.0) for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """A difficulty policy: the factor g of each token, from the teacher statistics it reads.

    Attributes:
      name: its key in `DIFFICULTIES` (`WeightingConfig.difficulty`).
      factor: `factor(config, stats, keep) -> [...]`, g before it is clipped to [0, 1] (and, for
        granularity "sequence", averaged), from the `token_stats` it names.
      statistics: the keys of `token_stats` that `factor` reads; none: no statistics are computed.
      formula: one line for the docs table.
    """

    name: str
    factor: Callable[[WeightingConfig, dict[str, jax.Array], jax.Array], jax.Array]
    statistics: tuple[str, ...]
    formula: str

    @property
    def needs_divergence(self) -> bool:
        """Reads KL(teacher || student), which `token_stats` computes only when asked."""
        return "divergence" in self.statistics


def _no_difficulty(config: WeightingConfig, stats: dict[str, jax.Array], keep: jax.Array) -> jax.Array:
    del config, stats
    return jnp.ones(keep.shape, jnp.float32)


def _teacher_entropy(config: WeightingConfig, stats: dict[str, jax.Array], keep: jax.Array) -> jax.Array:
    del keep
    return (stats["teacher_entropy"] - config.entropy_low) / (config.entropy_high - config.entropy_low)


def _teacher_label_prob(config: WeightingConfig, stats: dict[str, jax.Array], keep: jax.Array) -> jax.Array:
    del keep
    return jnp.maximum(1.0 - stats["teacher_label_prob"], 0.0) ** config.label_prob_power


def _teacher_correctness(config: WeightingConfig, stats: dict[str, jax.Array], keep: jax.Array) -> jax.Array:
    del keep
    confidently_wrong = (stats["teacher_correct"] == 0) & (stats["teacher_max_prob"] >= config.confidence)
    return jnp.where(confidently_wrong, 0.0, 1.0)


def _divergence(config: WeightingConfig, stats: dict[str, jax.Array], keep: jax.Array) -> jax.Array:
    del keep
    return -jnp.expm1(-stats["divergence"] / config.divergence_scale)


DIFFICULTIES: Mapping[str, Difficulty] = types.MappingProxyType({difficulty.name: difficulty for difficulty in (
    Difficulty("none", _no_difficulty, (), "g = 1 (pure schedule, including the classic fixed-α KD)"),
    Difficulty("teacher_entropy", _teacher_entropy, ("teacher_entropy",),
               "uncertain teacher → more soft: g = clip((H(p)/log n − entropy_low)/(entropy_high − entropy_low), "
               "0, 1), n = the number of columns with finite teacher logits"),
    Difficulty("teacher_label_prob", _teacher_label_prob, ("teacher_label_prob",),
               "confident and right → the hard label suffices: g = (1 − p(y))^label_prob_power"),
    Difficulty("teacher_correctness", _teacher_correctness, ("teacher_correct", "teacher_max_prob"),
               "teacher confidently wrong → trust the label: g = 0 where argmax p ≠ y and max p ≥ confidence, "
               "else 1"),
    Difficulty("divergence", _divergence, ("divergence",),
               "student far from the teacher → more soft: g = 1 − exp(−KL(p ‖ q)/divergence_scale), q the "
               "student at T = 1"),
)})
"""The difficulty policies by name (`WeightingConfig.difficulty`); p is the teacher's
distribution at temperature 1, y the label."""


def _difficulty(config: WeightingConfig, stats: dict[str, jax.Array], keep: jax.Array) -> jax.Array:
    g = DIFFICULTIES[config.difficulty].factor(config, stats, keep)
    g = jnp.where(keep, jnp.clip(g, 0.0, 1.0), 0.0)
    if config.granularity == "sequence":
        count = jnp.sum(keep, axis=-1, keepdims=True)
        g = jnp.broadcast_to(jnp.sum(g, axis=-1, keepdims=True) / jnp.maximum(count, 1), g.shape)
    return g


def alpha_from_stats(config: WeightingConfig, step, stats: dict[str, jax.Array], keep: jax.Array) -> jax.Array:
    """a from precomputed teacher statistics (`StatsRow`), stop-gradient, 0 on masked
    tokens. Used by `compute_alpha` and `distillation_loss`, which computes the statistics in the
    same pass as the losses."""
    a = jnp.clip(schedule_alpha(config, step) * _difficulty(config, stats, keep), 0.0, 1.0)
    return jax.lax.stop_gradient(jnp.where(keep, a, 0.0))


def token_stats(student_logits: jax.Array, teacher_logits: jax.Array | SparseTeacher, labels: jax.Array, *,
                mask: jax.Array | None = None, with_divergence: bool = False, vocab_size: int | None = None,
                vocab_map=None, chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> dict[str, jax.Array]:
    """Per-token teacher statistics at temperature 1, the inputs of the difficulty factor.

    Args:
      student_logits: `[..., V]`; only read with with_divergence=True.
      teacher_logits: `[..., V_T]` or a `SparseTeacher`.
      labels: int `[...]`; labels < 0 are ignored like `mask`.
      mask: bool `[...]`; None keeps all tokens.
      with_divergence: also compute KL(teacher || student).
      vocab_size, vocab_map, chunk_size: as for the KD terms.

    Returns:
      float32 `[...]` arrays, 0 on masked tokens: "teacher_entropy" (H / log n, in [0, 1]),
      "teacher_label_prob", "teacher_correct" (1.0 where argmax = label), "teacher_max_prob",
      and "divergence" when asked.
    """
    lead = student_logits.shape[:-1]
    cols = resolve_columns(student_logits.shape[-1], check_teacher(student_logits, teacher_logits),
                           vocab_size=vocab_size, vocab_map=vocab_map)
    rows = {"teacher": teacher_logits, "labels": labels, "mask": token_mask(lead, mask, labels)}
    return map_tokens(StatsRow(cols, with_divergence), jax.lax.stop_gradient(student_logits), rows, None,
                      chunk_size=chunk_size)


def compute_alpha(config: WeightingConfig, *, step, student_logits: jax.Array,
                  teacher_logits: jax.Array | SparseTeacher, labels: jax.Array, mask: jax.Array | None = None,
                  vocab_size: int | None = None, vocab_map=None,
                  chunk_size: int | str | None = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """The soft weight a per token for a training step.

    Args:
      config: the policy.
      step: the integer training step (may be traced).
      student_logits: `[..., V]`.
      teacher_logits: `[..., V_T]` or a `SparseTeacher`.
      labels: int `[...]`; labels < 0 are ignored like `mask`.
      mask: bool `[...]`; None keeps all tokens.
      vocab_size, vocab_map, chunk_size: as for the KD terms.

    Returns:
      float32 with the shape of labels, in [0, 1], 0 on masked tokens, no gradient.
    """
    keep = token_mask(labels.shape, mask, labels)
    difficulty = DIFFICULTIES[config.difficulty]
    if not difficulty.statistics:
        return _alpha_jit(config, step, {}, keep)
    stats = token_stats(student_logits, teacher_logits, labels, mask=mask,
                        with_divergence=difficulty.needs_divergence, vocab_size=vocab_size,
                        vocab_map=vocab_map, chunk_size=chunk_size)
    return _alpha_jit(config, step, stats, keep)


_alpha_jit = jax.jit(alpha_from_stats, static_argnums=0)


def alpha_stats(alpha: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Mean and p10 / p50 / p90 of a over the unmasked tokens, for logging."""
    quantiles = masked_quantiles(alpha, mask, ALPHA_QUANTILES)
    out = {"alpha_mean": token_mean(alpha, mask)}
    for q, value in zip(ALPHA_QUANTILES, quantiles):
        out[f"alpha_p{round(100 * q)}"] = value
    return out
