"""docs/results.md, MetaP: does the best learning rate stay put as the student gets wider?

    python experiments/results/metap.py [--widths 1 2 4] [--base-width 64] [--lrs ...] [--steps 300]
        [--seq-len 128] [--batch-size 16] [--seeds 0] [--plot docs/figures/metap.png]

For each width multiplier m (hidden size base-width x m, heads and MLP widths scaled with it, the
cpu-student layer plan: 4 layers, 4 routed experts + a shared one) and each peak learning rate, a
student trains alone on the built-in corpus (cross-entropy, AdamW with warm-up and cosine decay,
the run's defaults) for `--steps` steps, twice: with the standard parametrisation (every weight
initialised with std 0.02, one learning rate) and with MetaP against the m = 1 model
(`optim.metap_base`, distill/metap.py). Prints the validation loss per (width, learning rate), mean
+- std over the seeds (the model's initialisation; the data order is one), the best learning rate
of the mean and of each seed; `--plot` draws both panels, mean +- std. The learning rate enters the
compiled step as an argument, so each (width, parametrisation) compiles once.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from seeds import mean_and_spread, save_figure

from distill.data import DataConfig, build_data
from distill.metap import scale_init, scale_learning_rates
from distill.model import build_model
from distill.optim import OptimConfig, make_optimizer
from student.presets import STUDENT_PRESETS


def widen(m: int, base_width: int):
    """The cpu-student layer plan at hidden size base_width * m (32 per attention head)."""
    width = base_width * m
    return dataclasses.replace(STUDENT_PRESETS["cpu-student"], hidden_size=width, intermediate_size=width,
                               intermediate_size_mlp=2 * width, num_attention_heads=width // 32,
                               num_key_value_heads=max(width // 64, 1))


def cross_entropy(graph, params, batch):
    logits = nnx.merge(graph, params)(batch["tokens"], positions=batch["positions"],
                                      segment_ids=batch["segment_ids"]).logits
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][..., None], -1)[..., 0]
    mask = batch["mask"]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def train(cfg, base, metap: bool, lrs: list[float], steps: int, seeds: list[int], data, validation
          ) -> list[list[float]]:
    """Validation loss after `steps`, per seed (the initialisation) and peak learning rate; one compile
    for all of them."""
    models = [build_model(cfg, seed=seed) for seed in seeds]
    if metap:
        for model in models:
            scale_init(model, base)
    graph = nnx.graphdef(models[0])
    # the peak is 1 inside the optimizer; the step multiplies the updates by the learning rate
    tx = make_optimizer(OptimConfig(learning_rate=1.0, warmup_steps=steps // 10), steps,
                        scale_learning_rates(cfg, base) if metap else None)

    @jax.jit
    def step(params, opt_state, batch, lr):
        loss, grads = jax.value_and_grad(cross_entropy, argnums=1)(graph, params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates)), opt_state, loss

    evaluate = jax.jit(lambda params, batch: cross_entropy(graph, params, batch))
    results = []
    for model in models:
        initial = nnx.state(model, nnx.Param)
        per_lr = []
        for lr in lrs:
            params, opt_state = initial, tx.init(initial)
            iterator = data.train_iterator()
            for _ in range(steps):
                params, opt_state, _ = step(params, opt_state, next(iterator), jnp.float32(lr))
            value = statistics.mean(float(evaluate(params, b)) for b in validation)
            per_lr.append(value if np.isfinite(value) else float("nan"))
        results.append(per_lr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--base-width", type=int, default=64, help="hidden size of the m = 1 model (a multiple of 32)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG")
    args = parser.parse_args()
    data = build_data(DataConfig(source="stdlib", seq_len=args.seq_len, batch_size=args.batch_size,
                                 max_bytes=8_000_000), seed=0)
    base = widen(1, args.base_width)
    validation = data.validation_batches(args.eval_batches)
    losses: dict[tuple[str, int], list[list[float]]] = {}  # (parametrisation, m) -> per seed, per learning rate
    for name, metap in (("standard", False), ("metap", True)):
        for m in args.widths:
            started = time.time()
            losses[name, m] = train(widen(m, args.base_width), base, metap, args.lrs, args.steps, args.seeds, data,
                                    validation)
            print(f"{name} width x{m} (hidden {args.base_width * m}): {time.time() - started:.0f} s", file=sys.stderr,
                  flush=True)
    best_lr = lambda values: args.lrs[int(np.nanargmin(values))]  # noqa: E731
    print(f"\nValidation loss (nats/byte) after {args.steps} steps, mean +- std of seeds {args.seeds}:\n")
    print("| parametrisation | width | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " | best lr of the mean |")
    print("|---|---|" + "---|" * (len(args.lrs) + 1))
    for (name, m), per_seed in losses.items():
        cells = [mean_and_spread(list(v)) for v in zip(*per_seed)]
        print(f"| {name} | x{m} | " + " | ".join(f"{mean:.4f} +- {spread:.4f}" for mean, spread in cells)
              + f" | {best_lr([mean for mean, _ in cells]):g} |")
    print("\nBest learning rate per seed:\n")
    print("| parametrisation | width | " + " | ".join(f"seed {seed}" for seed in args.seeds) + " |")
    print("|---|---|" + "---|" * len(args.seeds))
    for (name, m), per_seed in losses.items():
        print(f"| {name} | x{m} | " + " | ".join(f"{best_lr(values):g}" for values in per_seed) + " |")
    if args.plot:
        print(f"\nplot: {plot(args, losses)}")
    return 0


def plot(args, losses) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, name in zip(panels, ("standard", "metap")):
        for m in args.widths:
            means, spreads = zip(*(mean_and_spread(list(v)) for v in zip(*losses[name, m])))
            line = axis.errorbar(args.lrs, means, yerr=spreads, marker="o", capsize=3,
                                 label=f"hidden {args.base_width * m}").lines[0]
            best = int(np.nanargmin(means))
            axis.plot([args.lrs[best]], [means[best]], "*", markersize=14, color=line.get_color())
        axis.set(xscale="log", xlabel="peak learning rate",
                 title=f"{name} parametrisation (mean +- std of {len(args.seeds)} seeds)")
        axis.legend(fontsize=8)
    panels[0].set_ylabel(f"validation loss after {args.steps} steps (nats/byte)")
    fig.tight_layout()
    return save_figure(fig, args.plot)


if __name__ == "__main__":
    sys.exit(main())
