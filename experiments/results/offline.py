"""Result 4 of docs/results.md: co-distillation vs offline distillation at equal total compute.

    python experiments/results/offline.py --seeds 0 1 2 [--config experiments/quickstart.yaml]
        [--out runs/offline] [--codistill runs/quickstart] [--plot docs/figures/offline.png]

Per seed, three `distill run`s of the same config (a completed run of the same config is read,
not run again):
- co-distillation: the config as it is, in CODISTILL/seed-S. The teacher trains all `train.steps`
  S; the students join after its warm-up W and train S - W steps from its live forward.
- teacher pre-training: the config with `students=[]` for P steps, in OUT/teacher/seed-S.
- offline: the same students for the same S - W steps from that teacher, frozen
  (`teacher.source=run`), in OUT/offline/seed-S.

Equal compute: the students cost the same in both arms, so the teachers' costs are equated. A
training step costs 3 forwards (backward = 2), and the co-trained teacher's forward also serves
the students, so 3 F S = 3 F P + F (S - W), i.e. P = S - (S - W) / 3. FLOPs come from
`ModelConfig.forward_flops_per_token` (active parameters and attended keys).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seeds import mean_curve, mean_std, relative_change, run_or_read, save_figure

from distill.config import load_config
from distill.experiment import resolve
from distill.rundir import control_for

ROOT = Path(__file__).resolve().parents[2]


def pretrain_steps(steps: int, warmup: int) -> int:
    """P such that pre-training (3F each) plus the frozen teacher's forwards for the students
    (F each, steps - warmup of them) cost what co-training it for `steps` costs: 3F P + F (S - W) = 3F S."""
    return steps - round((steps - warmup) / 3)


def flops_at(cfg, arm: str, step: int, pretrain: int) -> float:
    """Training FLOPs an arm ("codistill", "offline", or its "teacher" pre-training) has spent at
    run step `step` (in the co-distillation arm the students train from the warm-up on)."""
    teacher, per_student = resolve(cfg).forward_flops_per_step()
    students = sum(per_student)
    if arm == "teacher":  # pre-training alone
        return 3 * teacher * step
    if arm == "codistill":
        return 3 * teacher * step + 3 * students * max(step - cfg.teacher_warmup(), 0)
    return 3 * teacher * pretrain + (teacher + 3 * students) * step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default=str(ROOT / "experiments" / "quickstart.yaml"))
    parser.add_argument("--out", default="runs/offline", type=Path)
    parser.add_argument("--codistill", default=None, type=Path,
                        help="the co-distillation runs (seed-S inside; default OUT/codistill), e.g. the "
                             "quickstart seeds of seeds.py")
    parser.add_argument("--plot", default=None, type=Path, metavar="PNG")
    args = parser.parse_args()
    cfg = load_config(args.config)
    steps, warmup = cfg.train.steps, cfg.teacher_warmup()
    if not cfg.teacher.trains or warmup == 0:
        parser.error(f"{args.config}: needs a co-trained teacher (source scratch) with a warm-up")
    controls = [s.name for s in cfg.students if s.control]
    students = [s.name for s in cfg.students if not s.control]
    pretrain = pretrain_steps(steps, warmup)
    codistill_dir = args.codistill or args.out / "codistill"
    print(f"co-distillation: teacher {steps} steps, students {steps - warmup} from step {warmup}; offline: teacher "
          f"pre-trained {pretrain} steps, then students {steps - warmup} steps from it frozen", flush=True)

    arms: dict[str, dict[int, dict]] = {"codistill": {}, "teacher": {}, "offline": {}}
    for seed in args.seeds:
        common = [f"train.seed={seed}"]
        arms["codistill"][seed] = run_or_read(args.config, [*common, f"run.dir={codistill_dir / f'seed-{seed}'}"])
        teacher_dir = args.out / "teacher" / f"seed-{seed}"
        arms["teacher"][seed] = run_or_read(args.config, [*common, "students=[]", f"train.steps={pretrain}",
                                                          f"run.dir={teacher_dir}"])
        arms["offline"][seed] = run_or_read(args.config, [
            *common, "teacher.source=run", f"teacher.path={teacher_dir}", "teacher.warmup_fraction=null",
            "teacher.warmup_steps=0", f"train.steps={steps - warmup}", f"run.dir={args.out / 'offline' / f'seed-{seed}'}"])

    seeds = args.seeds
    co, off, pre = arms["codistill"], arms["offline"], arms["teacher"]
    print("\nValidation bits per byte (co = co-distillation, off = offline):\n")
    print("| model | " + " | ".join(f"seed {s} co | seed {s} off" for s in seeds) + " |")
    print("|---|" + "---|---|" * len(seeds))
    print("| teacher | " + " | ".join(f"{co[s]['bpb']['teacher']:.4f} | {pre[s]['bpb']['teacher']:.4f}" for s in seeds)
          + " |")
    for model in [*students, *controls]:
        print(f"| {model} | " + " | ".join(f"{co[s]['bpb'][model]:.4f} | {off[s]['bpb'][model]:.4f}" for s in seeds)
              + " |")

    print("\nDifferences, per seed and mean +- std (negative = lower bits per byte):\n")
    print("| comparison | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- std |")
    print("|---|" + "---|" * (len(seeds) + 1))
    rows = {}
    for model in students:
        control = control_for(model, controls)
        rows[f"{model}: offline vs co-distillation"] = [relative_change(off[s]["bpb"][model], co[s]["bpb"][model])
                                                        for s in seeds]
        for arm, runs in (("co-distillation", co), ("offline", off)):
            rows[f"{model} vs {control}, {arm}"] = [relative_change(runs[s]["bpb"][model], runs[s]["bpb"][control])
                                                    for s in seeds]
    rows["teacher: pre-trained vs co-trained"] = [relative_change(pre[s]["bpb"]["teacher"], co[s]["bpb"]["teacher"])
                                                  for s in seeds]
    for name, changes in rows.items():
        print(f"| {name} | " + " | ".join(f"{c:+.2f}%" for c in changes) + f" | {mean_std(changes)} |")

    offline_cfg = load_config(args.config, [f"train.steps={steps - warmup}", "teacher.warmup_fraction=null",
                                            "teacher.warmup_steps=0"])
    co_flops = flops_at(cfg, "codistill", steps, pretrain)
    off_flops = flops_at(offline_cfg, "offline", steps - warmup, pretrain)
    print(f"\nTraining FLOPs per seed: co-distillation {co_flops:.4g}, offline {off_flops:.4g} "
          f"({relative_change(off_flops, co_flops):+.2f}%: P is rounded to a whole step)")
    print("Measured training seconds (train_seconds of the summaries), per seed: " + ", ".join(
        f"seed {s}: co {co[s].get('train_seconds', 0):.0f}, offline {pre[s].get('train_seconds', 0):.0f} + "
        f"{off[s].get('train_seconds', 0):.0f}" for s in seeds))
    if args.plot:
        print(f"\nplot: {plot(args, cfg, offline_cfg, codistill_dir, pretrain, students, controls)}")
    return 0


def plot(args, cfg, offline_cfg, codistill_dir: Path, pretrain: int, students: list[str], controls: list[str]) -> Path:
    """Validation bits per byte against the training FLOPs spent, both arms, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7.5, 4.5))
    arms = (("co-distillation", cfg, "codistill", codistill_dir / "seed-{}"),
            ("offline", offline_cfg, "offline", args.out / "offline" / "seed-{}"))
    for (label, arm_cfg, arm, pattern), color in zip(arms, ("tab:blue", "tab:orange")):
        run_dirs = [Path(str(pattern).format(s)) for s in args.seeds]
        for model in [*students, *controls, "teacher"]:
            tag = "eval/teacher/bpb" if model == "teacher" else f"eval/student/{model}/bpb"
            steps, values = mean_curve(run_dirs, tag)
            if model != "teacher" and arm == "codistill":  # before the warm-up ends the students are untrained
                steps, values = zip(*[(s, v) for s, v in zip(steps, values) if s > arm_cfg.teacher_warmup()])
            flops = [flops_at(arm_cfg, arm, s, pretrain) / 1e15 for s in steps]
            if model == "teacher" and arm == "offline":  # its pre-training, then frozen
                pre_steps, pre_values = mean_curve([args.out / "teacher" / f"seed-{s}" for s in args.seeds], tag)
                flops = [flops_at(cfg, "teacher", s, pretrain) / 1e15 for s in pre_steps] + flops
                values = [*pre_values, *values]
            style = {"teacher": ":", **{c: "--" for c in controls}}.get(model, "-")
            axis.plot(flops, values, style, marker="o", color=color, label=f"{label}: {model}")
    axis.set(xlabel="training FLOPs spent (PFLOP, teacher + students)", ylabel="validation bits per byte",
             title=f"co-distillation vs offline at equal compute, mean of {len(args.seeds)} seeds")
    axis.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, args.plot)


if __name__ == "__main__":
    sys.exit(main())
