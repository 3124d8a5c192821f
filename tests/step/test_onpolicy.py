"""On-policy distillation in the step: the rows the student writes, how the teacher scores them,
what the student trains on, and the config checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train_step import TINY, leaves, setup, step

import distill
from distill.errors import ConfigError

PROMPT = 8
GREEDY = {"students.0.loss": f"{{weighting: {{alpha: 1.0}}, on_policy: {{fraction: 0.5, prompt_tokens: {PROMPT}, "
                             "temperature: 0}}",
          "optim.warmup_steps": 0, "teacher.warmup_steps": 0}


def _greedy_rows(model, tokens: np.ndarray) -> np.ndarray:
    """Each row's first PROMPT tokens continued by the argmax of the full forward (no KV cache)."""
    rows, seq = tokens.shape
    out = jnp.zeros((rows, seq + 1), jnp.int32).at[:, :PROMPT].set(tokens[:, :PROMPT])
    forward = nnx.jit(lambda m, t: m(t).logits)  # causal: the zeros after t never matter
    for t in range(PROMPT, seq + 1):
        out = out.at[:, t].set(jnp.argmax(forward(model, out)[:, t - 1], axis=-1))
    return np.asarray(out)


TWO_MICRO_BATCHES = {"train.grad_accum": 2, "data.batch_size": 8}


def test_student_trains_on_its_own_greedy_rows_scored_by_the_teacher():
    """With temperature 0 and a = 1, the on-policy step equals a plain KD step on a batch whose
    first rows of every micro-batch are the student's greedy continuations (built here without the
    KV cache), masked to the written tokens; the logged teacher NLL of those tokens is the float64
    one. The two micro-batches' data rows hold different numbers of tokens (a masked stretch):
    accumulation weighs each by the tokens the student trains on in it, as the plain step does."""
    _, models, plan, state, batch = setup(**GREEDY, **TWO_MICRO_BATCHES)
    assert plan.students[0].on_policy_rows == 2 and plan.students[1].on_policy_rows == 0  # the control: none
    micro_batches, _, seq = batch["tokens"].shape
    batch = {k: np.array(v) for k, v in batch.items()}
    batch["mask"][-1, 2:, :-4] = 0  # 4 data tokens a row in the last micro-batch's data rows
    new_state, metrics = step(plan, state, {k: jnp.asarray(v) for k, v in batch.items()})

    mixed = {k: np.array(v) for k, v in batch.items()}
    written = [_greedy_rows(models.students[0], batch["tokens"][j, :2]) for j in range(micro_batches)]
    for j, rows in enumerate(written):
        mixed["tokens"][j, :2], mixed["labels"][j, :2] = rows[:, :-1], rows[:, 1:]
        mixed["mask"][j, :2] = (np.arange(seq) >= PROMPT - 1)[None]
        mixed["positions"][j, :2], mixed["segment_ids"][j, :2] = np.arange(seq)[None], 0
    _, _, plain_plan, plain_state, _ = setup(**{**GREEDY, **TWO_MICRO_BATCHES,
                                                "students.0.loss": "{weighting: {alpha: 1.0}}"})
    plain_state, plain = step(plain_plan, plain_state, {k: jnp.asarray(v) for k, v in mixed.items()})

    for key in ("loss", "grad_norm", "load_balance"):
        np.testing.assert_allclose(metrics[f"student/distilled/{key}"], plain[f"student/distilled/{key}"], rtol=1e-5)
    for a, b in zip(leaves(new_state.students[0].params), leaves(plain_state.students[0].params), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5)  # Adam's first update is ~lr * sign(g): 3e-3 where g ~ 0

    rows = np.concatenate(written)
    t_logits = np.asarray(models.teacher(jnp.asarray(rows[:, :-1])).logits, np.float64)[:, PROMPT - 1:]
    labels = rows[:, PROMPT:]
    log_z = np.log(np.exp(t_logits - t_logits.max(-1, keepdims=True)).sum(-1)) + t_logits.max(-1)
    nll = log_z - np.take_along_axis(t_logits, labels[..., None], -1)[..., 0]
    assert float(metrics["student/distilled/on_policy_teacher_nll"]) == pytest.approx(nll.mean(), rel=1e-5)


def test_the_teacher_trains_on_data_rows_only():
    """The co-trained teacher's update is the same with and without an on-policy student."""
    _, _, plan, state, batch = setup(**GREEDY)
    on_policy, _ = step(plan, state, batch)
    _, _, plain_plan, plain_state, _ = setup(**{**GREEDY, "students.0.loss": "{weighting: {alpha: 1.0}}"})
    plain, _ = step(plain_plan, plain_state, batch)
    for a, b in zip(leaves(on_policy.teacher.params), leaves(plain.teacher.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_samples_follow_the_seed_and_the_step():
    sampled = {**GREEDY, "students.0.loss": "{on_policy: {fraction: 1.0, prompt_tokens: 4}}"}
    _, _, plan, state, batch = setup(**sampled)
    _, m1 = step(plan, state, batch)
    _, m2 = step(plan, state, batch)
    np.testing.assert_array_equal(m1["student/distilled/on_policy_kd"], m2["student/distilled/on_policy_kd"])
    _, _, other_plan, other_state, _ = setup(**sampled, **{"train.seed": 1})
    _, m3 = step(other_plan, other_state.replace(students=state.students, teacher=state.teacher), batch)
    assert float(m3["student/distilled/on_policy_kd"]) != float(m1["student/distilled/on_policy_kd"])
    _, m4 = step(plan, state.replace(step=state.step + 1), batch)
    assert float(m4["student/distilled/on_policy_kd"]) != float(m1["student/distilled/on_policy_kd"])


@pytest.mark.parametrize("overrides, message", [
    ({"loss.on_policy": "{fraction: 0.5}", "loss.filter": "{score: teacher_loss}"}, "use one of them"),
    ({"students.0.loss": "{on_policy: {fraction: 0.1, prompt_tokens: 4}}"}, "rounds to 0 of a micro-batch's 4 rows"),
    ({"students.0.loss": "{on_policy: {fraction: 0.5, prompt_tokens: 4}}", "teacher.mutual_weight": 0.1}, "mutual_weight"),
    ({"students.0.loss": "{on_policy: {fraction: 0.5, prompt_tokens: 4}}",
      "students.0.model.vision": "{image_size: 8, patch_size: 2, num_channels: 1, hidden_size: 8, "
                                 "intermediate_size: 8, num_hidden_layers: 1, num_attention_heads: 2, "
                                 "vision_output_dim: 8}"}, "takes text prompts only"),
    ({"loss.on_policy": "{fraction: 1.5}"}, "must be in [0, 1]"),
    ({"loss.on_policy": "{temperature: -1}"}, "must be >= 0"),
])
def test_config_refuses_what_on_policy_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        distill.load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])


def test_a_control_student_ignores_the_run_level_on_policy_setting():
    cfg = distill.load_config(TINY, ["loss.on_policy={fraction: 0.5, prompt_tokens: 4}"])
    assert distill.resolve(cfg).students[1].loss.on_policy.active and cfg.students[1].control


SHARDED_RUN = """
import json, sys
import distill
from distill.run_logger import read_metrics_jsonl
run_dir, mesh = sys.argv[1], json.loads(sys.argv[2])
overrides = [f"run.dir={run_dir}", "train.steps=7", "train.eval_every=7", "train.checkpoint_every=7",
             "students.0.loss={weighting: {alpha: 0.5}, on_policy: {fraction: 0.5, prompt_tokens: 8}}"]
distill.run(distill.load_config(sys.argv[3], overrides + [f"mesh.{k}={v}" for k, v in mesh.items()]))
print(json.dumps([r for r in read_metrics_jsonl(run_dir) if "student/distilled/on_policy_kd" in r]))
"""


@pytest.mark.slow
def test_sampled_rows_and_losses_are_the_same_on_an_expert_parallel_mesh(tmp_path):
    """Temperature-1 sampling on data x fsdp x expert (8 simulated devices, 4 rows written per
    step: fewer decode tokens than expert shards) gives the 1-device run's losses (~2 min)."""
    config = Path(__file__).parents[1] / "configs" / "sharded.yaml"
    results = []
    for name, mesh, devices in [("one", {"data": 1}, 1), ("eight", {"data": 2, "fsdp": 2, "expert": 2}, 8)]:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        done = subprocess.run([sys.executable, "-c", SHARDED_RUN, str(tmp_path / name), json.dumps(mesh), str(config)],
                              capture_output=True, text=True, env=env, timeout=900, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    one, eight = results
    assert [r["step"] for r in one] == [5, 6, 7]  # the students train after the teacher's 4 warm-up steps
    for a, b in zip(one, eight, strict=True):
        for key in ("on_policy_kd", "on_policy_teacher_nll", "loss"):
            assert b[f"student/distilled/{key}"] == pytest.approx(a[f"student/distilled/{key}"], rel=1e-4)


def test_before_start_step_the_student_is_off_policy():
    """on_policy.start_step 2: at the student's step 0 its update is the off-policy student's,
    bit for bit; from step 2 on it writes rows."""
    later = {**GREEDY, "students.0.loss": "{weighting: {alpha: 0.5}, on_policy: {fraction: 0.5, prompt_tokens: 8, "
                                          "start_step: 2}}"}
    _, _, plan, state, batch = setup(**later)
    early, metrics = step(plan, state, batch)
    _, _, plain_plan, plain_state, _ = setup(**{**GREEDY, "students.0.loss": "{weighting: {alpha: 0.5}}"})
    plain, plain_metrics = step(plain_plan, plain_state, batch)
    assert float(metrics["student/distilled/on_policy_writing"]) == 0.0
    assert float(metrics["student/distilled/on_policy_kd"]) == 0.0
    np.testing.assert_allclose(metrics["student/distilled/loss"], plain_metrics["student/distilled/loss"], rtol=1e-6)
    for a, b in zip(leaves(early.students[0].params), leaves(plain.students[0].params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    _, writing = step(plan, state.replace(step=state.step + 2), batch)
    assert float(writing["student/distilled/on_policy_writing"]) == 1.0
    assert float(writing["student/distilled/on_policy_kd"]) > 0.0
