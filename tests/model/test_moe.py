"""Mixture of experts: every dispatch equals the dense reference (values and gradients), the
tiled expert kernel and the capacity drops equal numpy float64, gradients reach exactly the experts
that received tokens, and the MoE layer equals an independent float64 Llama4TextMoe."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill.model import build_model
from distill.model.dispatch import ExpertWeights, tiled_expert_ffn
from distill.model.moe import MoE

TOL = 1e-5  # float32 paths against each other: max abs error relative to the largest value


def _moe_layer(cfg, seed=0):
    return MoE(cfg, nnx.Rngs(params=seed))


def _inputs(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# --------------------------------------------------------------------------- dispatch == dense

ROUTINGS = [("llama4", 1), ("llama4", 2), ("softmax", 1), ("softmax", 2)]
# 32 tokens x k over 4 experts: 8-16 rows per expert on average, so tiles of 3 and 8 split an
# expert's rows across several tiles; 128 exceeds every expert's rows; None is the default tile.
# The full router x k x dispatch matrix runs with `-m slow`; the default run keeps a cover of it.
FAST_DISPATCH_CASES = [
    ("llama4", 2, "sorted", 8),
    ("llama4", 2, "ragged", None),
    ("llama4", 2, "capacity", None),
    ("llama4", 1, "sorted", 3),
    ("softmax", 2, "sorted", 8),
    ("softmax", 1, "sorted", 128),
]
DISPATCH_CASES = [
    pytest.param(r, k, d, t, id=f"{r}-k{k}-{d}-{t}",
                 marks=() if (r, k, d, t) in FAST_DISPATCH_CASES else pytest.mark.slow)
    for r, k in ROUTINGS
    for d, t in (("sorted", 3), ("sorted", 8), ("sorted", 128), ("sorted", None), ("ragged", None), ("capacity", None))
]  # fmt: skip


@pytest.fixture(scope="module")
def dense_runs():
    """Dense-dispatch runs (parameters, value_and_grads result), shared by the cases of a test."""
    return {}


def _dense_run(helpers, dense_runs, key, build, cfg, loss_fn, *args):
    """(parameters, value_and_grads result) of `build(cfg)` with dense dispatch, cached under `key`."""
    if key not in dense_runs:
        dense = build(cfg.replace(dispatch="dense"))
        dense_runs[key] = helpers.pure(dense), helpers.value_and_grads(dense, loss_fn, *args)
    return dense_runs[key]


def _against_dense(helpers, dense_runs, key, build, cfg, loss_fn, *args):
    """value_and_grads of `build(cfg)` and of its dense twin, both with the dense twin's parameters."""
    values, dense_result = _dense_run(helpers, dense_runs, key, build, cfg, loss_fn, *args)
    module = build(cfg)
    helpers.load(module, values)
    return helpers.value_and_grads(module, loss_fn, *args), dense_result


@pytest.mark.parametrize("router, k, dispatch, tile", DISPATCH_CASES)
def test_moe_dispatch_equals_dense_values_and_grads(tiny, helpers, dense_runs, router, k, dispatch, tile):
    # Renormalised softmax top-1 weights are constant 1 (no router gradient): renormalise only k > 1.
    # Capacity factor E: an expert has a slot for every token, nothing drops.
    cfg = tiny(router=router, num_experts_per_tok=k, router_renormalize=k > 1, capacity_factor=4.0,
               dispatch=dispatch, dispatch_tile=tile)  # fmt: skip
    x, w_out = _inputs((2, 16, cfg.hidden_size), 1), _inputs((2, 16, cfg.hidden_size), 2)
    (_, (out, stats), grads), (_, (dense_out, dense_stats), dense_grads) = _against_dense(
        helpers, dense_runs, (router, k), _moe_layer, cfg, lambda o: jnp.sum(o[0] * w_out), x)

    assert float(stats.dropped_fraction) == 0.0
    np.testing.assert_array_equal(stats.expert_indices, dense_stats.expert_indices)
    np.testing.assert_array_equal(stats.expert_counts, dense_stats.expert_counts)
    assert int(jnp.sum(stats.expert_counts)) == 32 * k
    helpers.assert_close(out, dense_out, TOL, "moe output")
    assert set(grads) == {"router", "gate", "up", "down", "shared_expert"}
    helpers.assert_trees_close(grads, dense_grads, TOL)
    assert np.abs(grads["router"]).max() > 0


@pytest.mark.parametrize("tile", [8, 32])
def test_moe_bfloat16_sorted_grads_close_to_float32_dense(tiny, helpers, dense_runs, tile):
    """bf16 compute, float32 params: the sorted dispatch's output and gradients stay within 3e-2 (of
    the largest value) of the float32 dense reference; bf16 dense itself is ~1e-2 away."""
    cfg = tiny(capacity_factor=4.0)  # llama4, top-2: the ("llama4", 2) dense run of the test above
    x, w_out = _inputs((2, 16, cfg.hidden_size), 1), _inputs((2, 16, cfg.hidden_size), 2)
    loss_fn = lambda o: jnp.sum(o[0] * w_out)  # noqa: E731
    values, dense = _dense_run(helpers, dense_runs, ("llama4", 2), _moe_layer, cfg, loss_fn, x)
    _, (dense_out, _), dense_grads = dense
    layer = _moe_layer(cfg.replace(dtype="bfloat16", dispatch="sorted", dispatch_tile=tile))
    helpers.load(layer, values)
    _, (out, _), grads = helpers.value_and_grads(layer, loss_fn, x)
    assert out.dtype == jnp.bfloat16
    helpers.assert_close(out, dense_out, 3e-2, "bf16 output")
    helpers.assert_trees_close(grads, dense_grads, 3e-2)


MODEL_DISPATCHES = [
    pytest.param("sorted", 8, id="sorted-8"),
    pytest.param("sorted", None, id="sorted-None", marks=pytest.mark.slow),
    pytest.param("ragged", None, id="ragged"),
    pytest.param("capacity", None, id="capacity"),
]


@pytest.mark.parametrize("dispatch, tile", MODEL_DISPATCHES)
def test_model_dispatch_equals_dense_logits_and_grads(tiny, helpers, dense_runs, dispatch, tile):
    """A one-layer MoE model on 64 tokens (top-2, tile 8 < rows per expert): logits and every
    parameter's gradient equal the dense dispatch's."""
    cfg = tiny(num_hidden_layers=1, capacity_factor=4.0, dispatch=dispatch, dispatch_tile=tile)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 32)))
    w_out = _inputs((2, 32, cfg.vocab_size), 4)
    (_, out, grads), (_, dense_out, dense_grads) = _against_dense(
        helpers, dense_runs, "model", build_model, cfg, lambda o: jnp.sum(o.logits * w_out), tokens)
    np.testing.assert_array_equal(out.expert_indices, dense_out.expert_indices)
    np.testing.assert_array_equal(out.dropped_fraction, np.zeros(1))
    helpers.assert_close(out.logits, dense_out.logits, TOL, "logits")
    helpers.assert_trees_close(grads, dense_grads, TOL)


# --------------------------------------------------------------------------- tiled kernel


def _tiled_reference(rows, experts, w):
    out = np.zeros_like(rows)
    for i, e in enumerate(experts):
        g = rows[i] @ w["gate"][e]
        out[i] = (g / (1 + np.exp(-g)) * (rows[i] @ w["up"][e])) @ w["down"][e]
    return out


COUNTS = {
    "skewed": [0, 3, 40, 0, 7, 0],  # first and last expert empty, one expert holds most rows
    "all_first": [50, 0, 0, 0, 0, 0],
    "all_last": [0, 0, 0, 0, 0, 9],
    "one_row_each": [1, 1, 1, 1, 1, 1],
}


TILED_CASES = [("skewed", 1), ("skewed", 3), ("skewed", 8), ("skewed", 16), ("skewed", 64), ("all_first", 8),
               ("all_first", 32), ("all_last", 3), ("one_row_each", 4)]  # fmt: skip


@pytest.mark.parametrize("counts, tile", TILED_CASES, ids=[f"{c}-tile{t}" for c, t in TILED_CASES])
def test_tiled_expert_ffn_matches_numpy_row_loop(counts, tile):
    counts = COUNTS[counts]
    e, d, f = len(counts), 8, 12
    rng = np.random.default_rng(5)
    experts = np.repeat(np.arange(e), counts)
    rows = rng.normal(size=(len(experts), d))
    w = {name: rng.normal(scale=0.5, size=shape) for name, shape in
         (("gate", (e, d, f)), ("up", (e, d, f)), ("down", (e, f, d)))}  # fmt: skip
    weights = ExpertWeights(**{k: jnp.asarray(v, jnp.float32) for k, v in w.items()})
    got = tiled_expert_ffn(jnp.asarray(rows, jnp.float32), jnp.asarray(experts, jnp.int32), weights, e, tile)
    want = _tiled_reference(rows, experts, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# --------------------------------------------------------------------------- capacity drops


@pytest.mark.parametrize("router, k", [("llama4", 1), ("llama4", 2), ("softmax", 2)])
def test_capacity_drops_match_numpy(tiny, helpers, ref, router, k):
    cfg = tiny(router=router, num_experts_per_tok=k, dispatch="capacity", capacity_factor=0.75)
    layer = _moe_layer(cfg)
    x = _inputs((2, 16, cfg.hidden_size), 6)
    n = 32
    capacity = int(np.ceil(0.75 * n * k / cfg.num_local_experts))
    out, stats = layer(x)
    p = helpers.pure(layer)
    want, experts, kept = ref.moe(np.asarray(x, np.float64).reshape(n, -1), p, cfg, capacity=capacity)
    np.testing.assert_array_equal(stats.expert_indices, experts)
    assert float(stats.dropped_fraction) > 0
    np.testing.assert_allclose(float(stats.dropped_fraction), 1 - kept.mean(), rtol=1e-6)
    np.testing.assert_array_equal(stats.expert_counts, np.bincount(experts.reshape(-1), minlength=4))
    helpers.assert_close(out.reshape(n, -1), want, TOL, "capacity output")
    # The reference without drops differs: the drops are really tested.
    assert np.abs(ref.moe(np.asarray(x, np.float64).reshape(n, -1), p, cfg)[0] - want).max() > 1e-3


def test_capacity_slot_order_is_choice_major(tiny, helpers, ref):
    """Choice-0 assignments of all tokens take slots before any choice-1 assignment."""
    cfg = tiny(num_experts_per_tok=2, dispatch="capacity", capacity_factor=0.75)
    layer = _moe_layer(cfg)
    x = np.asarray(_inputs((1, 32, cfg.hidden_size), 7), np.float64).reshape(32, -1)
    p = helpers.pure(layer)
    capacity = int(np.ceil(0.75 * 32 * 2 / 4))
    _, experts, kept = ref.moe(x, p, cfg, capacity=capacity)
    # Token-major order (token 0 choice 0, token 0 choice 1, token 1 choice 0, ...) keeps other ones.
    used, token_major = np.zeros(4, int), np.zeros_like(kept)
    for t in range(32):
        for j in range(2):
            token_major[t, j] = used[experts[t, j]] < capacity
            used[experts[t, j]] += 1
    assert (token_major != kept).any(), "pick inputs where the two orders differ"
    out, _ = layer(jnp.asarray(x, jnp.float32)[None])
    helpers.assert_close(out[0], ref.moe(x, p, cfg, capacity=capacity)[0], TOL, "capacity output")


def test_model_reports_dropped_fraction(tiny, helpers):
    cfg = tiny(no_rope_layer_interval=2, dispatch="capacity", capacity_factor=0.5)
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 16)))
    out = helpers.forward(build_model(cfg), tokens)
    assert out.dropped_fraction.shape == (2,)
    assert np.all(np.asarray(out.dropped_fraction) >= 0.5 - 1e-6)  # half the slots of the assignments
    out = helpers.forward(build_model(cfg.replace(dispatch="sorted")), tokens)
    np.testing.assert_array_equal(out.dropped_fraction, np.zeros(2))


# --------------------------------------------------------------------------- gradient reach


FAST_REACH = [("llama4", "sorted"), ("llama4", "capacity"), ("softmax", "ragged"), ("softmax", "dense")]
REACH_CASES = [
    pytest.param(r, d, t, id=f"{r}-{d}-{t}", marks=() if (r, d) in FAST_REACH else pytest.mark.slow)
    for r in ("llama4", "softmax")
    for d, t in (("dense", None), ("sorted", 2), ("ragged", None), ("capacity", None))
]


@pytest.mark.parametrize("router, dispatch, tile", REACH_CASES)
def test_grads_reach_exactly_the_used_experts(tiny, helpers, router, dispatch, tile):
    """3 tokens x top-2 over 8 experts: at least 2 experts per layer get no tokens, and no gradient."""
    cfg = tiny(num_local_experts=8, num_experts_per_tok=2, router=router, no_rope_layer_interval=2,
               dispatch=dispatch, dispatch_tile=tile, capacity_factor=8.0)  # fmt: skip
    model = build_model(cfg)
    tokens = jnp.asarray([[5, 17, 42]])
    w_out = _inputs((1, 3, cfg.vocab_size), 9)
    _, out, grads = helpers.value_and_grads(model, lambda o: jnp.sum(o.logits * w_out), tokens)
    counts = np.asarray(out.expert_counts)
    assert counts.shape == (2, 8) and (counts.sum(-1) == 6).all()
    for layer in range(2):
        ff = helpers.layer(grads, cfg, layer)["feed_forward"]
        used = counts[layer] > 0
        assert (~used).sum() >= 2
        for name in ("gate", "up", "down"):
            per_expert = np.abs(ff[name]).reshape(8, -1).max(-1)
            np.testing.assert_array_equal(per_expert[~used], 0.0, err_msg=f"layer {layer} {name}: idle experts")
            assert (per_expert[used] > 0).all(), f"layer {layer} {name}: a used expert got no gradient"


@pytest.mark.parametrize("tile", [1, 4, 64])
def test_grads_skip_forced_empty_first_and_last_expert(tiny, helpers, tile):
    """Positive inputs and negative router columns: experts 0 and E-1 never win. Whatever the
    tiling does at the edges (padding or masked tiles), their gradients must be exactly zero."""
    cfg = tiny(num_experts_per_tok=1, dispatch="sorted", dispatch_tile=tile)
    layer = _moe_layer(cfg)
    p = helpers.pure(layer)
    router = np.abs(p["router"])
    router[:, 0] *= -1
    router[:, -1] *= -1
    helpers.load(layer, {**p, "router": router})
    x = jnp.abs(_inputs((1, 24, cfg.hidden_size), 10))
    _, (out, stats), grads = helpers.value_and_grads(layer, lambda o: jnp.sum(o[0] ** 2), x)
    counts = np.asarray(stats.expert_counts)
    assert counts[0] == 0 and counts[-1] == 0 and counts.sum() == 24
    for name in ("gate", "up", "down"):
        per_expert = np.abs(grads[name]).reshape(4, -1).max(-1)
        np.testing.assert_array_equal(per_expert[counts == 0], 0.0)
        assert (per_expert[counts > 0] > 0).all()


# --------------------------------------------------------------------------- numpy Llama4TextMoe


ROUTER_CASES = [
    ("llama4", 1, True, "dense"),
    ("llama4", 1, True, "sorted"),
    ("llama4", 2, True, "sorted"),
    ("llama4", 2, True, "ragged"),
    ("llama4", 2, True, "capacity"),
    ("softmax", 2, True, "sorted"),
    ("softmax", 2, False, "dense"),
]


@pytest.mark.parametrize("router, k, renormalize, dispatch", ROUTER_CASES,
                         ids=[f"{r}-k{k}-renorm{n}-{d}" for r, k, n, d in ROUTER_CASES])  # fmt: skip
def test_moe_matches_numpy_llama4_moe(tiny, helpers, ref, router, k, renormalize, dispatch):
    cfg = tiny(router=router, num_experts_per_tok=k, router_renormalize=renormalize, dispatch=dispatch,
               capacity_factor=4.0, initializer_range=0.3)  # fmt: skip
    layer = _moe_layer(cfg, seed=11)
    x = _inputs((2, 8, cfg.hidden_size), 12)
    out, stats = layer(x)
    p = helpers.pure(layer)
    x64 = np.asarray(x, np.float64).reshape(16, -1)
    want, experts, _ = ref.moe(x64, p, cfg)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(stats.expert_indices, experts)
    np.testing.assert_allclose(stats.router_logits, x64 @ p["router"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(stats.expert_counts, np.bincount(experts.reshape(-1), minlength=4))
    helpers.assert_close(out.reshape(16, -1), want, TOL, "moe output")
    # The reference tells input scaling (llama4) from output scaling (softmax / Mixtral) apart:
    # the same weights applied on the other side of the expert give a clearly different output.
    logits = x64 @ p["router"]
    shared = ref.swiglu(x64, *(p["shared_expert"][n] for n in ("gate", "up", "down")))
    weights = np.take_along_axis(logits if router == "llama4" else ref.softmax(logits), experts, axis=-1)
    if router == "llama4":
        weights = ref.sigmoid(weights)
    elif renormalize:
        weights = weights / weights.sum(-1, keepdims=True)
    other_side = shared.copy()
    for t in range(16):
        for e, s in zip(experts[t], weights[t]):
            w = (p["gate"][e], p["up"][e], p["down"][e])
            other_side[t] += s * ref.swiglu(x64[t], *w) if router == "llama4" else ref.swiglu(x64[t] * s, *w)
    assert np.abs(other_side - want).max() > 100 * TOL * np.abs(want).max()
