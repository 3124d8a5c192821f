"""MoE auxiliary losses from the router statistics the model returns, and router distillation.

Router statistics per MoE layer: `router_logits` float32 `[..., tokens, E]` (raw logits),
`expert_indices` int32 `[..., tokens, k]` (the chosen experts), a token mask `[..., tokens]`.
Llama 4 scores the chosen experts with a sigmoid of their logits, but the balance, z-loss and
distillation terms below use the softmax distribution over all experts, as transformers'
`load_balancing_loss_func` does for every MoE model including Llama 4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from losses._common import clamp_nonnegative, kl_rows, hyperparameter, token_mask


def _token_weights(shape: tuple[int, ...], mask: jax.Array | None) -> jax.Array:
    return token_mask(shape, mask).astype(jnp.float32)


def load_balancing_loss(router_logits: jax.Array, expert_indices: jax.Array, *, num_experts: int,
                        mask: jax.Array | None = None) -> jax.Array:
    """Switch-Transformer load-balancing loss, E * sum_e f_e * P_e, per leading batch.

    f_e is the fraction of routed (token, slot) assignments that went to expert e and P_e the mean
    softmax router probability of e, both over unmasked tokens. Perfect balance gives 1, all
    tokens on one expert gives E. transformers' `load_balancing_loss_func` normalises f per slot,
    so its value is k times this one (k = experts per token).

    Args:
      router_logits: float `[..., tokens, E]`.
      expert_indices: int `[..., tokens, k]`, the chosen experts.
      num_experts: E.
      mask: bool `[..., tokens]`, False for padding; None keeps all tokens.

    Returns:
      float32 `[...]` (a scalar for `[tokens, E]` inputs); 0 where no token is unmasked.

    References:
      Fedus et al., Switch Transformers, JMLR 2022, eq. 4. https://arxiv.org/abs/2101.03961
    """
    if router_logits.shape[-1] != num_experts:
        raise ValueError(f"router_logits last axis {router_logits.shape[-1]} != num_experts {num_experts}")
    if expert_indices.shape[:-1] != router_logits.shape[:-1]:
        raise ValueError(f"expert_indices {expert_indices.shape} and router_logits {router_logits.shape} "
                         "must agree on every axis but the last")
    w = _token_weights(router_logits.shape[:-1], mask)
    n_tokens = jnp.sum(w, axis=-1)
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    prob_mean = jnp.sum(probs * w[..., None], axis=-2) / jnp.maximum(n_tokens, 1.0)[..., None]
    assigned = jax.nn.one_hot(expert_indices, num_experts, dtype=jnp.float32)  # [..., tokens, k, E]
    counts = jnp.sum(assigned * w[..., None, None], axis=(-3, -2))
    fraction = counts / jnp.maximum(n_tokens * expert_indices.shape[-1], 1.0)[..., None]
    loss = num_experts * jnp.sum(fraction * prob_mean, axis=-1)
    return jnp.where(n_tokens > 0, loss, 0.0)


def router_z_loss(router_logits: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Router z-loss per token: logsumexp(router_logits)^2 (reduce it with `token_mean`).

    Args:
      router_logits: float `[..., tokens, E]`.
      mask: bool `[..., tokens]`; None keeps all tokens.

    Returns:
      float32 `[..., tokens]`, 0 on masked tokens.

    References:
      Zoph et al., ST-MoE: Designing Stable and Transferable Sparse Expert Models, 2022, eq. 5.
      https://arxiv.org/abs/2202.08906
    """
    keep = token_mask(router_logits.shape[:-1], mask)
    logits = jnp.where(keep[..., None], router_logits.astype(jnp.float32), 0.0)
    return jnp.where(keep, jax.nn.logsumexp(logits, axis=-1) ** 2, 0.0)


def _expert_matrix(expert_map, teacher_experts: int, student_experts: int) -> np.ndarray:
    table = np.asarray(expert_map)
    if table.shape != (teacher_experts,) or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"expert_map: must be an int array of shape ({teacher_experts},) (one student "
                         f"expert per teacher expert), got shape {table.shape} dtype {table.dtype}")
    if table.min() < -1 or table.max() >= student_experts:
        raise ValueError(f"expert_map: values must be in [-1, {student_experts}), got [{table.min()}, {table.max()}]")
    kept = table >= 0
    if not kept.any():
        raise ValueError("expert_map: every teacher expert is dropped (-1); keep at least one")
    matrix = np.zeros((teacher_experts, student_experts), np.float32)
    matrix[np.nonzero(kept)[0], table[kept]] = 1.0
    return matrix


def router_distillation(student_router_logits: jax.Array, teacher_router_logits: jax.Array, *,
                        temperature: float = 1.0, mask: jax.Array | None = None,
                        expert_map=None) -> jax.Array:
    """Per-token router distillation: T^2 * KL(r_T || r_S) between the experts distributions.

    r = softmax(router_logits / T). When the expert counts match (and no map is given), expert e
    of the teacher is expert e of the student. Otherwise `expert_map[e]` names the student
    expert that teacher expert e became (a student initialised by merging or selecting teacher
    experts): the teacher's probabilities are summed into their student experts,
    r'_T(j) = sum_{e: map[e] = j} r_T(e); teacher experts mapped to -1 (dropped) lose their mass
    and r'_T is renormalised. No gradient flows into the teacher.

    Args:
      student_router_logits: float `[..., tokens, E_S]`.
      teacher_router_logits: float `[..., tokens, E_T]`.
      temperature: T > 0.
      mask: bool `[..., tokens]`; None keeps all tokens.
      expert_map: concrete int `[E_T]` with values in [-1, E_S); required when E_T != E_S.

    Returns:
      float32 `[..., tokens]`, 0 on masked tokens.

    References:
      Hinton et al., Distilling the Knowledge in a Neural Network, 2015 (KD with T^2).
      https://arxiv.org/abs/1503.02531
    """
    temperature = hyperparameter("temperature", temperature, low=0.0, open_low=True)
    n_student, n_teacher = student_router_logits.shape[-1], teacher_router_logits.shape[-1]
    if student_router_logits.shape[:-1] != teacher_router_logits.shape[:-1]:
        raise ValueError(f"student_router_logits {student_router_logits.shape} and teacher_router_logits "
                         f"{teacher_router_logits.shape} must agree on every axis but the last")
    if expert_map is None and n_student != n_teacher:
        raise ValueError(f"student has {n_student} experts and teacher {n_teacher}: pass expert_map "
                         f"(int [{n_teacher}], the student expert of each teacher expert, -1 to drop)")
    keep = token_mask(student_router_logits.shape[:-1], mask)
    s = jnp.where(keep[..., None], student_router_logits.astype(jnp.float32), 0.0) / temperature
    t = jnp.where(keep[..., None], jax.lax.stop_gradient(teacher_router_logits).astype(jnp.float32), 0.0)
    log_r_teacher = jax.nn.log_softmax(t / temperature, axis=-1)
    if expert_map is not None:
        merged = jnp.exp(log_r_teacher) @ _expert_matrix(expert_map, n_teacher, n_student)
        log_r_teacher = jnp.log(merged / jnp.sum(merged, axis=-1, keepdims=True))
    value = clamp_nonnegative(kl_rows(log_r_teacher, jax.nn.log_softmax(s, axis=-1)))
    return jnp.where(keep, temperature**2 * value, 0.0)
