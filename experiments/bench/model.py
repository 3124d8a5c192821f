"""Model benchmark: training-step speed of the Llama-4-style MoE decoder on this machine.

    python experiments/bench/model.py            # full run (about 10 minutes on a 2-core CPU)
    python experiments/bench/model.py --quick    # under 2 minutes: fewer configs and repeats
    python experiments/bench/model.py --out docs/bench-model.md   # also write the tables (.md or .json)

Three tables (every time is the median of several timed repeats after an excluded warm-up; the
steps being compared run round-robin, side by side, so that load from other processes hits them
alike; ratios are the figures to trust on a noisy machine):

1. throughput: tokens/s of one training step, a jitted `value_and_grad` of the mean next-token
   cross entropy over the logits with respect to every parameter, at a small and a medium config;
   compile time is `jit(...).lower(...).compile()`.
2. MoE scaling: 8, 32 and 128 experts at EQUAL ACTIVE parameters (top-1, same expert width, same
   4096 tokens), for every dispatch (`sorted`, the CPU default; `ragged`; `dense` where it fits
   the time budget; `capacity`), as a whole-model step and as the MoE layer alone, with the ratio
   t(128)/t(8). An `ideal` row times the layer's expert FFN as one batched einsum over exactly
   N/E rows per expert (no router, no sort, no padding): a floor for any dispatch.
3. transformers: the same step in `transformers.Llama4ForCausalLM` (torch, eager mode with the
   `sdpa` attention, 2 threads), at the same config and weight scale (random init, std
   `initializer_range`), as the ratio ours/theirs.

Nothing is written unless `--out` is given.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository before this folder: losses.py here is not `losses`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _common import (  # noqa: E402
    TORCH_THREADS,
    Timing,
    compile_timed,
    describe,
    main,
    measure,
    ms,
    params_m,
    random_tokens,
    table,
    torch_model_step,
)
from flax import nnx  # noqa: E402

from distill.model import ModelConfig, build_model  # noqa: E402
from distill.model.dispatch import resolve_dispatch  # noqa: E402
from distill.model.moe import MoE  # noqa: E402

# --------------------------------------------------------------------------- configs

SMALL = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, intermediate_size_mlp=512,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8)
MEDIUM = ModelConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048,
                     num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, num_local_experts=16,
                     interleave_moe_layer_step=2)
# Scaling: d 256, expert width 512, top-1, two MoE layers; only num_local_experts changes.
SCALING = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=512, intermediate_size_mlp=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8)
SCALING_EXPERTS = (8, 32, 128)
# (config, batch, seq). Medium runs 2 x 512 tokens, not 8 x 512: one step takes about 25 s here
# at batch 8 (and twice that in transformers), too long for a 10-minute benchmark.
SHAPES = {"small": (SMALL, 8, 256), "medium": (MEDIUM, 2, 512), "scaling": (SCALING, 16, 256)}


# --------------------------------------------------------------------------- JAX steps


def _cross_entropy(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


_MODEL_STEPS: dict = {}


def jax_model_step(name: str, cfg: ModelConfig, batch: int, seq: int) -> Timing:
    """One training step of the whole model (compiled once per config and shape, then reused)."""
    key = (cfg, batch, seq)
    if key not in _MODEL_STEPS:
        _MODEL_STEPS[key] = _jax_model_step(name, cfg, batch, seq)
    cached = _MODEL_STEPS[key]
    return Timing(name, cached.run, cached.compile_s)


def _jax_model_step(name: str, cfg: ModelConfig, batch: int, seq: int) -> Timing:
    graphdef, params = nnx.split(build_model(cfg, seed=0))
    ids = random_tokens(batch, seq, cfg.vocab_size, 1)
    tokens, targets = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])

    def loss_fn(params, tokens, targets):
        return _cross_entropy(nnx.merge(graphdef, params)(tokens).logits, targets)

    compiled, compile_s = compile_timed(jax.value_and_grad(loss_fn), params, tokens, targets)
    return Timing(name, lambda: jax.block_until_ready(compiled(params, tokens, targets)), compile_s)


def jax_moe_step(name: str, cfg: ModelConfig, batch: int, seq: int) -> Timing:
    """The MoE layer alone: value_and_grad of mean(out**2) w.r.t. its parameters and its input."""
    graphdef, params = nnx.split(MoE(cfg, nnx.Rngs(params=0)))
    x = jax.random.normal(jax.random.key(1), (batch, seq, cfg.hidden_size), jnp.float32)

    def loss_fn(params, x):
        out, _ = nnx.merge(graphdef, params)(x)
        return jnp.mean(out.astype(jnp.float32) ** 2)

    compiled, compile_s = compile_timed(jax.value_and_grad(loss_fn, argnums=(0, 1)), params, x)
    return Timing(name, lambda: jax.block_until_ready(compiled(params, x)), compile_s)


def jax_ideal_step(name: str, cfg: ModelConfig, batch: int, seq: int) -> Timing:
    """Floor for any dispatch: the routed experts' SwiGLU as one batched einsum over exactly
    N / E rows per expert (no router, sort, gather, padding or shared expert)."""
    e, d, f = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    rows = batch * seq * cfg.num_experts_per_tok // e
    keys = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(keys[0], (e, rows, d), jnp.float32)
    w = tuple(cfg.initializer_range * jax.random.normal(k, s, jnp.float32)
              for k, s in zip(keys[1:], ((e, d, f), (e, d, f), (e, f, d))))  # fmt: skip

    def loss_fn(w, x):
        gate, up, down = w
        h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x, gate)) * jnp.einsum("ecd,edf->ecf", x, up)
        return jnp.mean(jnp.einsum("ecf,efd->ecd", h, down) ** 2)

    compiled, compile_s = compile_timed(jax.value_and_grad(loss_fn, argnums=(0, 1)), w, x)
    return Timing(name, lambda: jax.block_until_ready(compiled(w, x)), compile_s)


# --------------------------------------------------------------------------- sections


def section_throughput(plan, results):
    rows, raw = [], []
    for label in plan["throughput"]:
        cfg, batch, seq = SHAPES[label]
        t = measure([jax_model_step(label, cfg, batch, seq)], plan["repeats"], plan["budget_s"])[0]
        tokens = batch * seq
        rows.append([label, describe(cfg, batch, seq), params_m(cfg), f"{t.compile_s:.1f}", ms(t.warmup_s),
                     ms(t.median), f"{tokens / t.median:,.0f}", t.repeats])  # fmt: skip
        raw.append(dict(config=label, batch=batch, seq=seq, compile_s=t.compile_s, warmup_s=t.warmup_s,
                        times_s=t.times, tokens_per_s=tokens / t.median, params=cfg.param_counts()))  # fmt: skip
    headers = ["config", "shape", "params total / active", "compile s", "first step ms", "step ms (median)",
               "tokens/s", "repeats"]  # fmt: skip
    text = (f"### 1. Training step (forward + backward), dispatch `{resolve_dispatch('auto')}`\n\n"
            + table(headers, rows))  # fmt: skip
    results["throughput"] = raw
    return text


def section_scaling(plan, results):
    base, batch, seq = SHAPES["scaling"]
    experts = SCALING_EXPERTS
    default = resolve_dispatch("auto")
    builders = {"model": jax_model_step, "MoE layer": jax_moe_step}
    rows, raw = [], []
    for dispatch, level, runs in plan["scaling"]:
        builder = jax_ideal_step if dispatch == "ideal" else builders[level]
        run_dispatch = "sorted" if dispatch == "ideal" else dispatch
        timings = [builder(f"{dispatch}-{level}-{e}", base.replace(num_local_experts=e, dispatch=run_dispatch),
                           batch, seq) for e in runs]  # fmt: skip
        measure(timings, plan["repeats"], plan["budget_s"])
        by_e = dict(zip(runs, timings))
        cells = [ms(by_e[e].median) if e in by_e else "not run" for e in experts]
        lo, hi = experts[0], experts[-1]
        ratio = by_e[hi].median / by_e[lo].median if lo in by_e and hi in by_e else float("nan")
        compile_s = max(t.compile_s for t in timings)
        rows.append([dispatch + (" (default)" if dispatch == default else ""), level, *cells,
                     "-" if math.isnan(ratio) else f"{ratio:.2f}x", f"{compile_s:.1f}",
                     "/".join(str(t.repeats) for t in timings)])  # fmt: skip
        raw.append(dict(dispatch=dispatch, level=level, ratio=ratio,
                        runs={e: dict(times_s=t.times, warmup_s=t.warmup_s, compile_s=t.compile_s)
                              for e, t in by_e.items()}))  # fmt: skip
    headers = ["dispatch", "step", *[f"{e} experts ms" for e in experts], f"t({experts[-1]})/t({experts[0]})",
               "max compile s", "repeats"]  # fmt: skip
    counts = {e: base.replace(num_local_experts=e).param_counts() for e in experts}
    total = ", ".join(f"{e} experts {counts[e]['total'] / 1e6:.1f}M" for e in experts)
    verdicts = []
    for r in raw:
        if r["dispatch"] == default and not math.isnan(r["ratio"]):
            met = "met" if r["ratio"] <= 1.3 else "NOT met"
            verdicts.append(f"{r['level']} {r['ratio']:.2f}x ({met})")
    verdict = (f"\n\nTarget t({experts[-1]})/t({experts[0]}) <= 1.3 for the default dispatch: "
               + "; ".join(verdicts) + ".") if verdicts else ""  # fmt: skip
    text = (f"### 2. MoE scaling at equal active parameters (forward + backward)\n\n"
            f"{describe(base, batch, seq)}; only the expert count changes. Active parameters "
            f"{counts[experts[0]]['active'] / 1e6:.2f}M at every count; total: {total}. `model`: the whole "
            f"training step; `MoE layer`: one MoE layer (router, dispatch, shared expert), gradients w.r.t. its "
            f"parameters and its input; `ideal`: the routed experts' SwiGLU as one batched einsum over exactly "
            f"N/E rows per expert (no router, sort or padding), a floor for any dispatch. `not run`: left out "
            f"to keep the run short (cost grows with the expert count).\n\n"
            + table(headers, rows) + verdict)  # fmt: skip
    results["scaling"] = raw
    return text


def section_torch(plan, results):
    import torch

    torch.set_num_threads(TORCH_THREADS)
    rows, raw = [], []
    for label, experts in plan["torch"]:
        cfg, batch, seq = SHAPES[label]
        cfg = cfg.replace(num_local_experts=experts)
        ours, theirs = jax_model_step("ours", cfg, batch, seq), torch_model_step("transformers", cfg, batch, seq)
        measure([ours, theirs], plan["repeats"], plan["budget_s"])
        tokens = batch * seq
        ratio = ours.median / theirs.median
        rows.append([label, experts, describe(cfg, batch, seq), f"{ms(ours.median)} / {ms(ours.min)}",
                     f"{ms(theirs.median)} / {ms(theirs.min)}", f"{tokens / ours.median:,.0f}",
                     f"{tokens / theirs.median:,.0f}", f"{ratio:.2f}", f"{ours.min / theirs.min:.2f}",
                     f"{ours.repeats}/{theirs.repeats}"])  # fmt: skip
        raw.append(dict(config=label, experts=experts, ours_s=ours.times, theirs_s=theirs.times, ratio=ratio,
                        ratio_of_minima=ours.min / theirs.min))  # fmt: skip
    headers = ["config", "experts", "shape", "ours ms median / min", "transformers ms median / min",
               "ours tokens/s", "transformers tokens/s", "time ours/theirs (medians)", "(minima)", "repeats ours/theirs"]
    text = (f"### 3. Against transformers `Llama4ForCausalLM` (torch {torch.__version__}, {TORCH_THREADS} threads, "
            f"sdpa attention, eager), same config and weight scale\n\n" + table(headers, rows))
    results["torch"] = raw
    return text


# --------------------------------------------------------------------------- main


def make_plan(quick: bool) -> dict:
    e_all, e_ends = SCALING_EXPERTS, (SCALING_EXPERTS[0], SCALING_EXPERTS[-1])
    if quick:
        scaling = [("sorted", "model", e_ends), ("sorted", "MoE layer", e_ends), ("ragged", "MoE layer", e_all[:1]),
                   ("dense", "MoE layer", e_all[:1]), ("ideal", "MoE layer", e_ends)]  # fmt: skip
        return dict(repeats=3, budget_s=2.5, throughput=["small"], scaling=scaling, torch=[("small", 8)])
    scaling = [("sorted", "model", e_all), ("sorted", "MoE layer", e_all), ("ragged", "model", e_all[:1]),
               ("ragged", "MoE layer", e_all), ("dense", "model", e_all[:1]), ("dense", "MoE layer", e_all[:2]),
               ("capacity", "model", e_all), ("capacity", "MoE layer", e_all), ("ideal", "MoE layer", e_all)]
    return dict(repeats=5, budget_s=8.0, throughput=["small", "medium"], scaling=scaling,
                torch=[("small", 8), ("small", 16), ("small", 64), ("medium", 16)])


SECTIONS = {"throughput": section_throughput, "scaling": section_scaling, "torch": section_torch}


if __name__ == "__main__":
    main("Model benchmark", __doc__, SECTIONS, make_plan)
