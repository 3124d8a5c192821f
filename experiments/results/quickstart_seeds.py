"""Reproduce docs/results.md: the quickstart over several seeds, distilled vs control.

    python experiments/results/quickstart_seeds.py --seeds 0 1 2 [--out runs/results] [extra overrides ...]

Each seed is one `distill run experiments/quickstart.yaml train.seed=S run.dir=OUT/seed-S` (a
finished seed is not re-run: its directory resumes and re-reports). Prints a Markdown table of
validation bits per byte per seed and the mean +- std of the distilled-vs-control difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/results")
    parser.add_argument("--config", default=str(ROOT / "experiments" / "quickstart.yaml"))
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every seed")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        run_dir = Path(args.out) / f"seed-{seed}"
        started = time.time()
        command = [sys.executable, "-m", "distill.cli", "run", args.config, f"train.seed={seed}",
                   f"run.dir={run_dir}", *args.overrides]
        print("$", " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            print(f"seed {seed} failed", file=sys.stderr)
            return 1
        summary = json.loads((run_dir / "summary.json").read_text())
        bpb = summary["bpb"]
        rows.append((seed, bpb["teacher"], bpb["distilled"], bpb["control"], summary["wall_seconds"],
                     time.time() - started))
    print("\n| seed | teacher bpb | distilled bpb | control bpb | distilled vs control | run wall (s) |")
    print("|---|---|---|---|---|---|")
    gains = []
    for seed, teacher, distilled, control, wall, _ in rows:
        gain = (distilled - control) / control * 100
        gains.append(gain)
        print(f"| {seed} | {teacher:.4f} | {distilled:.4f} | {control:.4f} | {gain:+.2f}% | {wall:.0f} |")
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    print(f"\ndistilled vs control over {len(gains)} seeds: {statistics.mean(gains):+.2f}% +- {spread:.2f}% "
          "(negative = distilled better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
