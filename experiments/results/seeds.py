"""Reproduce docs/results.md: a config over several seeds, every student against the control.

    python experiments/results/seeds.py --seeds 0 1 2 [--config experiments/quickstart.yaml]
                                        [--out runs/results] [extra overrides ...]

Each seed is one `distill run CONFIG train.seed=S run.dir=OUT/seed-S` (a finished seed is not
re-run: its directory resumes and re-reports). Prints Markdown tables of validation bits per byte
per seed and model, and each student's difference from the control student (the one with
`control: true`): per seed, mean and sample standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from distill.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def relative_change(value: float, reference: float) -> float:
    """(value - reference) / reference in percent: negative = lower bits per byte than reference."""
    return (value - reference) / reference * 100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/results")
    parser.add_argument("--config", default=str(ROOT / "experiments" / "quickstart.yaml"))
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every seed")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    controls = [s.name for s in cfg.students if s.control]
    if len(controls) != 1:
        parser.error(f"{args.config}: needs exactly one student with control: true, found {len(controls)}")
    control = controls[0]
    students = [s.name for s in cfg.students if not s.control]

    runs = {}
    for seed in args.seeds:
        run_dir = Path(args.out) / f"seed-{seed}"
        command = [sys.executable, "-m", "distill.cli", "run", args.config, f"train.seed={seed}",
                   f"run.dir={run_dir}", *args.overrides]
        print("$", " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            print(f"seed {seed} failed", file=sys.stderr)
            return 1
        runs[seed] = json.loads((run_dir / "summary.json").read_text())

    seeds = list(runs)
    print("\nValidation bits per byte:\n")
    print("| model | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    for model in ["teacher", control, *students]:
        print(f"| {model} | " + " | ".join(f"{runs[s]['bpb'][model]:.4f}" for s in seeds) + " |")
    print("\nRun wall (s): " + ", ".join(f"seed {s}: {runs[s]['wall_seconds']:.0f}" for s in seeds))

    print(f"\nEach student vs {control} (negative = better than the control):\n")
    print("| student | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- std |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for model in students:
        changes = [relative_change(runs[s]["bpb"][model], runs[s]["bpb"][control]) for s in seeds]
        spread = statistics.stdev(changes) if len(changes) > 1 else 0.0
        print(f"| {model} | " + " | ".join(f"{c:+.2f}%" for c in changes)
              + f" | {statistics.mean(changes):+.2f}% +- {spread:.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
