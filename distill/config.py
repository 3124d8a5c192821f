"""The run configuration as written: typed sections, YAML loading, dotted overrides, validation.

A YAML file has the sections `run`, `data`, `teacher`, `students` (a list; or `student` for
one), `loss`, `optim`, `mesh`, `train`. Every field is documented where it is declared; every
error names the dotted field, the bad value and the allowed values.

A `Config` is what the file says and nothing else: building one reads no other file. What the
config means on this disk (the teacher's architecture from the run, HF directory or cache it
names; what each student inherits from the run's sections) is `distill.experiment.resolve`'s
job, which also checks the models against each other and against the data.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from distill.configtools import (field_names, from_dict, parse_override, read_config_mapping, set_dotted, to_dict,
                                 unknown_key_error)
from distill.data import DataConfig
from distill.errors import ConfigError
from distill.onpolicy import OnPolicyConfig
from distill.optim import OptimConfig
from losses import KD_TERMS, FilterConfig, WeightingConfig


MAX_NAME_LENGTH = 100
"""Characters of a name that becomes a path component (file systems allow 255 bytes in all)."""


def check_path_name(field_name: str, value, purpose: str) -> None:
    """A name that becomes part of a path or tag: one safe component (no `/`, `..` or leading dot)
    of at most `MAX_NAME_LENGTH` characters."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", value):
        raise ConfigError(f"{field_name}={value!r}: letters, digits and ._+- only, starting with a letter or "
                          f"digit ({purpose})")
    if len(value) > MAX_NAME_LENGTH:
        raise ConfigError(f"{field_name}={value[:20]!r}... ({len(value)} characters): at most {MAX_NAME_LENGTH} "
                          f"characters ({purpose}); choose a shorter name")


@dataclass(frozen=True)
class RunSection:
    name: str = "run"  # a readable name; the default run directory is runs/<name>
    dir: str | None = None  # the run directory (config, metrics, TensorBoard events, checkpoints)
    compilation_cache: str | None = None  # XLA's persistent compilation cache: a folder, or off; null:
    # $DISTILL_COMPILATION_CACHE, else ~/.cache/distill/xla (distill.compile_cache)

    def __post_init__(self):
        check_path_name("run.name", self.name, "it names runs/<name>; to write elsewhere set run.dir")

    @property
    def path(self) -> Path:
        return Path(self.dir) if self.dir else Path("runs") / self.name


@dataclass(frozen=True)
class LossConfig:
    """A student's loss: per token (1 - a) * CE(hard) + a * KD(teacher, student; T), + router terms."""

    kd: str = "forward_kl"  # the KD term: one of losses.KD_TERMS
    kd_kwargs: dict = field(default_factory=dict)  # the KD term's parameters, e.g. {beta: 0.5} for jsd
    temperature: float = 1.0  # T of the KD term (KD is multiplied by T^2)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)  # how a moves (losses.WeightingConfig)
    label_smoothing: float = 0.0  # of the hard-label CE
    load_balance_weight: float = 0.01  # Switch load-balancing loss, summed over MoE layers
    router_z_weight: float = 0.001  # router z-loss, summed over MoE layers
    router_kd_weight: float = 0.0  # student router matches the teacher's (needs equal expert counts)
    teacher_top_k: int | None = None  # distil from the teacher's k most probable tokens only (null: all)
    teacher_tail: Literal["uniform", "renormalize"] = "uniform"  # the mass outside a top-k (losses.SparseTeacher)
    filter: FilterConfig = field(default_factory=FilterConfig)  # drop the easiest rows (losses.filtering)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)  # rows the student writes (distill.onpolicy)
    fused_head: bool = False  # true: the losses form the logits chunk by chunk from the final hidden states
    # (losses.Head), no [tokens, vocab] logits, for real vocabularies (docs/losses.md); false: the model returns full
    # logits (the same values to float32 rounding; faster while they fit). The run's loss section decides for the
    # teacher, each student's for itself

    def __post_init__(self):
        if self.kd not in KD_TERMS:
            raise ConfigError(f"kd={self.kd!r}: allowed values are {', '.join(sorted(KD_TERMS))}")
        try:
            KD_TERMS[self.kd].check_params(self.kd_kwargs)
        except ValueError as error:
            raise ConfigError(f"kd={self.kd!r}: {error}") from None
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature}: must be > 0")
        for name in ("load_balance_weight", "router_z_weight", "router_kd_weight", "label_smoothing"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.teacher_top_k is not None and self.teacher_top_k < 1:
            raise ConfigError(f"teacher_top_k={self.teacher_top_k}: must be >= 1 (null: the whole vocabulary)")
        if self.on_policy.active and self.filter.active:
            raise ConfigError("on_policy.fraction and filter.score: use one of them; the filter ranks data rows "
                              "by their labels, and on-policy rows have none (set filter.score: none)")


@dataclass(frozen=True)
class TeacherConfig:
    """Where the soft targets come from, and whether the teacher trains."""

    preset: str | None = "cpu-teacher"  # a name in teacher.presets (null: model gives every field)
    model: dict = field(default_factory=dict)  # ModelConfig fields overriding the preset
    source: Literal["scratch", "run", "hf", "cache"] = "scratch"  # fresh weights, a run or HF directory, or
    # an offline logit cache (`distill cache`: no teacher runs, students distil from its top-k)
    path: str | None = None  # the run, HF or cache directory for source run/hf/cache
    trainable: bool | None = None  # null: trains when source is scratch (co-distillation), else frozen
    warmup_steps: int = 0  # teacher-only steps before the students start
    warmup_fraction: float | None = None  # the same as a fraction of train.steps (replaces warmup_steps)
    target: Literal["live", "ema", "stale"] = "live"  # which copy the students distil from
    ema_decay: float = 0.99  # target ema: target = decay * target + (1 - decay) * teacher, every step
    refresh_every: int = 100  # target stale: copy the teacher into the target every this many steps
    mutual_weight: float = 0.0  # co-trained teacher: weight of KD(students' mean -> teacher); 0 = off
    load_balance_weight: float = 0.01
    router_z_weight: float = 0.001
    optim: OptimConfig | None = None  # null: the run's optim section
    sharding: dict | str | None = None  # logical-axis rules over mesh.rules, or "replicated"; null: mesh.rules

    def __post_init__(self):
        if self.source != "scratch" and not self.path:
            raise ConfigError(f"teacher.path: required when teacher.source is {self.source!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"teacher.warmup_steps={self.warmup_steps}: must be >= 0")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"teacher.warmup_fraction={self.warmup_fraction}: must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"teacher.ema_decay={self.ema_decay}: must be in [0, 1)")
        if self.refresh_every < 1:
            raise ConfigError(f"teacher.refresh_every={self.refresh_every}: must be >= 1")
        if self.mutual_weight < 0:
            raise ConfigError(f"teacher.mutual_weight={self.mutual_weight}: must be >= 0")
        if self.source == "cache":
            trained = {"trainable": self.trainable is True, "warmup_steps": self.warmup_steps > 0,
                       "warmup_fraction": bool(self.warmup_fraction), "mutual_weight": self.mutual_weight > 0,
                       "target": self.target != "live"}
            name = next((name for name, set_ in trained.items() if set_), None)
            if name:
                raise ConfigError(f"teacher.{name}={getattr(self, name)!r}: a cached teacher does not run or "
                                  "train; remove it (teacher.source=cache)")
        if self.trainable is False and self.target != "live":
            raise ConfigError(f"teacher.target={self.target!r}: a frozen teacher has only the live copy")

    @property
    def trains(self) -> bool:
        return self.source == "scratch" if self.trainable is None else self.trainable


@dataclass(frozen=True)
class StudentConfig:
    name: str = "student"  # the tag in metrics: student/<name>/...
    preset: str | None = "cpu-student"  # a name in student.presets
    model: dict = field(default_factory=dict)  # ModelConfig fields overriding the preset
    control: bool = False  # hard labels only (a = 0, never sees the teacher): the run's own baseline
    init: Literal["scratch", "teacher"] = "scratch"  # fresh weights, or copied from the teacher
    init_layers: tuple[int, ...] | None = None  # init teacher: teacher layer for each student layer
    init_experts: tuple[int, ...] | None = None  # init teacher: teacher expert for each student expert
    loss: LossConfig | None = None  # null: the run's loss section
    optim: OptimConfig | None = None  # null: the run's optim section
    sharding: dict | str | None = None  # logical-axis rules over mesh.rules, or "replicated" (pure data parallel)

    def __post_init__(self):
        check_path_name("students.name", self.name, "it names the student's metrics, student/<name>/...")
        if self.name == "teacher":
            raise ConfigError("students.name='teacher': the teacher's name (its TensorBoard sub-run is tb/teacher); "
                              "choose another")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes (-1 fills the devices left over, at most one axis), the logical-axis
    rules every model starts from (docs/sharding.md), and multi-host start-up."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    rules: dict = field(default_factory=dict)  # logical axis -> mesh axis / list / null, over the defaults
    distributed: Literal["auto", "on", "off"] = "auto"  # jax.distributed.initialize(); auto: from the environment


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200  # optimizer steps (teacher warm-up steps included)
    seed: int = 0  # parameters, data order
    grad_accum: int = 1  # micro-batches per step (data.batch_size is the global batch of one step)
    eval_every: int = 50  # evaluate on the validation split every this many steps (and at the end)
    eval_batches: int = 8  # validation batches per evaluation (null-like 0: the whole split)
    log_every: int = 10  # metrics to metrics.jsonl / TensorBoard and the progress line
    checkpoint_every: int = 100  # orbax checkpoint interval (and at the end)
    keep_checkpoints: int = 2  # checkpoints kept (max_to_keep)
    on_nonfinite: Literal["skip", "stop"] = "skip"  # a NaN/inf gradient: skip that model's update (counted
    # in <model>/skipped_updates), or stop at the next log or checkpoint step, leaving the last checkpoint intact
    max_skipped_fraction: float = 0.2  # on_nonfinite=skip: stop (exit 3) when a model's skipped updates
    # exceed this fraction of skip_window steps (a diverged run skips most of them); 1: never stop
    skip_window: int = 50  # the last this many steps, counted at log and checkpoint steps
    debug_nonfinite_step: int | None = None  # testing hook: every gradient is NaN at this step

    def __post_init__(self):
        for name in ("steps", "grad_accum", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints",
                     "skip_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be >= 1")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ConfigError(f"train.max_skipped_fraction={self.max_skipped_fraction}: must be in [0, 1] (a fraction "
                              "of train.skip_window's steps; 1 never stops)")
        if self.eval_batches < 0:
            raise ConfigError(f"train.eval_batches={self.eval_batches}: must be >= 0")


@dataclass(frozen=True)
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    students: tuple[StudentConfig, ...] = (StudentConfig(),)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        names = [s.name for s in self.students]
        if not names and not self.teacher.trains:
            raise ConfigError("students: at least one student is required when the teacher is frozen "
                              "(an empty list pre-trains the teacher alone)")
        if len(set(names)) != len(names):
            raise ConfigError(f"students: names must be unique, got {names}")
        if self.students and self.train.steps <= self.teacher_warmup():
            raise ConfigError(f"train.steps={self.train.steps}: must exceed teacher.warmup_steps "
                              f"({self.teacher_warmup()}) so the students train")
        if self.data.batch_size % self.train.grad_accum:
            raise ConfigError(f"train.grad_accum={self.train.grad_accum}: must divide data.batch_size "
                              f"({self.data.batch_size})")

    def teacher_warmup(self) -> int:
        """Teacher-only steps: `warmup_fraction` of the steps when set, else `warmup_steps`; every
        step when there are no students (pre-training a teacher for offline distillation)."""
        if not self.students:
            return self.train.steps
        fraction = self.teacher.warmup_fraction
        return self.teacher.warmup_steps if fraction is None else int(round(fraction * self.train.steps))

    def to_dict(self) -> dict:
        return to_dict(self)


_SECTIONS = field_names(Config)
_SECTION_TYPES = {"run": RunSection, "data": DataConfig, "teacher": TeacherConfig, "loss": LossConfig,
                  "optim": OptimConfig, "mesh": MeshConfig, "train": TrainConfig}


def _normalise(raw: dict) -> dict:
    raw = dict(raw or {})
    if "student" in raw:
        if "students" in raw:
            raise ConfigError("student and students: give one of them (student is shorthand for a one-item list)")
        raw["students"] = [raw.pop("student")]
    for key in raw:
        if key not in _SECTIONS:
            raise unknown_key_error("", key, _SECTIONS + ("student",))
    return raw


def _resolve_keyword(key: str) -> str:
    """A Python keyword override: a whole section (`students=[...]`), `train__steps`, or a field
    name unique across sections (`steps`)."""
    if key in _SECTIONS:
        return key
    if "__" in key:
        return key.replace("__", ".")
    owners = [name for name, section in _SECTION_TYPES.items() if key in field_names(section)]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    if not owners:
        raise ConfigError(f"{key}: not a field of any section; use section__field=value, e.g. train__steps=50")
    raise ConfigError(f"{key}: ambiguous, a field of {', '.join(owners)}; use e.g. {owners[0]}__{key}=...")


def build_config(raw: dict, overrides: list[str] | dict | None = None) -> Config:
    """A validated `Config` from a parsed YAML mapping and dotted overrides."""
    tree = copy.deepcopy(_normalise(raw))
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        key = key.replace("student.", "students.0.", 1) if key.startswith("student.") else key
        if key.split(".")[0] not in _SECTIONS:
            raise unknown_key_error("", key.split(".")[0], _SECTIONS)
        set_dotted(tree, key, value)
    return from_dict(Config, tree)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **keywords) -> Config:
    """Load a YAML config (or the defaults when `path` is None) with overrides.

    `overrides` are `dotted.key=value` strings (the CLI form); `keywords` are Python overrides:
    `train__steps=50`, `{"train.steps": 50}` unpacked, a field name unique across sections
    (`steps=200`), or a whole section, which replaces the file's (`students=[{"name": "a"}, ...]`).
    """
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        raw = read_config_mapping(path, f"config file {path}")
    combined = {**dict(parse_override(o) for o in overrides or [])}
    for key, value in keywords.items():
        combined[key if "." in key else _resolve_keyword(key)] = value
    return build_config(raw, combined)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
