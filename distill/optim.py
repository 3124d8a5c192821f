"""Optimizers: AdamW with linear warm-up and a decay schedule, global-norm clipping, and an
update that is skipped when its gradient is not finite."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from distill.errors import ConfigError


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and a decay schedule, global-norm clipping."""

    learning_rate: float = 3e-3  # peak learning rate
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up, to min_lr_ratio * peak
    warmup_steps: int = 50  # linear warm-up from 0 to the peak
    min_lr_ratio: float = 0.1  # final learning rate / peak (cosine, linear)
    weight_decay: float = 0.1  # decoupled weight decay (AdamW); not applied to norms
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global gradient norm clip; null turns it off
    metap_base: dict | None = None  # MetaP: ModelConfig fields of the base model the learning rate was tuned
    # on (e.g. {hidden_size: 64}); per-parameter init and learning-rate multipliers by width and depth

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate={self.learning_rate}: must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps}: must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ConfigError(f"clip_norm={self.clip_norm}: must be > 0 or null")


def _cosine(peak: float, end: float, warmup: int, total_steps: int):
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end)


def _linear(peak: float, end: float, warmup: int, total_steps: int):
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                 optax.linear_schedule(peak, end, max(total_steps - warmup, 1))], [warmup])


def _constant(peak: float, end: float, warmup: int, total_steps: int):
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])


SCHEDULES = {"cosine": _cosine, "linear": _linear, "constant": _constant}
"""Learning-rate schedules by name: (peak, end, warm-up steps, total steps) -> optax schedule."""


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   per_parameter: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """AdamW + warm-up/decay schedule + global-norm clipping; no weight decay on 1-D params (norms).
    `per_parameter` (MetaP's learning-rate multipliers) scales the final updates."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    schedule = SCHEDULES[cfg.schedule](cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, warmup, total_steps)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    parts = ([optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []) + [adamw]
    return optax.chain(*parts, *([per_parameter] if per_parameter else []))


def current_lr(opt_state) -> jax.Array:
    """The schedule's learning rate now (before any per-parameter multiplier)."""
    return next(s for s in opt_state if hasattr(s, "hyperparams")).hyperparams["learning_rate"]


def apply_finite(tx: optax.GradientTransformation, params, opt_state, grads):
    """The optimizer update, or none at all when the gradient is not finite (NaN/inf): parameters
    and optimizer state stay as they were. Returns (params, opt_state, updated)."""
    updates, new_opt_state = tx.update(grads, opt_state, params)
    finite = jnp.isfinite(optax.tree.norm(grads))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    return keep(optax.apply_updates(params, updates), params), keep(new_opt_state, opt_state), finite
