"""On-policy vs off-policy distillation judged where it matters: the student's own continuations.

    python experiments/results/onpolicy.py runs/onpolicy/seed-0 [runs/onpolicy/seed-1 ...]
        [--rows 64] [--prompt-tokens 64] [--new-tokens 64] [--temperatures 1.0 0]

For each finished run (experiments/onpolicy.yaml), validation rows that are one document over
their first prompt + new tokens are cut to a prompt; every student (and the teacher, as a
reference) continues them with the KV cache at each sampling temperature (0 = greedy), and the
run's teacher scores the continuations: bits per token of the written tokens under the teacher.
Lower means the teacher finds the student's own text more likely, the quantity on-policy
distillation trains. "data" is the teacher's bits per token on the real continuations.
Validation bits per byte on data come from each run's summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from seeds import mean_and_spread, save_figure

import losses
from distill.data import build_data
from distill.model.generate import generate
from distill.runs import load_models


def prompts_of(cfg, rows: int, length: int) -> np.ndarray:
    """`rows` validation windows of `length` tokens that lie inside one document."""
    data = build_data(cfg.data, seed=cfg.train.seed)
    kept = []
    for batch in data.validation_batches():
        whole = np.all(batch["mask"][:, :length - 1] > 0, axis=1)
        kept.extend(np.asarray(batch["tokens"])[whole, :length])
        if len(kept) >= rows:
            return np.stack(kept[:rows])
    raise SystemExit(f"only {len(kept)} validation rows are one document over {length} tokens; lower --rows")


def teacher_bits(teacher, tokens: jax.Array, prompt: int) -> jax.Array:
    """The teacher's mean bits per token over `tokens[:, prompt:]`, each given what precedes it."""
    logits = teacher(tokens[:, :-1]).logits[:, prompt - 1:]
    return jnp.mean(losses.cross_entropy(logits, tokens[:, prompt:])) / math.log(2)


def judge_run(run_dir: Path, rows: int, prompt: int, new: int, temperatures: list[float]) -> dict:
    cfg, step, teacher, students = load_models(run_dir)
    windows = jnp.asarray(prompts_of(cfg, rows, prompt + new))
    scorer = jax.jit(lambda t: teacher_bits(teacher, t, prompt))
    score = lambda t: float(scorer(t))  # noqa: E731
    result = {"step": step, "data": score(windows), "bpb": json.loads((run_dir / "summary.json").read_text())["bpb"]}
    for name, model in {"teacher": teacher, **students}.items():
        for temperature in temperatures:
            write = jax.jit(lambda p, k, m=model, t=temperature: generate(m, p, prompt + new, k, temperature=t))
            written = write(windows[:, :prompt], jax.random.key(cfg.train.seed))
            result[f"{name}@T{temperature:g}"] = score(written)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.0])
    parser.add_argument("--plot", type=Path, help="a PNG: each model's validation bpb and teacher bits per "
                        "written token, mean +- std over the runs")
    args = parser.parse_args()
    for run_dir in args.runs:
        if not (run_dir / "summary.json").is_file():
            print(f"{run_dir}: no summary.json; finish the run first (distill run experiments/onpolicy.yaml)",
                  file=sys.stderr)
            return 2
    results = []
    for run_dir in args.runs:
        results.append(judge_run(run_dir, args.rows, args.prompt_tokens, args.new_tokens, args.temperatures))
        print(f"{run_dir} (step {results[-1]['step']}): {json.dumps(results[-1])}", flush=True)
    models = list(results[0]["bpb"])
    print(f"\nTeacher bits/token of {args.new_tokens} written tokens after {args.prompt_tokens}-token prompts "
          f"({args.rows} validation rows, mean +- std over {len(results)} run(s)); data: "
          f"{_cell([r['data'] for r in results])}")
    header = ["model", "val bpb"] + [f"written T={t:g}" for t in args.temperatures]
    print(" | ".join(f"{h:>16}" for h in header))
    for name in models:
        cells = [_cell([r["bpb"][name] for r in results])]
        cells += [_cell([r[f"{name}@T{t:g}"] for r in results]) for t in args.temperatures]
        print(" | ".join(f"{c:>16}" for c in [name, *cells]))
    if args.plot:
        print(f"wrote {plot(results, models, args.temperatures, args.plot)}")
    return 0


def plot(results: list[dict], models: list[str], temperatures: list[float], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("validation bits per byte (data)", lambda r, m: r["bpb"][m])] + [
        (f"teacher bits per written token, T = {t:g}", lambda r, m, t=t: r[f"{m}@T{t:g}"]) for t in temperatures]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6))
    for ax, (title, value) in zip(axes, panels):
        stats = [mean_and_spread([value(r, m) for r in results]) for m in models]
        ax.bar(models, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color="tab:blue")
        ax.set_ylim(min(m for m, _ in stats) * 0.9, max(m + s for m, s in stats) * 1.03)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    fig.suptitle(f"on-policy vs off-policy distillation ({len(results)} run(s))", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def _cell(values: list[float]) -> str:
    mean, spread = mean_and_spread(values)
    return f"{mean:.3f} +- {spread:.3f}" if len(values) > 1 else f"{mean:.3f}"


if __name__ == "__main__":
    sys.exit(main())
