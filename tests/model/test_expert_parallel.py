"""Expert parallelism on 8 simulated CPU devices: the exchange equals the dense dispatch on one
device (output and gradients), the MoE layer under a sharding context equals the layer without
one, capacity drops exactly the assignments past a shard's slots, and the compiled program moves
tokens (all-to-all) without ever gathering the experts' weights over the expert axis.

The device count is fixed when jax starts, so every check runs in ONE subprocess (this file run
as a script, with XLA_FLAGS set); the tests read its JSON report.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from distill.model import ModelConfig
from distill.model.expert_parallel import dispatch_expert_parallel
from distill.model.dispatch import ExpertWeights, Routing, dispatch_dense, route
from distill.model.moe import MoE
from distill.model.sharding import AXES, DEFAULT_RULES, ShardingContext, use_sharding

TOL = 1e-5
MESHES = {"expert8": (1, 1, 1, 8), "data2-fsdp2-expert2": (2, 2, 1, 2), "data2-tensor2-expert2": (2, 1, 2, 2)}
N, D, F, E = 64, 16, 32, 8
# (mesh, k, scale_input, inner dispatch): every mesh x k x scale with the CPU default (sorted),
# plus the dense and ragged inner dispatches once each.
DISPATCH_CASES = [(m, k, s, "sorted") for m in MESHES for k in (1, 2) for s in (True, False)] + [
    ("data2-fsdp2-expert2", 2, False, "ragged"), ("data2-tensor2-expert2", 1, True, "dense")]
MOE_MESH = (1, 2, 2, 2)  # fsdp, tensor and expert at once


def _case_id(case) -> str:
    mesh, k, scale, inner = case
    return f"{mesh}-k{k}-{'scale_input' if scale else 'scale_output'}-{inner}"


# --------------------------------------------------------------------------- the subprocess


def _rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def _context(shape) -> ShardingContext:
    return ShardingContext(Mesh(np.array(jax.devices()).reshape(shape), AXES), DEFAULT_RULES)


def _placed(ctx, x, scores, w: ExpertWeights):
    put = lambda a, *axes: jax.device_put(a, ctx.sharding(*axes))  # noqa: E731
    return (put(x, "batch", None), put(scores, "batch", None),
            ExpertWeights(put(w.gate, "experts", "embed", "mlp"), put(w.up, "experts", "embed", "mlp"),
                          put(w.down, "experts", "mlp", "embed")))  # fmt: skip


def _collectives(hlo: str) -> dict:
    """Per collective kind, the result shapes of its instructions in an HLO module's text."""
    found: dict[str, list[str]] = {}
    for line in hlo.splitlines():
        op = re.search(r"\s(all-to-all|all-gather|reduce-scatter|all-reduce|collective-permute)(?:-start)?\(", line)
        if op and "=" in line:
            result = line.split("=", 1)[1].split(op.group(1))[0]
            found.setdefault(op.group(1), []).extend(re.findall(r"\w+\[[\d,]*\]", result))
    return found


def _dispatch_case(case, inputs, dense_cache: dict) -> tuple[dict, str]:
    """Relative errors of the output and gradients against `dispatch_dense`, and the compiled HLO."""
    x, logits, w, w_out = inputs
    mesh, k, scale_input, inner = case
    ctx = _context(MESHES[mesh])
    routing = route(logits, k, "llama4" if scale_input else "softmax", True)
    cfg = ModelConfig(num_local_experts=E, num_experts_per_tok=k, dispatch=inner)

    def loss(x, scores, w, parallel):
        r = Routing(routing.logits, routing.experts, scores)
        out = dispatch_expert_parallel(x, r, w, scale_input, cfg, ctx)[0] if parallel else \
            dispatch_dense(x, r, w, scale_input)
        return jnp.sum(out * w_out), out

    def grad(parallel):
        return jax.value_and_grad(lambda *a: loss(*a, parallel), argnums=(0, 1, 2), has_aux=True)

    if (k, scale_input) not in dense_cache:
        dense_cache[k, scale_input] = jax.jit(grad(False))(x, routing.scores, w)
    args = _placed(ctx, x, routing.scores, w)
    compiled = jax.jit(grad(True)).lower(*args).compile()
    (_, out), grads = compiled(*args)
    (_, dense_out), dense_grads = dense_cache[k, scale_input]
    names = ("x", "scores", "gate", "up", "down")
    errors = {"out": _rel_err(out, dense_out)} | {
        n: _rel_err(g, dg) for n, g, dg in zip(names, jax.tree.leaves(grads), jax.tree.leaves(dense_grads))}
    return errors, compiled.as_text()


def _check_dispatch(inputs) -> tuple[dict, dict]:
    dense_cache, errors, hlo = {}, {}, {}
    for case in DISPATCH_CASES:
        errors[_case_id(case)], text = _dispatch_case(case, inputs, dense_cache)
        hlo.setdefault(case[0], _collectives(text))
    return errors, hlo


def _parallel_forward(x, scores, w, *, routing, cfg, ctx):
    return dispatch_expert_parallel(x, Routing(routing.logits, routing.experts, scores), w, True, cfg, ctx)


def _check_capacity(inputs) -> dict:
    """Capacity exchange on data2-fsdp2-expert2 (8 token shards of 8 tokens, 2 expert shards),
    top-2, llama4 scores: dropped fraction and output against a numpy model of the drops."""
    x, logits, w, _ = inputs
    ctx, k = _context(MESHES["data2-fsdp2-expert2"]), 2
    routing = route(logits, k, "llama4", True)
    t, ep = N // 8, 2
    report = {}
    for factor in (0.5, 2.0):
        cfg = ModelConfig(num_local_experts=E, num_experts_per_tok=k, dispatch="capacity", capacity_factor=factor)
        run = jax.jit(partial(_parallel_forward, routing=routing, cfg=cfg, ctx=ctx))
        out, dropped = run(*_placed(ctx, x, routing.scores, w))
        # Each token shard fills C slots per expert shard, choice 0 of every token first.
        cap = math.ceil(factor * t * k / ep)
        experts = np.asarray(routing.experts)
        kept = np.zeros((N, k), bool)
        for first in range(0, N, t):
            used = np.zeros(ep, int)
            for j in range(k):
                for i in range(first, first + t):
                    dest = experts[i, j] // (E // ep)
                    kept[i, j], used[dest] = used[dest] < cap, used[dest] + 1
        # A dropped assignment contributes 0: dense with its score zeroed (llama4 scales the input).
        expected = dispatch_dense(x, Routing(routing.logits, routing.experts, routing.scores * kept), w, True)
        dense = dispatch_dense(x, routing, w, True)
        report[str(factor)] = {"dropped": float(dropped), "expected_dropped": float(1 - kept.mean()),
                               "err": _rel_err(out, expected), "dense_err": _rel_err(out, dense)}
    return report


def _check_moe_layer() -> dict:
    """The MoE layer (top-2 llama4, sorted) under a context on fsdp2-tensor2-expert2 vs no context."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=32, intermediate_size_mlp=48,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                      num_experts_per_tok=2, initializer_range=0.1)  # fmt: skip
    graphdef, params = nnx.split(MoE(cfg, nnx.Rngs(params=0)), nnx.Param)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 16, 32)), jnp.float32)
    w_out = jnp.asarray(np.random.default_rng(6).normal(size=(2, 16, 32)), jnp.float32)

    def run(ctx):
        def loss(p):
            with use_sharding(ctx):
                out, stats = nnx.merge(graphdef, p)(x)
            return jnp.sum(out * w_out), (out, stats)
        (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return out, stats, nnx.to_pure_dict(grads)

    out, stats, grads = run(_context(MOE_MESH))
    ref_out, ref_stats, ref_grads = run(None)
    flat, ref_flat = (dict(jax.tree_util.tree_leaves_with_path(g)) for g in (grads, ref_grads))
    return {"out": _rel_err(out, ref_out),
            "grads": {jax.tree_util.keystr(p): _rel_err(flat[p], g) for p, g in ref_flat.items()},
            "same_stats": bool(np.array_equal(stats.expert_counts, ref_stats.expert_counts)
                               and np.array_equal(stats.expert_indices, ref_stats.expert_indices)),
            "dropped": float(stats.dropped_fraction)}  # fmt: skip


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    inputs = (jnp.asarray(rng.normal(size=(N, D)), jnp.float32), jnp.asarray(rng.normal(size=(N, E)), jnp.float32),
              ExpertWeights(*(jnp.asarray(0.3 * rng.normal(size=s), jnp.float32)
                              for s in ((E, D, F), (E, D, F), (E, F, D)))),
              jnp.asarray(rng.normal(size=(N, D)), jnp.float32))  # fmt: skip
    report, start = {}, time.perf_counter()
    report["dispatch"], report["hlo"] = _check_dispatch(inputs)
    report["capacity"] = _check_capacity(inputs)
    report["moe"] = _check_moe_layer()
    report["seconds"] = time.perf_counter() - start
    print("REPORT " + json.dumps(report))


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, __file__], check=False, env=env, capture_output=True, text=True,
                            timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(lines[-1].removeprefix("REPORT "))


@pytest.mark.parametrize("case", DISPATCH_CASES, ids=_case_id)
def test_expert_parallel_equals_dense_values_and_grads(report, case):
    errors = report["dispatch"][_case_id(case)]
    assert set(errors) == {"out", "x", "scores", "gate", "up", "down"}
    assert max(errors.values()) <= TOL, errors


def test_moe_layer_under_context_equals_unsharded(report):
    moe = report["moe"]
    assert moe["same_stats"] and moe["dropped"] == 0.0
    assert moe["out"] <= TOL, moe
    assert moe["grads"] and max(moe["grads"].values()) <= TOL, moe["grads"]


def test_capacity_drops_past_the_slots_of_each_expert_shard(report):
    small, large = report["capacity"]["0.5"], report["capacity"]["2.0"]
    assert 0 < small["dropped"] == pytest.approx(small["expected_dropped"]), small
    assert small["err"] <= TOL and small["dense_err"] > 1e-2, small
    assert large["dropped"] == 0.0 and large["dense_err"] <= TOL, large  # C = T * k: nothing can drop


@pytest.mark.parametrize("mesh", MESHES)
def test_compiled_program_moves_tokens_not_expert_weights(report, mesh):
    _, fsdp, tensor, expert = MESHES[mesh]
    hlo = report["hlo"][mesh]
    assert hlo.get("all-to-all"), hlo
    # Weights are gathered over fsdp only: [E / expert, d, f / tensor] (gate, up), [E / expert, f / tensor, d].
    local = {f"f32[{E // expert},{D},{F // tensor}]", f"f32[{E // expert},{F // tensor},{D}]"}
    gathered = set(hlo.get("all-gather", []))
    assert gathered == (local if fsdp > 1 else set()), gathered
    assert not any(re.fullmatch(rf"\w+\[{E},\d+,\d+\]", s) for shapes in hlo.values() for s in shapes), hlo


if __name__ == "__main__":
    main()
