"""The LM head as a loss input: final hidden states and the head weight, whose logits the chunked
losses form a chunk of tokens at a time (the fused LM head + loss), so that no [tokens, vocab]
logits exist in the forward or the backward pass."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass, data_fields=["hidden", "weight"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Head:
    """Logits `hidden @ weight` that are never formed whole.

    Every loss that takes logits `[..., V]` (student or teacher) also takes a `Head`: it computes
    the logits of each chunk of tokens inside its chunk loop, and its gradient (for a student, or a
    co-trained teacher's own CE) recomputes them chunk by chunk and flows into both `hidden` and
    `weight`. The logits are `jnp.dot(hidden, weight, preferred_element_type=float32)`, as the
    model computes them.

    Attributes:
      hidden: `[..., D]`, the final hidden states (after the final norm), in the compute dtype.
      weight: `[D, V]`, the head (the transposed embedding for tied embeddings), in the compute
        dtype. V may include padding columns; the losses' `vocab_size=` ignores them as usual.
    """

    hidden: jax.Array
    weight: jax.Array

    def __post_init__(self):
        hidden_dim = getattr(self.hidden, "shape", None)
        weight_dim = getattr(self.weight, "shape", None)
        if hidden_dim is not None and weight_dim is not None and (len(weight_dim) != 2 or hidden_dim[-1] != weight_dim[0]):
            raise ValueError(f"Head: hidden {hidden_dim} and weight {weight_dim} must be [..., D] and [D, V]")

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the logits it stands for, `[..., V]`."""
        return tuple(self.hidden.shape[:-1]) + (self.weight.shape[-1],)

    def __getitem__(self, index) -> Head:
        """The head of a selection of tokens (indexes the leading axes of `hidden` only)."""
        return Head(self.hidden[index], self.weight)

    def logits(self) -> jax.Array:
        """The float32 logits `[..., V]` (of a chunk: this is what the chunk loops call)."""
        return jnp.dot(self.hidden, self.weight, preferred_element_type=jnp.float32)


def is_head(x) -> bool:
    return isinstance(x, Head)


def materialize(tree):
    """`tree` with every `Head` replaced by its logits."""
    return jax.tree.map(lambda x: x.logits() if is_head(x) else x, tree, is_leaf=is_head)
