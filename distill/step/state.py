"""What the step reads and writes: the training state, the batch, and a model's forward pass."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx, struct

from distill.model import ModelOutput
from distill.model.sharding import ShardingContext, use_sharding

Batch = dict[str, jax.Array]
"""tokens, labels, mask, segment_ids, positions: `[rows, seq]` (`train_step` takes them as
micro-batches, `[grad_accum, rows, seq]`); images for image-and-text data; with a cached teacher
also teacher_indices, teacher_log_probs `[..., k]` and teacher_label_log_prob (teacher/cache.py)."""


@struct.dataclass
class ModelState:
    params: Any  # nnx.State of the model's nnx.Param variables
    opt_state: Any  # optax state; None for a frozen teacher


@struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps completed (teacher warm-up included)
    teacher: ModelState
    target: Any  # params the students distil from when teacher.target is ema/stale, else None
    students: tuple[ModelState, ...]
    skipped: jax.Array  # int32 [1 + students]: updates skipped for a non-finite gradient (teacher first)
    last_skipped: jax.Array  # int32 [1 + students]: the step of the latest one (-1: none)


def forward(graph, params, batch: Batch, sharding: ShardingContext | None = None, *,
            fused_head: bool = False) -> ModelOutput:
    """The model's forward, traced under its sharding context (activation hints, expert parallelism).
    With `fused_head`, its `logits` is a `losses.Head` (the losses form the logits chunk by chunk)."""
    with use_sharding(sharding):
        model = nnx.merge(graph, params)
        return model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                     images=batch.get("images"),  # an image-and-text batch (data.source=digits)
                     fused_head=fused_head)
