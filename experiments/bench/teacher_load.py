"""Reading a frozen teacher from another run: the whole checkpoint vs the teacher's arrays alone.

    distill bench teacher_load RUN_DIR [--repeats 3]

Each way runs in a fresh process (its peak resident memory is its own), round-robin, `--repeats`
times: *imports* (the interpreter, jax and the model's shapes: the floor), *whole checkpoint*
(every array of the saved state, students and optimizer moments included, read to the host, then
the teacher's taken: how `distill.runs.load_models` reads a run) and *teacher only*
(`distill.runs.restore_teacher_params`, what `teacher.source: run` does, here onto one device).
Prints the median seconds and peak RSS of each, and the RSS above the floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _common import table

WAYS = {
    "imports": "",
    "whole checkpoint": """
_, tree = checkpoint_tree(run_dir)
model_with_params(teacher_model, tree["teacher"]["params"], run_dir)
""",
    "teacher only": """
from teacher.sources import teacher_from_run
teacher_from_run(run_dir, teacher_model)
""",
}

PROGRAM = """
import json, resource, sys, time
import jax
from flax import nnx
from distill.model import build_model
from distill.experiment import resolve
from distill.rundir import run_config
from distill.runs import checkpoint_tree, model_with_params
run_dir = sys.argv[1]
teacher_model = resolve(run_config(run_dir)).teacher.model
shapes = nnx.state(nnx.eval_shape(lambda: build_model(teacher_model)), nnx.Param)
teacher_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
jax.numpy.zeros(1).block_until_ready()
start = time.perf_counter()
{way}
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "teacher_mb": teacher_bytes / 2**20}}))
"""


def measure(run_dir: str, way: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROGRAM.format(way=WAYS[way]), run_dir], capture_output=True,
                            text=True, timeout=900)
    if result.returncode:
        sys.exit(f"teacher_load: {way} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory with a checkpoint (its teacher is read)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (Path(args.run_dir) / "checkpoints").is_dir():
        parser.error(f"{args.run_dir}: no checkpoints/ directory; give a run directory with a checkpoint")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for repeat in range(args.repeats):
        for way in WAYS:
            runs[way].append(measure(args.run_dir, way))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    floor = statistics.median(r["rss_mb"] for r in runs["imports"])
    teacher_mb = runs["imports"][0]["teacher_mb"]
    rows = []
    for way, results in runs.items():
        rss = statistics.median(r["rss_mb"] for r in results)
        seconds = statistics.median(r["seconds"] for r in results)
        rows.append([way, "-" if way == "imports" else f"{seconds:.2f}", f"{rss:.0f}",
                     "-" if way == "imports" else f"{rss - floor:.0f}"])
    print(f"\n### Reading the teacher of {args.run_dir} ({teacher_mb:.1f} MiB of parameters; "
          f"median of {args.repeats} processes each)\n")
    print(table(["way", "seconds", "peak RSS MiB", "above the floor MiB"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
