"""An image-and-text co-distillation run end to end: the digits source, vision models, micro-batches,
evaluation, and the digit-name scoring and figure of experiments/results/digits.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import distill
from distill.runs import load_models

ROOT = Path(__file__).resolve().parents[2]
TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"
VISION = ("{image_size: 8, patch_size: 2, num_channels: 1, hidden_size: 16, intermediate_size: 16, "
          "num_hidden_layers: 1, num_attention_heads: 2, vision_output_dim: 16}")
sys.path.insert(0, str(ROOT / "experiments" / "results"))

import digits  # noqa: E402


def test_a_digits_run_trains_on_images_and_is_scored(tmp_path):
    run_dir = tmp_path / "run"
    cfg = distill.load_config(TINY, [
        f"run.dir={run_dir}", "data.source=digits", "data.seq_len=36", "data.batch_size=8", "data.max_bytes=null",
        "train.grad_accum=2", "train.steps=4", "train.eval_every=4", "train.eval_batches=2",
        f"teacher.model.vision={VISION}", f"students.0.model.vision={VISION}", f"students.1.model.vision={VISION}"])
    summary = distill.run(cfg)
    assert summary["status"] == "completed" and all(np.isfinite(v) for v in summary["bpb"].values())
    _, _, teacher, students = load_models(run_dir)
    assert teacher.vision is not None and all(s.vision is not None for s in students.values())
    scores = digits.score_run(run_dir)
    assert set(scores) == {"teacher", "distilled", "control"}
    for s in scores.values():
        assert 0 <= s["accuracy"] <= 1 and s["name_bits"] > 0
    figure = digits.plot([run_dir], {0: scores}, tmp_path / "figures" / "digits.png")
    assert figure.read_bytes().startswith(b"\x89PNG")
