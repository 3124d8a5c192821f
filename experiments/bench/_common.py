"""What the benchmarks in experiments/bench share: round-robin timing, Markdown tables, the
machine description, the command-line driver, and transformers' Llama 4 built from our config."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from distill.model import ModelConfig  # noqa: E402

TORCH_THREADS = min(2, len(os.sched_getaffinity(0)))  # as many as JAX gets: 2 here, 1 under `taskset -c N`


def random_tokens(batch: int, seq: int, vocab: int, seed: int) -> np.ndarray:
    """Random token ids `[batch, seq + 1]`: inputs are [:, :-1], targets [:, 1:]."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)


@dataclass
class Timing:
    name: str
    run: object  # () -> None, one synchronous step
    compile_s: float | None = None
    warmup_s: float = float("nan")
    times: list[float] = field(default_factory=list)
    repeats: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def min(self) -> float:
        return min(self.times) if self.times else float("nan")


def measure(timings: list[Timing], repeats: int, budget_s: float) -> list[Timing]:
    """Warm each step up once (excluded), then time them round-robin.

    A step whose warm-up says its repeats would exceed `budget_s` gets fewer repeats (at least one;
    the `repeats` columns say how many).
    """
    for t in timings:
        start = time.perf_counter()
        t.run()
        t.warmup_s = time.perf_counter() - start
        t.repeats = max(1, min(repeats, int(budget_s / max(t.warmup_s, 1e-9))))
    for i in range(max(t.repeats for t in timings)):
        for t in timings:
            if i < t.repeats:
                start = time.perf_counter()
                t.run()
                t.times.append(time.perf_counter() - start)
    return timings


def compile_timed(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def ms(seconds: float) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.0f}"


def params_m(cfg: ModelConfig) -> str:
    counts = cfg.param_counts()
    return f"{counts['total'] / 1e6:.2f}M / {counts['active'] / 1e6:.2f}M"


def describe(cfg: ModelConfig, batch: int, seq: int) -> str:
    moe = sum(cfg.layer_is_moe)
    return (f"d {cfg.hidden_size}, {cfg.num_hidden_layers} layers ({moe} MoE), {cfg.num_local_experts} experts "
            f"top-{cfg.num_experts_per_tok}, ff {cfg.intermediate_size}/{cfg.intermediate_size_mlp}, "
            f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, vocab {cfg.vocab_size}, "
            f"batch {batch} x seq {seq}")


def torch_llama4(cfg: ModelConfig):
    """transformers' `Llama4ForCausalLM` with `cfg`'s fields (layer plan included), in train mode,
    every weight matrix drawn from normal(0, initializer_range) like ours (sdpa attention)."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.Llama4TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        intermediate_size_mlp=cfg.intermediate_size_mlp, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, num_local_experts=cfg.num_local_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        moe_layers=[i for i, moe in enumerate(cfg.layer_is_moe) if moe],
        no_rope_layers=[int(r) for r in cfg.layer_uses_rope], attention_chunk_size=cfg.attention_chunk_size,
        use_qk_norm=cfg.use_qk_norm, attn_temperature_tuning=cfg.attn_temperature_tuning,
        floor_scale=cfg.floor_scale, attn_scale=cfg.attn_scale, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range, use_cache=False,
    )  # fmt: skip
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.Llama4ForCausalLM(hf_cfg).train()
    with torch.no_grad():  # the same weight scale as ours: normal(0, initializer_range), norms at 1
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, cfg.initializer_range)
    return model


def torch_model_step(name: str, cfg: ModelConfig, batch: int, seq: int) -> Timing:
    import torch

    model = torch_llama4(cfg)
    ids = torch.from_numpy(random_tokens(batch, seq, cfg.vocab_size, 1).astype(np.int64))
    tokens, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), targets.reshape(-1))
        loss.backward()

    return Timing(name, run)


def environment() -> dict:
    import flax
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return dict(cpu=cpu, cores=os.cpu_count(), memory_gib=round(mem_gib, 1), backend=jax.default_backend(),
                devices=[str(d) for d in jax.devices()], python=platform.python_version(), jax=jax.__version__,
                flax=flax.__version__, torch=torch.__version__, transformers=transformers.__version__,
                numpy=np.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))  # fmt: skip


def main(title: str, doc: str, sections: dict, make_plan, argv=None) -> None:
    """The driver every benchmark shares: parse --quick/--out/--sections, print a header naming the
    machine, run the sections (each `(plan, results) -> markdown`), write --out."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="under 2 minutes: fewer configs and repeats")
    parser.add_argument("--out", type=Path, help="also write the tables: .json for raw timings, else markdown")
    parser.add_argument("--sections", default=",".join(sections), help=f"comma-separated subset of {list(sections)}")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in sections]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(sections)}")

    plan = make_plan(args.quick)
    env = environment()
    start = time.perf_counter()
    header = (f"## {title} ({'quick' if args.quick else 'full'})\n\n"
              f"{env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB, JAX backend {env['backend']}; "
              f"python {env['python']}, jax {env['jax']}, flax {env['flax']}, torch {env['torch']}, "
              f"transformers {env['transformers']}, numpy {env['numpy']}; XLA_FLAGS={env['xla_flags']!r}. "
              f"Times in ms are medians of round-robin repeats after one excluded warm-up step. "
              f"Load average at start: {os.getloadavg()[0]:.1f}.")  # fmt: skip
    print(header, flush=True)
    results = dict(environment=env, quick=args.quick, plan={k: v for k, v in plan.items()})
    texts = [header]
    for name in chosen:
        load = os.getloadavg()[0]
        text = sections[name](plan, results) + f"\n\n(Load average when this table started: {load:.1f}.)"
        print("\n" + text, flush=True)
        texts.append(text)
    total = time.perf_counter() - start
    footer = f"Total benchmark time: {total:.0f} s; load average at the end: {os.getloadavg()[0]:.1f}."
    print("\n" + footer, flush=True)
    texts.append(footer)
    results["total_s"] = total
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".json":
            args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        else:
            args.out.write_text("\n\n".join(texts) + "\n")
