"""`distill bench NAME`: runs experiments/bench/NAME.py with its arguments."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from distill import cli


def test_unknown_benchmark_lists_the_known_ones(capsys):
    assert cli.main(["bench", "nonsense"]) == 2
    message = capsys.readouterr().err
    assert "no benchmark 'nonsense'" in message and "step" in message and "model" in message
    assert "_common" not in message
    assert cli.main(["bench", "_common"]) == 2


def test_step_benchmark_prints_the_roofline_table():
    result = subprocess.run([sys.executable, "-m", "distill.cli", "bench", "step", "--quick", "--sections", "roofline"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rates = re.findall(r"\|\s+(float32|bfloat16) \| 1024 x 1024 x 1024 \|\s+\d+ \|\s+([\d,.]+) \|", result.stdout)
    assert [dtype for dtype, _ in rates] == ["float32", "bfloat16"]
    assert all(float(rate.replace(",", "")) > 0 for _, rate in rates)


def test_breakdown_attributes_the_step_to_parts_of_the_model():
    """`distill bench breakdown` traces a small co-distillation step and attributes XLA's op time to
    the model's parts through the HLO's stack frames: the attention and the routed experts appear
    with forward and backward time, and the parts add up to the busy time it prints."""
    overrides = ["teacher.model={hidden_size: 64, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 2}",
                 "students.0.preset=cpu-student-tiny", "students.1.preset=cpu-student-tiny", "data.batch_size=4",
                 "data.seq_len=64"]
    result = subprocess.run([sys.executable, "-m", "distill.cli", "bench", "breakdown", *overrides, "--steps", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    busy = float(re.search(r"XLA ops busy (\d+) ms", result.stdout).group(1))
    parts = {m.group(1).strip(): [float(x) for x in m.groups()[1:]] for m in re.finditer(
        r"^\|\s+([^|]+?) \|\s+([\d.]+) \|\s+([\d.]+) \|\s+([\d.]+) \|\s+[\d.]+% \|$", result.stdout, re.M)}
    for part in ("attention: logits, softmax, values", "MoE: routed experts", "SwiGLU: shared expert, dense MLP"):
        total, forward, backward = parts[part]
        assert forward > 0 and backward > 0 and abs(total - forward - backward) < 0.2, (part, parts[part])
    assert abs(sum(total for total, _, _ in parts.values()) - busy) <= 1 + 0.01 * busy


def test_no_benchmark_shadows_a_standard_library_module():
    """The scripts run with experiments/bench first on sys.path: a `profile.py` there broke
    `import cProfile` inside torch for every other benchmark."""
    names = {path.stem for path in cli.BENCH_DIR.glob("*.py")}
    assert names and not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)


@pytest.mark.slow
def test_teacher_load_benchmark_tables_both_ways_of_reading_a_teacher(tmp_path):
    """On a tiny finished run: the floor, the whole checkpoint and the teacher alone, each timed."""
    import distill

    run_dir = tmp_path / "run"
    distill.run(distill.load_config(Path(__file__).parent / "configs" / "tiny.yaml",
                                    [f"run.dir={run_dir}", "train.steps=2", "teacher.warmup_steps=0"]))
    result = subprocess.run([sys.executable, "-m", "distill.cli", "bench", "teacher_load", str(run_dir), "--repeats",
                             "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = dict(re.findall(r"^\|\s+(imports|whole checkpoint|teacher only) \|\s+([-\d.]+) \|", result.stdout, re.M))
    assert rows["imports"] == "-" and float(rows["whole checkpoint"]) > 0 and float(rows["teacher only"]) > 0, rows
    bad = subprocess.run([sys.executable, "-m", "distill.cli", "bench", "teacher_load", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "no checkpoints/ directory" in bad.stderr


@pytest.mark.slow
def test_fused_head_benchmark_measures_both_paths_and_finds_the_largest_sizes():
    """`distill bench fused_head` at a tiny size: each path's XLA estimate, peak RSS and time, the
    fused one with the smaller estimate; --fits bisects compiled programs against a budget."""
    sizes = ["--tokens", "256", "--vocabs", "4096", "--hiddens", "32", "--repeats", "1"]
    result = subprocess.run([sys.executable, "-m", "distill.cli", "bench", "fused_head", *sizes],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {m.group(1): [float(x) for x in m.groups()[1:]] for m in re.finditer(
        r"^\| 4,096 \| 32 \| (unfused|fused) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
        result.stdout, re.M)}
    assert rows.keys() == {"unfused", "fused"}, result.stdout
    assert rows["fused"][1] < rows["unfused"][1]  # XLA's estimate: no [tokens, vocab] logits
    assert all(peak > 0 and seconds > 0 for _, _, peak, seconds, _ in rows.values())
    fits = subprocess.run([sys.executable, "-m", "distill.cli", "bench", "fused_head", "--fits", "--budget-gib",
                           "0.25", *sizes], capture_output=True, text=True, timeout=600)
    assert fits.returncode == 0, fits.stderr[-2000:]
    largest = dict(re.findall(r"^\| 32 \| (unfused|fused) \| ([\d,]+|none) \|", fits.stdout, re.M))
    assert int(largest["fused"].replace(",", "")) > int(largest["unfused"].replace(",", "")), fits.stdout
