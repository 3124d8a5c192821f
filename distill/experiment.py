"""What a config means on this disk: every model's architecture, what each student inherits, and
the checks that need them.

`resolve(cfg)` reads what the config points at once (the teacher's architecture from its preset,
run, HF directory or cache), resolves every student's loss, optimizer, sharding rules and MetaP
base from the run's sections, and checks the models against each other (one vocabulary, the
sequence length, image inputs, on-policy rows, router distillation, the cache's batches). The
result is an `Experiment`; everything downstream (set-up, the step, benchmarks, notebooks) reads
its fields instead of resolving the config again.

    exp = distill.resolve(cfg)
    exp.teacher.model.hidden_size, [s.model.vocab_size for s in exp.students], exp.students[0].loss.kd
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.config import Config, LossConfig, StudentConfig, TeacherConfig
from distill.configtools import from_dict
from distill.data.digits import check_image_models
from distill.errors import ConfigError
from distill.metap import base_config
from distill.model import ModelConfig
from distill.model.presets import lookup
from distill.model.sharding import DEFAULT_RULES, resolve_rules
from distill.optim import OptimConfig
from student.presets import STUDENT_PRESETS
from teacher.cache import complete_meta
from teacher.sources import SOURCES, TeacherSource, teacher_model_config


@dataclass(frozen=True)
class TeacherSpec:
    config: TeacherConfig
    model: ModelConfig
    optim: OptimConfig
    rules: dict  # logical axis -> mesh axes: the run's rules with teacher.sharding applied
    metap_base: ModelConfig | None  # MetaP's base model (optim.metap_base), None without MetaP

    @property
    def source(self) -> TeacherSource:
        return SOURCES[self.config.source]

    @property
    def trains(self) -> bool:
        return self.config.trains


@dataclass(frozen=True)
class StudentSpec:
    index: int
    config: StudentConfig
    model: ModelConfig
    loss: LossConfig  # its own loss section, or the run's (a control's loss is plain CE whatever it says)
    optim: OptimConfig
    rules: dict
    metap_base: ModelConfig | None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def control(self) -> bool:
        return self.config.control

    @property
    def where(self) -> str:
        """How error messages name it: `students[i]`."""
        return f"students[{self.index}]"


@dataclass(frozen=True)
class Experiment:
    config: Config
    teacher: TeacherSpec
    students: tuple[StudentSpec, ...]
    mesh_rules: dict  # the run's logical-axis rules: the defaults with mesh.rules applied

    @property
    def teacher_warmup(self) -> int:
        return self.config.teacher_warmup()

    def models(self) -> list[tuple[str, ModelConfig]]:
        """(role, model config) of the teacher and every student, as error messages name them."""
        return [("teacher", self.teacher.model)] + [(s.where, s.model) for s in self.students]

    def forward_flops_per_step(self) -> tuple[float, list[float]]:
        """Forward FLOPs over one step's batch: (the teacher's, [each student's]). A model that
        trains costs 3x its forward (backward = 2x); a frozen teacher 1x; a cached teacher none."""
        data = self.config.data
        tokens, seq = data.batch_size * data.seq_len, data.seq_len
        teacher = self.teacher.model.forward_flops_per_token(seq) * tokens if self.teacher.source.runs else 0.0
        return teacher, [s.model.forward_flops_per_token(seq) * tokens for s in self.students]

    def check_tokenizer(self, vocab_size: int) -> None:
        """ConfigError unless every model's vocabulary holds the data's `vocab_size` tokens."""
        for role, model in self.models():
            if vocab_size > model.vocab_size:
                raise ConfigError(f"{role}.model.vocab_size={model.vocab_size}: the tokenizer has "
                                  f"{vocab_size} tokens; the model needs at least as many")


def resolve(cfg: Config) -> Experiment:
    """`cfg` with every model resolved and checked against the others (see the module docstring)."""
    mesh_rules = resolve_rules(DEFAULT_RULES, cfg.mesh.rules, "mesh.rules")
    teacher_model = teacher_model_config(cfg.teacher)
    teacher_optim = cfg.teacher.optim or cfg.optim
    teacher = TeacherSpec(cfg.teacher, teacher_model, teacher_optim,
                          resolve_rules(mesh_rules, cfg.teacher.sharding, "teacher.sharding"),
                          base_config(teacher_model, teacher_optim.metap_base, "teacher.optim.metap_base"))
    students = tuple(_student(cfg, i, s, mesh_rules) for i, s in enumerate(cfg.students))
    exp = Experiment(cfg, teacher, students, mesh_rules)
    _check_models(exp)
    for student in students:
        _check_on_policy(exp, student)
        _check_router_kd(exp, student)
    if cfg.teacher.source == "cache":
        _check_cache(exp)
    return exp


def _student(cfg: Config, index: int, s: StudentConfig, mesh_rules: dict) -> StudentSpec:
    where = f"students[{index}]"
    base = lookup(STUDENT_PRESETS, s.preset, where, {}).to_dict() if s.preset else {}
    model = from_dict(ModelConfig, {**base, **s.model}, f"{where}.model")
    optim = s.optim or cfg.optim
    return StudentSpec(index, s, model, s.loss or cfg.loss, optim,
                       resolve_rules(mesh_rules, s.sharding, f"{where}.sharding"),
                       base_config(model, optim.metap_base, f"{where}.optim.metap_base"))


def _check_models(exp: Experiment) -> None:
    cfg, teacher = exp.config, exp.teacher.model
    for s in exp.students:
        if s.model.vocab_size != teacher.vocab_size:
            raise ConfigError(f"{s.where}.model.vocab_size={s.model.vocab_size}: differs from the teacher's "
                              f"{teacher.vocab_size}; distillation compares distributions over one vocabulary")
    for role, model in exp.models():
        if cfg.data.seq_len > model.max_position_embeddings:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len}: longer than {role}.model."
                              f"max_position_embeddings ({model.max_position_embeddings})")
    check_image_models(cfg.data, cfg.teacher.source, exp.models())


def _check_on_policy(exp: Experiment, student: StudentSpec) -> None:
    cfg, on_policy, own = exp.config, student.loss.on_policy, student.config.loss is not None
    if not on_policy.active or (student.control and not own):  # a control ignores the run's loss
        return
    where = f"{student.where}.loss.on_policy" if own else "loss.on_policy"
    if student.control:
        raise ConfigError(f"{where}.fraction={on_policy.fraction}: {student.where} is a control (hard labels "
                          "only); give on_policy to a distilled student, or set fraction: 0")
    if not exp.teacher.source.runs:
        raise ConfigError(f"{where}.fraction={on_policy.fraction}: a cached teacher cannot score the student's "
                          "samples; use teacher.source scratch, run or hf, or set fraction: 0")
    if student.model.vision is not None:
        raise ConfigError(f"{where}.fraction={on_policy.fraction}: {student.where} reads images, and "
                          "sampling (distill.model.generate) takes text prompts only; set fraction: 0")
    if cfg.teacher.mutual_weight > 0:
        raise ConfigError(f"{where}.fraction={on_policy.fraction}: teacher.mutual_weight compares the teacher "
                          "with the students on data rows, and this student replaces some; set one of them to 0")
    if on_policy.prompt_tokens >= cfg.data.seq_len:
        raise ConfigError(f"{where}.prompt_tokens={on_policy.prompt_tokens}: must be shorter than "
                          f"data.seq_len ({cfg.data.seq_len}) so the student writes something")
    rows = cfg.data.batch_size // cfg.train.grad_accum
    if on_policy.rows(rows) == 0:
        raise ConfigError(f"{where}.fraction={on_policy.fraction}: rounds to 0 of a micro-batch's {rows} rows; "
                          f"use at least {0.5 / rows:.3g}")


def _check_router_kd(exp: Experiment, student: StudentSpec) -> None:
    weight, teacher = student.loss.router_kd_weight, exp.teacher.model
    if weight <= 0 or student.control:
        return
    if not exp.teacher.source.runs:
        raise ConfigError(f"{student.where}.loss.router_kd_weight={weight}: a cached teacher has no "
                          "router logits; set it to 0")
    if (student.model.num_moe_layers != teacher.num_moe_layers
            or student.model.num_local_experts != teacher.num_local_experts):
        raise ConfigError(f"{student.where}.loss.router_kd_weight={weight}: router distillation "
                          "needs the teacher's number of MoE layers and experts; set it to 0")


def _check_cache(exp: Experiment) -> None:
    """Refuse a run whose batches are not the cache's: other data section, seed, geometry, or more steps."""
    cfg, path = exp.config, exp.config.teacher.path
    meta = complete_meta(path)
    data = cfg.to_dict()["data"]  # batch size and sequence length included
    changed = [f"data.{key}" for key in sorted(set(data) | set(meta["data"])) if meta["data"].get(key) != data.get(key)]
    changed += ["train.seed"] if meta["seed"] != cfg.train.seed else []
    if changed:
        raise ConfigError(f"teacher.path={str(path)!r}: the cache holds other batches than this run reads "
                          f"(differs in: {', '.join(changed)}); use the cache's values (its meta.json) or "
                          "write a cache for this run with `distill cache`")
    if cfg.train.steps > meta["steps"]:
        raise ConfigError(f"train.steps={cfg.train.steps}: the cache holds {meta['steps']} steps; "
                          "train at most that long, or write a longer cache")
    for s in exp.students:
        k = s.loss.teacher_top_k
        if k is not None and k > meta["k"]:
            raise ConfigError(f"{s.where}.loss.teacher_top_k={k}: the cache holds the top {meta['k']}; "
                              f"use at most {meta['k']}, or write a cache with a larger --k")
