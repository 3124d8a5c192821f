"""Distillation losses: cross-entropy, the KD family, dynamic soft/hard weighting, difficulty
filtering, MoE auxiliaries.

Pure JAX functions, no model code, no state. Every loss returns per-token values (shape `[...]`
for logits `[..., vocab]`), computed in float32, 0 on masked tokens; reduce them with
`token_mean` or `sequence_mean`. Conventions, formulas and references: docs/losses.md.
"""

from losses._chunking import DEFAULT_CHUNK_SIZE
from losses._cross_entropy import cross_entropy
from losses._distillation import distillation_loss
from losses._divergences import KD_TERMS, dkd, forward_kl, jsd, reverse_kl, skew_kl, skew_reverse_kl, tvd
from losses._head import Head
from losses._kd import KDTerm
from losses._moe import load_balancing_loss, router_distillation, router_z_loss
from losses._reduce import masked_quantiles, sequence_mean, token_mean
from losses._vocab import PADDING_TOLERANCE, SparseTeacher, resolve_columns, top1, top_k_teacher
from losses.filtering import SCORES, FilterConfig, row_scores, row_weights
from losses.weighting import (DIFFICULTIES, GRANULARITIES, SCHEDULES, WeightingConfig, alpha_stats, compute_alpha,
                              schedule_alpha, token_stats)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DIFFICULTIES",
    "FilterConfig",
    "GRANULARITIES",
    "Head",
    "KD_TERMS",
    "KDTerm",
    "PADDING_TOLERANCE",
    "SCHEDULES",
    "SCORES",
    "SparseTeacher",
    "WeightingConfig",
    "alpha_stats",
    "compute_alpha",
    "cross_entropy",
    "distillation_loss",
    "dkd",
    "forward_kl",
    "jsd",
    "load_balancing_loss",
    "masked_quantiles",
    "resolve_columns",
    "reverse_kl",
    "row_scores",
    "row_weights",
    "router_distillation",
    "router_z_loss",
    "schedule_alpha",
    "sequence_mean",
    "skew_kl",
    "skew_reverse_kl",
    "token_mean",
    "token_stats",
    "top1",
    "top_k_teacher",
    "tvd",
]
