"""Reproduce docs/results.md: a config over several seeds, every student against the control.

    python experiments/results/seeds.py --seeds 0 1 2 [--config experiments/quickstart.yaml]
                                        [--out runs/results] [--plot FIGURE.png] [extra overrides ...]

Each seed is one `distill run CONFIG train.seed=S run.dir=OUT/seed-S` (a completed run of the
same config is read, not run again; an interrupted one resumes). Prints Markdown tables of validation bits per byte
per seed and model, and each student's difference from its control (the student with
`control: true`; with several, the one named after the student, e.g. `x-control` for `x`, or
as `--pair` says): per seed, mean and sample standard deviation over the seeds. `--plot` also draws
the validation curves (mean over seeds) and the differences (mean +- std) into one PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from distill.config import load_config
from distill.rundir import control_for, finished_summary

ROOT = Path(__file__).resolve().parents[2]


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: list[float]) -> str:
    """`+m.mm% +- s.ss%`: mean and spread of relative changes, as the tables print them."""
    mean, spread = mean_and_spread(values)
    return f"{mean:+.2f}% +- {spread:.2f}%"


def save_figure(fig, out: Path) -> Path:
    """Write `fig` as a PNG at `out` (creating its folder) and close it."""
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def relative_change(value: float, reference: float) -> float:
    """(value - reference) / reference in percent: negative = lower bits per byte than reference."""
    return (value - reference) / reference * 100


def run_or_read(config: str, overrides: list[str]) -> dict:
    """The summary of `distill run CONFIG OVERRIDES` (which name run.dir); a completed run of the
    same config there is read, not run again."""
    finished = finished_summary(load_config(config, overrides))
    if finished:
        return finished
    command = [sys.executable, "-m", "distill.cli", "run", config, *overrides]
    print("$", " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.dir="))
    return json.loads((Path(run_dir) / "summary.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/results")
    parser.add_argument("--config", default=str(ROOT / "experiments" / "quickstart.yaml"))
    parser.add_argument("--plot", default=None, metavar="PNG", help="also write curves and differences here")
    parser.add_argument("--pair", action="append", default=[], metavar="STUDENT=CONTROL",
                        help="compare STUDENT with this control (default: the control named STUDENT-..., "
                             "else the first)")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every seed")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    controls = [s.name for s in cfg.students if s.control]
    students = [s.name for s in cfg.students if not s.control]
    pairs = {student: control_for(student, controls) for student in students}
    for pair in args.pair:
        student, _, control = pair.partition("=")
        if student not in students or control not in controls:
            parser.error(f"--pair {pair}: name a student of {students} and a control of {controls}")
        pairs[student] = control
    if not controls:
        parser.error(f"{args.config}: needs a student with control: true")

    runs = {}
    for seed in args.seeds:
        runs[seed] = run_or_read(args.config, [f"train.seed={seed}", f"run.dir={Path(args.out) / f'seed-{seed}'}",
                                               *args.overrides])

    seeds = list(runs)
    print("\nValidation bits per byte:\n")
    print("| model | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    for model in ["teacher", *controls, *students]:
        print(f"| {model} | " + " | ".join(f"{runs[s]['bpb'][model]:.4f}" for s in seeds) + " |")
    print("\nTraining seconds (the training loop, over every command that trained the run; a summary written "
          "before train_seconds existed gives its command's wall_seconds): "
          + ", ".join(f"seed {s}: {runs[s].get('train_seconds', runs[s]['wall_seconds']):.0f}" for s in seeds))

    print("\nEach student vs its control (negative = better than the control):\n")
    print("| student | control | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- std |")
    print("|---|---|" + "---|" * (len(seeds) + 1))
    differences = {}
    for model in students:
        control = pairs[model]
        changes = [relative_change(runs[s]["bpb"][model], runs[s]["bpb"][control]) for s in seeds]
        differences[model] = mean_and_spread(changes)
        print(f"| {model} | {control} | " + " | ".join(f"{c:+.2f}%" for c in changes) + f" | {mean_std(changes)} |")
    if args.plot:
        run_dirs = [Path(args.out) / f"seed-{s}" for s in seeds]
        print(f"\nplot: {plot(run_dirs, ['teacher', *controls, *students], controls, differences, Path(args.plot))}")
    return 0


def mean_curve(run_dirs: list[Path], tag: str) -> tuple[list[int], list[float]]:
    """(steps, the mean over runs of `tag` at each step every run logged)."""
    from distill.run_logger import read_metrics_jsonl

    per_run = [{row["step"]: row[tag] for row in read_metrics_jsonl(d) if tag in row} for d in run_dirs]
    steps = sorted(set.intersection(*(set(r) for r in per_run)))
    return steps, [statistics.mean(r[step] for r in per_run) for step in steps]


def plot(run_dirs: list[Path], models: list[str], controls: list[str], differences: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model in models:
        tag = "eval/teacher/bpb" if model == "teacher" else f"eval/student/{model}/bpb"
        steps, values = mean_curve(run_dirs, tag)
        curves.plot(steps, values, marker="o", label=model, linestyle="--" if model == "teacher" or model in controls else "-")
    tails = [v for line in curves.get_lines() for v in line.get_ydata()[len(line.get_ydata()) // 2:]]
    curves.set_ylim(top=1.1 * max(tails))  # students are untrained (8 bpb) before the teacher's warm-up ends
    curves.set(xlabel="step", ylabel="validation bits per byte", title=f"mean of {len(run_dirs)} seeds")
    curves.legend()
    names = list(differences)
    means, spreads = [differences[n][0] for n in names], [differences[n][1] for n in names]
    bars.barh(names, means, xerr=spreads, color=["tab:green" if m < 0 else "tab:red" for m in means], capsize=4)
    bars.axvline(0, color="black", linewidth=0.8)
    bars.invert_yaxis()
    bars.set(xlabel="final bpb vs the control, % (mean +- std; negative = better)", title="students vs their control")
    fig.tight_layout()
    return save_figure(fig, out)


if __name__ == "__main__":
    sys.exit(main())
