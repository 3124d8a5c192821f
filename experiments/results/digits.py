"""Early fusion on scikit-learn's digits: does the distilled student name the digit better than the control?

    python experiments/results/digits.py --seeds 0 1 2 [--out runs/digits] [--plot PNG] [extra overrides ...]

Each seed is one `distill run experiments/digits.yaml train.seed=S run.dir=OUT/seed-S` (a completed
run of the same config is read, not run again). Then every model of the finished run reads every
validation image and its caption, teacher-forced, and is scored on the digit's name:
- accuracy: the share of images whose name (and the newline after it) is the model's most probable
  next token at every position, i.e. the name that greedy decoding after "this digit is" writes;
- name bits: the cross-entropy of the name and newline, in bits per image.
Prints a Markdown table per seed and the mean +- sample std over seeds, with the validation bits
per byte of the whole caption from the run's summary. `--plot` draws the validation curves (mean over
seeds) beside each model's digit accuracy (mean +- std, one dot per seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from seeds import mean_and_spread, mean_curve, run_or_read, save_figure

from distill.data import build_data
from distill.data.digits import name_start
from distill.runs import load_models

ROOT = Path(__file__).resolve().parents[2]


@nnx.jit
def _logits(model, batch: dict) -> jax.Array:
    return model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                 images=batch["images"]).logits


def name_scores(model, batches: list[dict], first_name_label: int) -> tuple[float, float]:
    """(accuracy, name bits per image) of `model` over the image rows of `batches`."""
    correct, bits, images = 0, 0.0, 0
    for batch in batches:
        logits = np.asarray(_logits(model, batch), np.float64)
        name = (batch["mask"] > 0) & (np.arange(batch["mask"].shape[1]) >= first_name_label)
        rows = name.any(axis=1)  # padding rows have no caption
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        label_log_probs = np.take_along_axis(log_probs, batch["labels"][..., None], -1)[..., 0]
        hits = (logits.argmax(-1) == batch["labels"]) | ~name
        correct += int(hits.all(axis=1)[rows].sum())
        bits += float(-(label_log_probs * name).sum() / np.log(2))
        images += int(rows.sum())
    return correct / images, bits / images


def score_run(run_dir: Path) -> dict[str, dict[str, float]]:
    """{model: {"accuracy", "name_bits", "bpb"}} of a finished digits run."""
    cfg, _, teacher, students = load_models(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    batches = build_data(cfg.data, seed=cfg.train.seed).validation_batches()
    first = name_start(cfg.data.tokens_per_image)
    scores = {}
    for name, model in [("teacher", teacher), *students.items()]:
        accuracy, bits = name_scores(model, batches, first)
        scores[name] = {"accuracy": accuracy, "name_bits": bits, "bpb": summary["bpb"][name]}
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/digits")
    parser.add_argument("--config", default=str(ROOT / "experiments" / "digits.yaml"))
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG", help="also write curves and accuracies here")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every seed")
    args = parser.parse_args()
    per_seed = {}
    for seed in args.seeds:
        run_dir = Path(args.out) / f"seed-{seed}"
        summary = run_or_read(args.config, [f"train.seed={seed}", f"run.dir={run_dir}", *args.overrides])
        per_seed[seed] = score_run(run_dir)
        print(f"seed {seed}: trained in {summary.get('train_seconds', summary['wall_seconds']):.0f} s", flush=True)
    models = list(per_seed[args.seeds[0]])
    print("\n| model | seed | caption bpb | name bits / image | digit accuracy |\n|---|---|---|---|---|")
    for model in models:
        for seed, scores in per_seed.items():
            s = scores[model]
            print(f"| {model} | {seed} | {s['bpb']:.4f} | {s['name_bits']:.3f} | {s['accuracy']:.1%} |")
    print("\nMean +- std over seeds:\n")
    print("| model | caption bpb | name bits / image | digit accuracy |\n|---|---|---|---|")
    formats = (("bpb", "{:.4f} +- {:.4f}"), ("name_bits", "{:.3f} +- {:.3f}"), ("accuracy", "{:.1%} +- {:.1%}"))
    for model in models:
        cells = [fmt.format(*mean_and_spread([per_seed[s][model][key] for s in per_seed])) for key, fmt in formats]
        print(f"| {model} | " + " | ".join(cells) + " |")
    if args.plot:
        run_dirs = [Path(args.out) / f"seed-{seed}" for seed in args.seeds]
        print(f"\nplot: {plot(run_dirs, per_seed, args.plot)}")
    return 0


def plot(run_dirs: list[Path], per_seed: dict[int, dict[str, dict[str, float]]], out: Path) -> Path:
    """Validation bits per byte against the step (mean over the runs) and each model's digit accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(next(iter(per_seed.values())))
    fig, (curves, accuracy) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model in models:
        tag = "eval/teacher/bpb" if model == "teacher" else f"eval/student/{model}/bpb"
        steps, values = mean_curve(run_dirs, tag)
        curves.plot(steps, values, marker="o", label=model, linestyle="--" if model == "teacher" else "-")
    curves.set(xlabel="step", ylabel="validation bits per byte (caption)", yscale="log",
               title=f"mean of {len(run_dirs)} seeds")
    curves.legend()
    for x, model in enumerate(models):
        values = [100 * scores[model]["accuracy"] for scores in per_seed.values()]
        mean, spread = mean_and_spread(values)
        accuracy.bar(x, mean, yerr=spread, capsize=4, color="lightgray", edgecolor="black")
        accuracy.plot([x] * len(values), values, "o", color="black", markersize=4)
    accuracy.set_xticks(range(len(models)), models)
    low = min(100 * s[m]["accuracy"] for s in per_seed.values() for m in models)
    accuracy.set_ylim(max(0, low - 5), 100)
    accuracy.set(ylabel="validation digits named, % (mean +- std; dots: seeds)", title="digit accuracy")
    fig.tight_layout()
    return save_figure(fig, out)


if __name__ == "__main__":
    raise SystemExit(main())
