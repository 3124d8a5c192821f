"""The `distill` command: parses arguments and dispatches; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path

from distill import compare, launch, runs, sweep, tb
from distill.config import load_config
from distill.errors import ConfigError
from distill.guards import EXIT_CODES
from distill.hf import check_export_target, to_hf
from distill.trainer import run as run_experiment
from teacher.cache_writer import write_cache

BENCH_DIR = Path(__file__).resolve().parents[1] / "experiments" / "bench"


def _bench(args: argparse.Namespace) -> int:
    script = BENCH_DIR / f"{args.name}.py"
    if args.name.startswith("_") or not script.is_file():
        known = sorted(p.stem for p in BENCH_DIR.glob("[!_]*.py")) if BENCH_DIR.is_dir() else []
        print(f"distill bench: no benchmark {args.name!r} in {BENCH_DIR}; known: {', '.join(known) or 'none'} "
              "(benchmarks run from a source checkout: pip install -e .)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.rest]
    sys.path.append(str(BENCH_DIR))  # their shared module, as when the script runs directly
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _run(args: argparse.Namespace) -> int:
    on_changed_config = "resume" if args.resume else "new" if args.force_new else "refuse"
    summary = run_experiment(load_config(args.config, args.overrides), stop_after=args.stop_after,
                  on_changed_config=on_changed_config)
    if summary["status"] == "process_lost":  # JAX's exit would wait on the lost process, then abort
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CODES["process_lost"])
    return EXIT_CODES.get(summary["status"], 1)


def _cache(args: argparse.Namespace) -> int:
    meta = write_cache(load_config(args.config, args.overrides), args.out, args.k)
    print(json.dumps({"cache": args.out, "k": meta["k"], "steps": meta["steps"], "eval_batches": meta["eval_batches"],
                      "write_seconds": round(meta["write_seconds"], 1), **meta["stats"]}, indent=2))
    print(f"students read it with teacher.source=cache teacher.path={args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    metrics = runs.evaluate_run(args.run_dir, max_batches=args.batches)
    print(json.dumps(metrics, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    check_export_target(args.hf, args.overwrite)  # before the checkpoint is read
    cfg, step, teacher, students = runs.load_models(args.run_dir)
    name = args.model or next((s.name for s in cfg.students if not s.control), cfg.students[0].name)
    if name == "teacher" and teacher is None:
        print(f"distill export: {args.run_dir} distilled from a teacher cache and holds no teacher; choose one of "
              f"{', '.join(students)}", file=sys.stderr)
        return 2
    if name != "teacher" and name not in students:
        print(f"distill export: --model {name!r} is not in the run; choose teacher or one of "
              f"{', '.join(students)}", file=sys.stderr)
        return 2
    out = to_hf(teacher if name == "teacher" else students[name], args.hf, overwrite=args.overwrite)
    print(f"exported {name} (step {step}) to {out}: Llama4ForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    out = runs.import_hf(args.hf_dir, args.out, allow_pickle=args.allow_pickle)
    print(f"imported {args.hf_dir} to {out}: use it as teacher.source=run teacher.path={out}")
    return 0


def _job_options(args: argparse.Namespace) -> sweep.JobOptions | None:
    """--launcher submitit / submitit-local and the job's resources; None for other launchers."""
    given = [f"--{k.replace('_', '-')}" for k in ("gpus_per_run", "nodes_per_run", "tasks_per_node", "wait")
             if getattr(args, k) not in (None, False)] + [f"--slurm-{k}" for k in _SLURM if getattr(args, f"slurm_{k}")]
    if args.launcher not in sweep.LAUNCHERS:
        if given:
            raise ConfigError(f"{given[0]}: only with --launcher submitit (SLURM) or submitit-local")
        return None
    return sweep.JobOptions(
        cluster=sweep.LAUNCHERS[args.launcher], gpus_per_run=0 if args.gpus_per_run is None else args.gpus_per_run,
        nodes=1 if args.nodes_per_run is None else args.nodes_per_run,
        tasks_per_node=1 if args.tasks_per_node is None else args.tasks_per_node,
        time_min=sweep.parse_time(args.slurm_time) if args.slurm_time else None, partition=args.slurm_partition,
        cpus_per_task=args.slurm_cpus_per_task, mem=args.slurm_mem, account=args.slurm_account, qos=args.slurm_qos,
        params=sweep.parse_params(args.slurm_param), setup=tuple(args.slurm_setup))


def _sweep(args: argparse.Namespace) -> int:
    spec = sweep.load_sweep(args.sweep, out=args.dir)
    sweep.check_metric(spec, args.metric)
    options = _job_options(args)
    if args.dry_run:
        print(sweep.describe(spec))
        if options is not None and spec.runs:
            sweep.check_options(options, submitting=False)
            run = spec.runs[0]
            print(f"\n# the sbatch script of {run.name}'s job (--launcher submitit):\n"
                  + sweep.sbatch_script(options, run.run_dir / "submitit" / "%j", run.name))
        return 0
    if args.report:
        if not spec.out.is_dir():
            raise sweep.SweepError(f"--report: {spec.out} does not exist; run the sweep first (or give its --dir)")
        print(sweep.report(spec, metric=args.metric, maximize=args.maximize).markdown())
        return 0
    try:
        results = sweep.run_sweep(spec, parallel=args.parallel, launcher=args.launcher, jobs_options=options,
                                  wait=args.wait, metric=args.metric, maximize=args.maximize)
    except KeyboardInterrupt:
        print("distill sweep: interrupted; run the same command again to resume (report: --report)", file=sys.stderr)
        return 130
    bad = [name for name, r in results.items() if r.status not in ("completed", "submitted", "queued", "running")]
    if bad:
        print(f"distill sweep: {len(bad)} of {len(results)} runs did not complete: {', '.join(bad)} "
              f"(logs: {args.dir or spec.out}/<name>/sweep.log)", file=sys.stderr)
    return 1 if bad else 0


def _compare(args: argparse.Namespace) -> int:
    runs = compare.run_dirs(args.dirs)
    if args.by_model and len(runs) != 1:
        raise ConfigError(f"--by-model: give one run directory (got {len(runs)} runs)")
    series = compare.model_curves(runs[0], args.metric) if args.by_model else compare.curves(runs, args.metric)
    print(compare.table(series, args.metric))
    print(f"plot: {compare.plot(series, args.metric, args.out)}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    if not command:
        raise ConfigError("distill launch: give the command after --, e.g. distill launch --processes 2 -- distill run "
                          "CONFIG mesh.data=2")
    if args.processes < 1:
        raise ConfigError(f"--processes {args.processes}: must be >= 1")
    return launch.launch(command, args.processes, args.devices_per_process, Path(args.log_dir))


def _tb(args: argparse.Namespace) -> int:
    return tb.serve(args.dir, args.port)


_SLURM_HELP = [("partition", "P", None), ("time", "TIME", "time limit: MIN, H:MM:SS or D-H:MM:SS (required)"),
               ("cpus-per-task", "C", None), ("mem", "SIZE", "memory per node, e.g. 64G"), ("account", "A", None),
               ("qos", "Q", None), ("param", "KEY=VALUE", "any other sbatch option, e.g. constraint=a100 (repeat)"),
               ("setup", "LINE", "a shell line before the run, e.g. 'module load cuda' (repeat)")]
_SLURM = [name.replace("-", "_") for name, _, _ in _SLURM_HELP]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) one experiment from a YAML config")
    run.add_argument("config", help="the experiment's YAML file, e.g. experiments/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 run.dir=runs/r1")
    run.add_argument("--stop-after", type=int, default=None, metavar="N",
                     help="stop after N steps with a checkpoint; running the command again resumes")
    changed = run.add_mutually_exclusive_group()
    changed.add_argument("--resume", action="store_true", help="run.dir holds a run of another config: continue "
                         "it from its latest checkpoint under this config (same model shapes; e.g. more steps)")
    changed.add_argument("--force-new", action="store_true", help="run.dir holds another run: move it to "
                         "<dir>.replaced-<time> and start a new run")
    run.set_defaults(handler=_run)
    cache = commands.add_parser("cache", help="write a frozen teacher's top-k log-probabilities over a run's batches "
                                              "(the offline logit cache: teacher.source=cache reads it)")
    cache.add_argument("config", help="a run config whose teacher section names a trained teacher (source run/hf); "
                                      "its data, seed, steps and batch geometry fix the batches cached")
    cache.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.path=runs/t train.steps=500")
    cache.add_argument("--k", type=int, required=True, help="entries kept per token, most probable first")
    cache.add_argument("--out", required=True, help="the cache directory (a write resumes in it)")
    cache.set_defaults(handler=_cache)
    evaluate = commands.add_parser("eval", help="evaluate a run's latest checkpoint on its validation split")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--batches", type=int, default=None, help="at most this many validation batches")
    evaluate.set_defaults(handler=_eval)
    export = commands.add_parser("export", help="write a run's student (or teacher) as a transformers checkpoint")
    export.add_argument("run_dir")
    export.add_argument("--hf", required=True, metavar="OUT", help="output directory (must be new or empty)")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty --hf directory")
    export.add_argument("--model", default=None, help="student name or 'teacher' (default: the first "
                                                      "non-control student)")
    export.set_defaults(handler=_export)
    import_hf = commands.add_parser("import-hf", help="turn a transformers Llama 4 directory into a teacher "
                                                      "run directory (orbax checkpoint + config)")
    import_hf.add_argument("hf_dir")
    import_hf.add_argument("out")
    import_hf.add_argument("--allow-pickle", action="store_true", help="accept *.bin pickle weights (trusted only)")
    import_hf.set_defaults(handler=_import_hf)
    sweep = commands.add_parser("sweep", help="run a sweep file: many runs of one config, resumable, with a "
                                              "summary table (docs/sweeps.md)")
    sweep.add_argument("sweep", help="the sweep's YAML file, e.g. experiments/sweeps/temperature.yaml")
    sweep.add_argument("--dir", default=None, metavar="OUT", help="where the runs go (default: "
                                                                   "runs/sweeps/<sweep file stem>)")
    sweep.add_argument("--parallel", type=int, default=None, metavar="N",
                       help="runs at a time (default: 1 with <= 2 cores, else cores // 2)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and their commands; run nothing")
    sweep.add_argument("--report", action="store_true", help="only write and print the summary tables")
    sweep.add_argument("--launcher", default=None, metavar="CMD",
                       help="submitit: each unfinished run a SLURM job; submitit-local: the same jobs on this "
                            "machine; else hand each run to CMD (its command appended, or substituted for "
                            "{command}; {name}, {dir} too), e.g. 'sbatch --wrap \"{command}\"'")
    jobs = sweep.add_argument_group("jobs of --launcher submitit / submitit-local (docs/sweeps.md)")
    jobs.add_argument("--wait", action="store_true", help="wait for the jobs and record how each run ended")
    jobs.add_argument("--gpus-per-run", type=int, default=None, metavar="G", help="GPUs of a run, over its nodes")
    jobs.add_argument("--nodes-per-run", type=int, default=None, metavar="N", help="hosts of a run (multi-host JAX)")
    jobs.add_argument("--tasks-per-node", type=int, default=None, metavar="T",
                      help="processes per host; each a JAX process (JAX_PROCESS_ID ...)")
    for name, meta, text in _SLURM_HELP:
        jobs.add_argument(f"--slurm-{name}", metavar=meta, help=text, type=int if name == "cpus-per-task" else str,
                          **({"action": "append", "default": []} if name in ("param", "setup") else {}))
    sweep.add_argument("--metric", default=None, help="sort by this column (default: the first non-control "
                                                      "student's bpb), e.g. bpb/teacher or distilled_vs_control_pct")
    sweep.add_argument("--maximize", action="store_true", help="higher --metric is better")
    sweep.set_defaults(handler=_sweep)
    compare = commands.add_parser("compare", help="one metric of several runs (or a sweep's runs) on one plot")
    compare.add_argument("dirs", nargs="+", help="run directories, or folders of runs (a sweep)")
    compare.add_argument("--metric", required=True, help="a logged tag, e.g. eval/student/distilled/bpb; with "
                         "--by-model a per-model one, e.g. eval/bpb or train/ce")
    compare.add_argument("--by-model", action="store_true", help="one run: a line per model (teacher, students)")
    compare.add_argument("--out", default="compare.png", help="the PNG to write")
    compare.set_defaults(handler=_compare)
    launcher = commands.add_parser("launch", help="run a command as one multi-process JAX job on this machine "
                                                  "(try a multi-host config before booking a cluster)")
    launcher.add_argument("--processes", type=int, required=True, help="processes of the job")
    launcher.add_argument("--devices-per-process", type=int, default=None, metavar="D",
                          help="simulated CPU devices per process (XLA_FLAGS)")
    launcher.add_argument("--log-dir", default="launch-logs", help="where processes 1..N-1 write process-<i>.log")
    launcher.add_argument("command_line", nargs=argparse.REMAINDER, help="-- distill run CONFIG ...")
    launcher.set_defaults(handler=_launch)
    tb = commands.add_parser("tb", help="TensorBoard on 127.0.0.1 for a run, sweep or runs directory")
    tb.add_argument("dir", help="a run directory, a sweep directory, or runs/")
    tb.add_argument("--port", type=int, default=None, help="default: a free port")
    tb.set_defaults(handler=_tb)
    bench = commands.add_parser("bench", help="run a benchmark script from experiments/bench and print its tables")
    bench.add_argument("name", help="benchmark name, e.g. model or losses")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, FileExistsError) as error:
        print(f"distill {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
