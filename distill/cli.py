"""The `distill` command: parses arguments and dispatches; the work lives in the library."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "experiments" / "bench"


def _bench(args: argparse.Namespace) -> int:
    script = BENCH_DIR / f"{args.name}.py"
    if not script.is_file():
        known = sorted(p.stem for p in BENCH_DIR.glob("*.py")) if BENCH_DIR.is_dir() else []
        print(f"distill bench: no benchmark {args.name!r} in {BENCH_DIR}; known: {', '.join(known) or 'none'} "
              "(benchmarks run from a source checkout: pip install -e .)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _run(args: argparse.Namespace) -> int:
    from distill.config import load_config
    from distill.trainer import run

    summary = run(load_config(args.config, args.overrides), stop_after=args.stop_after)
    return 0 if summary["status"] in ("completed", "stopped") else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) one experiment from a YAML config")
    run.add_argument("config", help="the experiment's YAML file, e.g. experiments/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 run.dir=runs/r1")
    run.add_argument("--stop-after", type=int, default=None, metavar="N",
                     help="stop after N steps with a checkpoint; running the command again resumes")
    run.set_defaults(handler=_run)
    bench = commands.add_parser("bench", help="run a benchmark script from experiments/bench and print its tables")
    bench.add_argument("name", help="benchmark name, e.g. model or losses")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from distill.model.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"distill {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
