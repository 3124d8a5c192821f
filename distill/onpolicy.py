"""On-policy distillation (GKD: Agarwal et al. 2024, arXiv:2306.13649; TRL's `GKDTrainer`).

Off-policy KD trains the student on data rows; at generation time it conditions on its own
tokens, which it was never trained on. On-policy KD lets the student write part of the batch
itself: in every micro-batch the first `round(fraction * rows)` rows keep only their first
`prompt_tokens` tokens, the student (its parameters at the start of the step, no gradient)
samples the rest with a KV cache, the teacher scores the samples, and the student is trained on
them with its KD term alone (a sampled token is not a hard label). `fraction` is GKD's lambda.
`start_step` keeps a student off-policy for its first steps: a student that has not learnt
anything yet writes noise, and GKD starts from a trained student.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from distill.errors import ConfigError
from distill.model.generate import generate
from distill.model.transformer import Transformer


@dataclass(frozen=True)
class OnPolicyConfig:
    fraction: float = 0.0  # lambda: the share of each micro-batch's rows the student writes (0: off-policy)
    prompt_tokens: int = 32  # the data tokens an on-policy row keeps as its prompt; the student writes the rest
    temperature: float = 1.0  # of the student's sampling; 0: greedy
    top_k: int | None = None  # sample among the k most probable tokens (null: the whole vocabulary)
    start_step: int = 0  # the student's own steps of off-policy KD before it starts writing rows

    def __post_init__(self):
        if not 0 <= self.fraction <= 1:
            raise ConfigError(f"on_policy.fraction={self.fraction!r}: must be in [0, 1] (0 turns it off)")
        if self.prompt_tokens < 1:
            raise ConfigError(f"on_policy.prompt_tokens={self.prompt_tokens!r}: must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"on_policy.temperature={self.temperature!r}: must be >= 0 (0: greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"on_policy.top_k={self.top_k!r}: must be >= 1 (null: the whole vocabulary)")
        if self.start_step < 0:
            raise ConfigError(f"on_policy.start_step={self.start_step!r}: must be >= 0 (0: from the student's first step)")

    @property
    def active(self) -> bool:
        return self.fraction > 0

    def rows(self, batch_rows: int) -> int:
        """How many of a micro-batch's `batch_rows` rows the student writes (rounded half up)."""
        return int(self.fraction * batch_rows + 0.5)


def student_rows(model: Transformer, tokens_bs: jax.Array, cfg: OnPolicyConfig, key: jax.Array) -> dict[str, jax.Array]:
    """Rows the student wrote: each row of `tokens` keeps its first `prompt_tokens` tokens and the
    model samples `S + 1 - prompt_tokens` more; returned as a batch (tokens, labels, mask,
    positions, segment_ids) whose mask keeps only the sampled labels."""
    b, s = tokens_bs.shape
    written = jax.lax.stop_gradient(generate(model, tokens_bs[:, :cfg.prompt_tokens], s + 1, key,
                                             temperature=cfg.temperature, top_k=cfg.top_k))
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return {"tokens": written[:, :-1], "labels": written[:, 1:],
            "mask": (positions >= cfg.prompt_tokens - 1).astype(jnp.float32),
            "positions": positions, "segment_ids": jnp.zeros((b, s), jnp.int32)}
