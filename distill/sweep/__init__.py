"""Sweeps: many runs of one base config over dotted keys, resumable, with a summary table.

A sweep file (YAML, docs/sweeps.md)::

    base: experiments/quickstart.yaml          # relative paths are from the current directory
    overrides: {train.steps: 400}              # fixed for every run
    grid: {loss.temperature: [1.0, 2.0, 4.0]}  # cartesian product
    zip: {optim.learning_rate: [1.0e-3, 3.0e-3], optim.warmup_steps: [20, 50]}  # paired lists
    random: {count: 4, seed: 0, keys: {loss.weighting.alpha: {uniform: [0.2, 0.8]}}}
    seeds: [0, 1, 2]                           # repeats: train.seed

```python
sweep = load_sweep("experiments/sweeps/temperature.yaml")   # every run's config built and checked
[(run.name, run.run_dir) for run in sweep.runs]
results = run_sweep(sweep, parallel=2)                       # skips finished runs, resumes the others
table = report(sweep)                                        # OUT/summary.csv, OUT/summary.md
```

The modules, each importing only those above it:

    spec.py       the sweep file: shape, expansion, run names, values as overrides (pure)
    tables.py     the report's rows, groups over seeds, Markdown and CSV (pure)
    state.py      the resolved sweep (`Sweep`, `Run`) and its state on disk: sweep.json, the report
    ownership.py  runs that die with their sweep (PR_SET_PDEATHSIG); orphans of a killed sweep stopped
    jobs.py       runs as submitit jobs (SLURM, or submitit's local executor); OUT/<name>/job.json
    processes.py  `run_sweep`: one `python -m distill.cli run BASE k=v ... run.dir=OUT/<name>` per run
"""

from distill.sweep.jobs import (
    LAUNCHERS,
    JobOptions,
    check_options,
    jax_process_env,
    parse_params,
    parse_time,
    sbatch_script,
)
from distill.sweep.ownership import dies_with_parent, lock_holder, stop_orphan
from distill.sweep.processes import default_parallel, launcher_command, process_env, run_sweep
from distill.sweep.spec import (
    RandomAxis,
    SweepError,
    SweepSpec,
    draw_random,
    expand,
    format_value,
    parse_spec,
    run_names,
    short_names,
)
from distill.sweep.state import Run, RunResult, Sweep, build_sweep, check_metric, describe, load_sweep, report
from distill.sweep.tables import Group, Report, Row, build_report, group_over_seeds, sort_rows, summary_metrics

__all__ = ["LAUNCHERS", "Group", "JobOptions", "RandomAxis", "Report", "Row", "Run", "RunResult", "Sweep",
           "SweepError", "SweepSpec", "build_report", "build_sweep", "check_metric", "check_options", "default_parallel", "describe",
           "dies_with_parent", "draw_random", "expand", "format_value", "group_over_seeds", "jax_process_env",
           "launcher_command", "load_sweep", "lock_holder", "parse_params", "parse_spec", "parse_time", "process_env",
           "report", "run_names", "run_sweep", "sbatch_script", "short_names", "sort_rows", "stop_orphan",
           "summary_metrics"]
