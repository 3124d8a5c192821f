"""docs/results.md, the offline logit cache: students distilled from a cache of the teacher's top-k
vs distilled online from the same frozen teacher, at several k, and what the cache saves.

    python experiments/results/cache.py --seeds 0 1 2 [--config experiments/quickstart.yaml]
        [--out runs/offline] [--k 64] [--student-k 1 4 16 64] [--plot docs/figures/cache.png]

Per seed (a completed run of the same config is read, not run again; these are Result 4's
teacher and offline runs, see offline.py):
- the teacher pre-trained alone (OUT/teacher/seed-S), and the online arm: the config's students
  from it frozen (OUT/offline/seed-S), full-vocabulary KD;
- `distill cache` of that teacher over the same batches, top `--k` per token (OUT/cache/seed-S);
- the cached arm (OUT/cached/seed-S): the control and one student per `--student-k`, each
  distilling from the first k cached entries (`loss.teacher_top_k`, uniform tail), no teacher run.
The control never sees the teacher, so its result must equal the online arm's control.

Cost: the step time of the online arm's model set (frozen teacher forward + its students) vs the
same students from the cache, timed side by side on random batches in this process, and the
cache's one-off write time and size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from offline import pretrain_steps
from seeds import mean_curve, mean_std, relative_change, run_or_read, save_figure

from distill.config import load_config
from distill.experiment import resolve

ROOT = Path(__file__).resolve().parents[2]


def cached_students(cfg, ks: list[int]) -> list[dict]:
    """The config's control, and its distilled student once per k (named `k<k>`)."""
    control = next(s for s in cfg.to_dict()["students"] if s["control"])
    student = next(s for s in cfg.to_dict()["students"] if not s["control"])
    return [control] + [{**student, "name": f"k{k}", "loss": {**(student["loss"] or cfg.to_dict()["loss"]),
                                                                "teacher_top_k": k}} for k in ks]


def write_cache(config: str, overrides: list[str], out: Path, k: int) -> dict:
    """`distill cache` (a complete cache is read, not written again); returns its meta.json."""
    meta_file = out / "meta.json"
    if not (meta_file.is_file() and json.loads(meta_file.read_text())["complete"]):
        command = [sys.executable, "-m", "distill.cli", "cache", config, *overrides, "--k", str(k), "--out", str(out)]
        print("$", " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            raise SystemExit(f"failed: {' '.join(command)}")
    return json.loads(meta_file.read_text())


def step_seconds(online_cfg, cached_cfg, repeats: int = 12) -> tuple[float, float]:
    """Median seconds of one training step of each config, timed round-robin on random batches."""
    import jax

    from distill.setup import compiled_step, initial_state, random_batch

    steps = []
    for cfg in (online_cfg, cached_cfg):
        step, state, batch = compiled_step(cfg), initial_state(cfg), random_batch(cfg)
        state = jax.block_until_ready(step(state, batch)[0])  # warm-up
        steps.append([step, state, batch, []])
    for _ in range(repeats):
        for entry in steps:
            step, state, batch, times = entry
            start = time.perf_counter()
            entry[1] = jax.block_until_ready(step(state, batch)[0])
            times.append(time.perf_counter() - start)
    return tuple(statistics.median(entry[3]) for entry in steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default=str(ROOT / "experiments" / "quickstart.yaml"))
    parser.add_argument("--out", default="runs/offline", type=Path)
    parser.add_argument("--k", type=int, default=64, help="entries cached per token")
    parser.add_argument("--student-k", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="one cached student per k (each at most --k)")
    parser.add_argument("--plot", default=None, type=Path, metavar="PNG")
    args = parser.parse_args()
    if max(args.student_k) > args.k:
        parser.error(f"--student-k {max(args.student_k)}: larger than --k {args.k}")
    cfg = load_config(args.config)
    steps, warmup = cfg.train.steps, cfg.teacher_warmup()
    pretrain = pretrain_steps(steps, warmup)
    control = next(s.name for s in cfg.students if s.control)
    online_student = next(s.name for s in cfg.students if not s.control)
    students_json = json.dumps(cached_students(cfg, args.student_k))
    online, cached, metas = {}, {}, {}
    for seed in args.seeds:
        common = [f"train.seed={seed}", "teacher.warmup_fraction=null", "teacher.warmup_steps=0",
                  f"train.steps={steps - warmup}"]
        teacher_dir = args.out / "teacher" / f"seed-{seed}"
        run_or_read(args.config, [f"train.seed={seed}", "students=[]", f"train.steps={pretrain}",
                                  f"run.dir={teacher_dir}"])
        frozen = [*common, "teacher.source=run", f"teacher.path={teacher_dir}"]
        online[seed] = run_or_read(args.config, [*frozen, f"run.dir={args.out / 'offline' / f'seed-{seed}'}"])
        cache_dir = args.out / "cache" / f"seed-{seed}"
        metas[seed] = write_cache(args.config, frozen, cache_dir, args.k)
        cached[seed] = run_or_read(args.config, [*common, "teacher.source=cache", f"teacher.path={cache_dir}",
                                                 f"students={students_json}",
                                                 f"run.dir={args.out / 'cached' / f'seed-{seed}'}"])
    seeds = args.seeds
    names = [f"k{k}" for k in args.student_k]
    print("\nValidation bits per byte; online = full-vocabulary KD from the frozen teacher, k<k> = from the "
          "cache's top k (uniform tail):\n")
    print("| model | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    print("| teacher | " + " | ".join(f"{online[s]['bpb']['teacher']:.4f}" for s in seeds) + " |")
    print(f"| online {online_student} | " + " | ".join(f"{online[s]['bpb'][online_student]:.4f}" for s in seeds) + " |")
    for name in names:
        print(f"| cached {name} | " + " | ".join(f"{cached[s]['bpb'][name]:.4f}" for s in seeds) + " |")
    print(f"| {control} (online / cached) | " + " | ".join(
        f"{online[s]['bpb'][control]:.4f} / {cached[s]['bpb'][control]:.4f}" for s in seeds) + " |")

    print("\nDifferences, per seed and mean +- std (negative = lower bits per byte):\n")
    print("| comparison | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- std |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for name in names:
        for versus, label in ((online_student, "online KD"), (control, control)):
            changes = [relative_change(cached[s]["bpb"][name], online[s]["bpb"][versus]) for s in seeds]
            print(f"| cached {name} vs {label} | " + " | ".join(f"{c:+.2f}%" for c in changes)
                  + f" | {mean_std(changes)} |")
    changes = [relative_change(online[s]["bpb"][online_student], online[s]["bpb"][control]) for s in seeds]
    print(f"| online KD vs {control} | " + " | ".join(f"{c:+.2f}%" for c in changes) + f" | {mean_std(changes)} |")

    print("\nThe cache: mean teacher probability outside the top k (train split), one-off cost:\n")
    print("| seed | tail mass at k=" + f"{args.k} | write seconds | size (MB) |")
    print("|---|---|---|---|")
    for s in seeds:
        size = sum(p.stat().st_size for p in (args.out / "cache" / f"seed-{s}").glob("*.npy")) / 1e6
        print(f"| {s} | {metas[s]['stats']['train']['tail_mass_mean']:.5f} | {metas[s]['write_seconds']:.0f} | "
              f"{size:.0f} |")
    first = seeds[0]
    online_cfg = load_config(args.config, [f"train.seed={first}", "teacher.warmup_fraction=null",
                                           "teacher.warmup_steps=0", f"train.steps={steps - warmup}",
                                           "teacher.source=run", f"teacher.path={args.out / 'teacher' / f'seed-{first}'}"])
    same_students = json.dumps(cached_students(cfg, [args.k])).replace(f'"k{args.k}"', f'"{online_student}"')
    cached_cfg = load_config(args.config, [f"train.seed={first}", "teacher.warmup_fraction=null",
                                           "teacher.warmup_steps=0", f"train.steps={steps - warmup}",
                                           "teacher.source=cache", f"teacher.path={args.out / 'cache' / f'seed-{first}'}",
                                           f"students={same_students}"])
    online_s, cached_s = step_seconds(online_cfg, cached_cfg)
    teacher_flops, student_flops = resolve(online_cfg).forward_flops_per_step()
    print(f"\nStep time, the same two students ({online_student}, {control}), median of 12 side by side: online "
          f"(frozen teacher forward) {online_s * 1e3:.1f} ms, from the cache {cached_s * 1e3:.1f} ms: "
          f"{cached_s / online_s:.2f}x; FLOPs: {3 * sum(student_flops) / (teacher_flops + 3 * sum(student_flops)):.2f}x")
    print("Measured training seconds per seed (train_seconds, 2 students online vs "
          f"{len(names) + 1} from the cache): " + ", ".join(
              f"seed {s}: {online[s]['train_seconds']:.0f} vs {cached[s]['train_seconds']:.0f}" for s in seeds))
    if args.plot:
        print(f"\nplot: {plot(args, names, online_student, control)}")
    return 0


def plot(args, names: list[str], online_student: str, control: str) -> Path:
    """Validation curves (mean over seeds): online KD, each cached k, the control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7.5, 4.5))
    online_dirs = [args.out / "offline" / f"seed-{s}" for s in args.seeds]
    cached_dirs = [args.out / "cached" / f"seed-{s}" for s in args.seeds]
    lines = [(online_dirs, online_student, f"online KD ({online_student})", "-"),
             (online_dirs, control, control, "--")]
    lines += [(cached_dirs, name, f"cache, top {name[1:]}", "-.") for name in names]
    for dirs, model, label, style in lines:
        steps, values = mean_curve(dirs, f"eval/student/{model}/bpb")
        axis.plot(steps, values, style, marker="o", label=label)
    axis.set(xlabel="student step", ylabel="validation bits per byte",
             title=f"offline logit cache vs online KD, mean of {len(args.seeds)} seeds")
    axis.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, args.plot)


if __name__ == "__main__":
    sys.exit(main())
