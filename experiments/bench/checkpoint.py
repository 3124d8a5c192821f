"""What the checkpoints' checksums cost: a save (and a restore) with and without them.

    distill bench checkpoint [CONFIG] [--repeats 5]      # default: experiments/quickstart.yaml

Builds CONFIG's first state (every model, optimizer moments included) and, round-robin in one
process, `--repeats` times: *checksums* (`distill.checkpoint.checksums` of the state alone), *save*
(`Checkpoints.save`, whose synchronous part computes the checksums before orbax starts writing,
then `wait` until the step is committed) and *restore* (`Checkpoints.restore`: read back, then
`verify` recomputes every checksum and counts non-finite values). A save without checksums is the
save minus the checksums (they run before it, on the same thread); likewise for the restore.
Prints the medians and the ratios with / without.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
from _common import table

import distill
from distill import checkpoint
from distill.setup import placed_initial_state, placement

ROOT = Path(__file__).resolve().parents[2]


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(ROOT / "experiments" / "quickstart.yaml"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    exp = distill.resolve(distill.load_config(args.config))
    placed = placement(exp)
    state = placed_initial_state(exp, placed)
    megabytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 2**20
    times = {"checksums": [], "save": [], "restore": []}
    with tempfile.TemporaryDirectory() as scratch:
        saves = checkpoint.Checkpoints(Path(scratch), keep=2)
        checkpoint.checksums(state)  # compiled once, outside the timings
        def save_and_restore(step: int) -> dict[str, float]:
            return {"checksums": timed(lambda: checkpoint.checksums(state)),
                    "save": timed(lambda: (saves.save(step, state, {"step": step}), saves.wait())),
                    "restore": timed(lambda: saves.restore(step, placed.abstract_state()))}

        for repeat in range(args.repeats + 1):
            took = save_and_restore(repeat + 1)
            if repeat:  # the first round warms the restore's compilation
                for name, seconds in took.items():
                    times[name].append(seconds)
        saves.close()
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = [[name, f"{median[name] * 1000:.1f}", f"{min(times[name]) * 1000:.1f}"] for name in times]
    print(f"{Path(args.config).name}: a state of {megabytes:.1f} MiB in {len(jax.tree.leaves(state))} arrays, "
          f"{args.repeats} repeats, {jax.devices()[0].platform}")
    print(table(["", "median ms", "min ms"], rows))
    for name in ("save", "restore"):
        without = median[name] - median["checksums"]
        print(f"{name}: with checksums / without = {median[name] * 1000:.1f} / {without * 1000:.1f} ms = "
              f"{median[name] / without:.3f}")


if __name__ == "__main__":
    sys.exit(main())
