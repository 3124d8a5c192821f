"""The scripts behind docs/results.md: seeds.py, offline.py, cache.py, onpolicy.py and metap.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import distill

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
sys.path.insert(0, str(ROOT / "experiments" / "results"))

import offline  # noqa: E402


def test_offline_pretraining_costs_what_co_training_the_teacher_costs():
    cfg = distill.load_config(ROOT / "experiments" / "quickstart.yaml")
    steps, warmup = cfg.train.steps, cfg.teacher_warmup()
    pretrain = offline.pretrain_steps(steps, warmup)
    assert pretrain == 617  # 800 - 550 / 3
    offline_cfg = distill.load_config(ROOT / "experiments" / "quickstart.yaml",
                                      [f"train.steps={steps - warmup}", "teacher.warmup_steps=0",
                                       "teacher.warmup_fraction=null"])
    co = offline.flops_at(cfg, "codistill", steps, pretrain)
    off = offline.flops_at(offline_cfg, "offline", steps - warmup, pretrain)
    # Independently: 6 N D for the trained models, 2 N D for the frozen teacher's forward, with
    # N the forward FLOPs per token / 2 and D the tokens.
    tokens = cfg.data.batch_size * cfg.data.seq_len
    exp = distill.resolve(cfg)
    t = exp.teacher.model.forward_flops_per_token(cfg.data.seq_len) / 2
    s = sum(exp.students[i].model.forward_flops_per_token(cfg.data.seq_len) / 2 for i in range(2))
    assert co == pytest.approx(6 * t * tokens * steps + 6 * s * tokens * (steps - warmup), rel=1e-12)
    assert off == pytest.approx(6 * t * tokens * pretrain + (2 * t + 6 * s) * tokens * (steps - warmup), rel=1e-12)
    assert abs(off - co) <= 6 * t * tokens  # equal up to the rounding of P to a whole step


@pytest.mark.slow
def test_offline_script_runs_both_arms_and_plots(tmp_path):
    out = tmp_path / "offline"
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "results" / "offline.py"), "--config", str(TINY),
                             "--seeds", "0", "--out", str(out), "--plot", str(tmp_path / "offline.png")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distilled: offline vs co-distillation" in result.stdout and (tmp_path / "offline.png").stat().st_size
    teacher = distill.load_config(out / "teacher" / "seed-0" / "config.yaml")
    assert teacher.students == () and teacher.train.steps == offline.pretrain_steps(10, 2)
    frozen = distill.load_config(out / "offline" / "seed-0" / "config.yaml")
    assert frozen.teacher.source == "run" and not frozen.teacher.trains and frozen.train.steps == 8


@pytest.mark.slow
def test_seeds_script_tables_and_plot(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "results" / "seeds.py"), "--config", str(TINY),
                             "--seeds", "0", "1", "--out", str(tmp_path / "runs"), "--plot", str(tmp_path / "seeds.png")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| distilled | control |"))
    summaries = [distill.load_config(tmp_path / "runs" / f"seed-{s}" / "config.yaml") for s in (0, 1)]
    assert [c.train.seed for c in summaries] == [0, 1]
    assert row.count("%") == 4 and "+-" in row  # two seeds, then mean% +- std% and (tmp_path / "seeds.png").stat().st_size


@pytest.mark.slow
def test_cache_script_compares_cached_students_with_online_kd(tmp_path):
    out = tmp_path / "runs"
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "results" / "cache.py"), "--config", str(TINY),
                             "--seeds", "0", "--out", str(out), "--k", "8", "--student-k", "1", "8", "--plot",
                             str(tmp_path / "cache.png")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| cached k8 vs online KD |" in result.stdout and (tmp_path / "cache.png").stat().st_size
    cached = distill.load_config(out / "cached" / "seed-0" / "config.yaml")
    assert cached.teacher.source == "cache" and [s.name for s in cached.students] == ["control", "k1", "k8"]
    assert [distill.resolve(cached).students[i].loss.teacher_top_k for i in (1, 2)] == [1, 8]
    # the control never sees the teacher: the cached run's control is the online run's
    row = next(line for line in result.stdout.splitlines() if line.startswith("| control (online / cached) |"))
    online, from_cache = row.split("|")[2].split("/")
    assert online.strip() == from_cache.strip()


def test_onpolicy_script_has_the_teacher_judge_each_students_continuations(tmp_path):
    """On a tiny run with an on-policy student: the table has every model, and the teacher's bits
    per token of a sequence are the float64 ones."""
    import jax.numpy as jnp
    import numpy as np

    import onpolicy
    from distill.runs import load_models

    run_dir = tmp_path / "run"
    distill.run(distill.load_config(TINY, [f"run.dir={run_dir}",
                                           "students.0.loss={on_policy: {fraction: 0.5, prompt_tokens: 8}}"]))
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "results" / "onpolicy.py"), str(run_dir),
                             "--rows", "2", "--prompt-tokens", "8", "--new-tokens", "8", "--plot",
                             str(tmp_path / "onpolicy.png")], capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for model in ("teacher", "distilled", "control"):
        assert any(line.split("|")[0].strip() == model for line in result.stdout.splitlines())
    assert (tmp_path / "onpolicy.png").stat().st_size

    _, _, teacher, _ = load_models(run_dir)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 16))
    logits = np.asarray(teacher(jnp.asarray(tokens[:, :-1])).logits, np.float64)[:, 7:]
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, tokens[:, 8:, None], -1)[..., 0]
    assert float(onpolicy.teacher_bits(teacher, jnp.asarray(tokens), 8)) == pytest.approx(nll.mean() / np.log(2),
                                                                                       rel=1e-5)


@pytest.mark.slow
def test_metap_script_tables_every_seed_and_plots(tmp_path):
    """Two widths, two learning rates, two seeds, a few steps: the mean +- std table, the best learning
    rate of each seed from the grid, and the figure. At the base width MetaP is the standard model,
    so their rows are equal."""
    lrs = ["0.001", "0.01"]
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "results" / "metap.py"), "--widths", "1", "2",
                             "--base-width", "32", "--lrs", *lrs, "--steps", "3", "--seq-len", "32", "--batch-size",
                             "2", "--seeds", "0", "1", "--eval-batches", "1", "--plot", str(tmp_path / "metap.png")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [(tuple(cell.strip() for cell in line.split("|")[1:3]), [cell.strip() for cell in line.split("|")[3:-1]])
            for line in result.stdout.splitlines() if line.startswith(("| standard |", "| metap |"))]
    means = {key: cells for key, cells in rows if "+-" in cells[0]}
    per_seed = {key: cells for key, cells in rows if "+-" not in cells[0]}
    assert set(means) == set(per_seed) == {(p, w) for p in ("standard", "metap") for w in ("x1", "x2")}
    assert means["standard", "x1"] == means["metap", "x1"]
    for key, cells in means.items():
        values = [float(cell.split("+-")[0]) for cell in cells[:-1]]
        assert cells[-1] == lrs[values.index(min(values))], (key, cells)
    assert all(len(cells) == 2 and set(cells) <= {"0.001", "0.01"} for cells in per_seed.values())
    assert (tmp_path / "metap.png").read_bytes().startswith(b"\x89PNG")
