"""The offline logit cache: what `distill cache` writes (against a float64 numpy reference), that
students trained from it equal students trained online from the same frozen teacher, resume of an
interrupted write, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import distill
from distill.data import build_data
from distill.errors import ConfigError
from distill.runs import load_models
from distill.setup import compiled_step, initial_state, random_batch
from distill.trainer import run
from teacher import cache_writer as cache_module
from teacher.cache import TeacherCache, read_meta
from teacher.cache_writer import write_cache

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"
K = 16


def tiny(**overrides):
    return distill.load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])


def from_teacher(teacher_dir: Path, **overrides):
    """The tiny run with the trained teacher frozen (online) or a cache in its place."""
    return tiny(**{"teacher.source": "run", "teacher.path": teacher_dir, "teacher.warmup_steps": 0, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(teacher run dir, cache dir of its top K): a tiny teacher trained alone, then cached."""
    root = tmp_path_factory.mktemp("cache")
    run(tiny(**{"run.dir": root / "teacher", "students": "[]", "teacher.warmup_steps": 0}))
    write_cache(from_teacher(root / "teacher"), root / "cache", K, progress=False)
    return root / "teacher", root / "cache"


def reference_entries(teacher, batch: dict) -> dict:
    logits = np.asarray(teacher(batch["tokens"], positions=batch["positions"],
                                segment_ids=batch["segment_ids"]).logits, np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    order = np.argsort(-log_probs, axis=-1, kind="stable")[..., :K]
    top = np.take_along_axis(log_probs, order, -1)
    return {"log_probs": top, "indices": order, "tail_mass": 1 - np.exp(top).sum(-1),
            "label_log_prob": np.take_along_axis(log_probs, batch["labels"][..., None], -1)[..., 0]}


def test_cache_holds_the_teachers_top_k_of_every_batch(trained):
    teacher_dir, cache_dir = trained
    cfg = from_teacher(teacher_dir)
    _, _, teacher, _ = load_models(teacher_dir)
    meta = read_meta(cache_dir)
    data = build_data(cfg.data, seed=cfg.train.seed)
    assert meta["complete"] and meta["k"] == K and meta["steps"] == cfg.train.steps
    assert meta["eval_batches"] == len(data.validation_batches(cfg.train.eval_batches)) >= 1
    iterator = data.train_iterator()
    batches = [("train", i, next(iterator)) for i in range(cfg.train.steps)]
    batches += [("eval", i, b) for i, b in enumerate(data.validation_batches(cfg.train.eval_batches))]
    ce = {"train": [], "eval": []}
    for split, i, batch in batches:
        stored = {name: np.load(cache_dir / f"{split}.{name}.npy", mmap_mode="r")[i]
                  for name in ("indices", "log_probs", "label_log_prob", "tail_mass", "tokens", "mask")}
        np.testing.assert_array_equal(stored["tokens"], batch["tokens"])
        np.testing.assert_array_equal(stored["mask"], batch["mask"] > 0)
        expected = reference_entries(teacher, batch)
        np.testing.assert_allclose(stored["log_probs"], expected["log_probs"], atol=2e-5)
        np.testing.assert_allclose(stored["label_log_prob"], expected["label_log_prob"], atol=2e-5)
        np.testing.assert_allclose(stored["tail_mass"], expected["tail_mass"], atol=2e-5)
        # the columns too, except where two entries are closer than float32 can tell apart
        gaps = np.diff(expected["log_probs"], axis=-1)
        clear = np.all(np.abs(gaps) > 1e-5, axis=-1)
        np.testing.assert_array_equal(stored["indices"][clear], expected["indices"][clear])
        assert clear.mean() > 0.5
        ce[split].append(-expected["label_log_prob"][batch["mask"] > 0])
    for split, values in ce.items():
        assert meta["stats"][split]["teacher_ce_nats"] == pytest.approx(np.concatenate(values).mean(), abs=1e-4)


def test_students_from_the_cache_equal_students_distilled_online_from_the_frozen_teacher(trained, tmp_path):
    teacher_dir, cache_dir = trained
    def students(all_k: int | None) -> str:  # "all": the whole cache (k = K), online the live top-K
        model = tiny().students[0].model
        return json.dumps([{"name": "top8", "preset": None, "model": model, "loss": {"teacher_top_k": 8}},
                           {"name": "all", "preset": None, "model": model, "loss": {"teacher_top_k": all_k}}])

    online = run(from_teacher(teacher_dir, **{"run.dir": tmp_path / "online", "students": students(K)}))
    cached = run(tiny(**{"run.dir": tmp_path / "cached", "teacher.source": "cache", "teacher.path": cache_dir,
                         "teacher.warmup_steps": 0, "students": students(None)}))
    for name in ("top8", "all", "teacher"):
        assert cached["bpb"][name] == pytest.approx(online["bpb"][name], rel=1e-5)
    assert cached["final"]["eval/student/top8/top1_agreement"] == online["final"]["eval/student/top8/top1_agreement"]
    _, _, teacher, trained_online = load_models(tmp_path / "online")
    _, _, no_teacher, trained_cached = load_models(tmp_path / "cached")
    assert no_teacher is None and teacher is not None
    for name in ("top8", "all"):
        for a, b in zip(jax.tree.leaves(nnx.state(trained_online[name], nnx.Param)),
                        jax.tree.leaves(nnx.state(trained_cached[name], nnx.Param))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    # the run holds no teacher: `distill eval` reads the cache's validation entries, export refuses the teacher
    result = subprocess.run([sys.executable, "-m", "distill.cli", "eval", str(tmp_path / "cached")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["eval/teacher/bpb"] == pytest.approx(online["bpb"]["teacher"], rel=1e-5)
    result = subprocess.run([sys.executable, "-m", "distill.cli", "export", str(tmp_path / "cached"), "--model",
                             "teacher", "--hf", str(tmp_path / "hf")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "holds no teacher" in result.stderr and not (tmp_path / "hf").exists()


def test_an_interrupted_write_resumes_to_the_same_cache(trained, tmp_path, monkeypatch):
    teacher_dir, whole = trained
    cfg = from_teacher(teacher_dir)
    original = cache_module.write_json_atomically
    calls = []

    def interrupt_after_six_saves(path, value):
        original(path, value)
        calls.append(path)
        if len(calls) == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "SAVE_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(cache_module, "write_json_atomically", interrupt_after_six_saves)
    with pytest.raises(KeyboardInterrupt):
        write_cache(cfg, tmp_path / "cache", K, progress=False)
    partial = read_meta(tmp_path / "cache")
    assert not partial["complete"] and partial["written"] == {"train": 5, "eval": 0}
    with pytest.raises(ConfigError, match="incomplete .* run the same `distill cache` command again"):
        TeacherCache(tmp_path / "cache")
    monkeypatch.setattr(cache_module, "write_json_atomically", original)
    write_cache(cfg, tmp_path / "cache", K, progress=False)
    for path in whole.glob("*.npy"):
        np.testing.assert_array_equal(np.load(path), np.load(tmp_path / "cache" / path.name))


def test_refusals_name_the_field_and_change_nothing(trained, tmp_path, digests):
    teacher_dir, cache_dir = trained
    before = digests(cache_dir)
    with pytest.raises(ConfigError, match=r"holds a cache of another configuration \(differs in: k\)"):
        write_cache(from_teacher(teacher_dir), cache_dir, K // 2, progress=False)
    with pytest.raises(ConfigError, match="differs in: seed"):
        write_cache(from_teacher(teacher_dir, **{"train.seed": 5}), cache_dir, K, progress=False)
    assert digests(cache_dir) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a teacher cache"):
        write_cache(from_teacher(teacher_dir), tmp_path / "other", K, progress=False)
    with pytest.raises(ConfigError, match="teacher.source='scratch': a cache is written from a trained teacher"):
        write_cache(tiny(), tmp_path / "new", K, progress=False)
    with pytest.raises(ConfigError, match=r"--k 300: must be in \[1, 256\]"):
        write_cache(from_teacher(teacher_dir), tmp_path / "new", 300, progress=False)
    assert not (tmp_path / "new").exists()

    cached = {"teacher.source": "cache", "teacher.path": cache_dir, "teacher.warmup_steps": 0,
              "run.dir": tmp_path / "run"}
    for overrides, message in [({"train.seed": 3}, r"differs in: train.seed\)"),
                               ({"data.seq_len": 16}, r"differs in: data.seq_len\)"),
                               ({"train.steps": 11}, r"train.steps=11: the cache holds 10 steps"),
                               ({"loss.teacher_top_k": K + 1}, rf"teacher_top_k={K + 1}: the cache holds the top {K}"),
                               ({"loss.router_kd_weight": 0.1}, "a cached teacher has no router logits")]:
        with pytest.raises(ConfigError, match=message):
            run(tiny(**cached, **overrides))
        assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="a cached teacher cannot score the student's samples"):
        tiny(**cached, **{"students.0.loss": "{on_policy: {fraction: 0.5, prompt_tokens: 4}}"})
    with pytest.raises(ConfigError, match="teacher.trainable=True: a cached teacher does not run or train"):
        tiny(**cached, **{"teacher.trainable": True})
    with pytest.raises(ConfigError, match="teacher.warmup_steps=2: a cached teacher"):
        tiny(**{**cached, "teacher.warmup_steps": 2})
    with pytest.raises(ConfigError, match="no meta.json; expected a teacher cache"):
        tiny(**{**cached, "teacher.path": tmp_path})


def test_cached_teacher_costs_no_flops_and_its_step_compiles_from_shapes(trained):
    _, cache_dir = trained
    cfg = tiny(**{"teacher.source": "cache", "teacher.path": cache_dir, "teacher.warmup_steps": 0})
    teacher_flops, student_flops = distill.resolve(cfg).forward_flops_per_step()
    assert teacher_flops == 0 and all(f > 0 for f in student_flops)
    step = compiled_step(cfg)
    _, metrics = step(initial_state(cfg), random_batch(cfg))
    assert "teacher/expert_load" not in metrics
    for name in ("teacher/ce", "student/distilled/kd", "student/control/kd", "student/distilled/loss"):
        assert np.isfinite(float(metrics[name])) and float(metrics[name]) > 0, name


def test_a_sharded_run_reads_the_cache_like_one_device(trained, tmp_path):
    """8 simulated devices (data 2 x fsdp 2 x tensor 2): the batch's top-k arrays split by rows."""
    _, cache_dir = trained
    overrides = {"teacher.source": "cache", "teacher.path": cache_dir, "teacher.warmup_steps": 0}
    one = run(tiny(**overrides, **{"run.dir": tmp_path / "one"}))
    mesh_overrides = [f"{k}={v}" for k, v in overrides.items()]
    mesh_overrides += [f"run.dir={tmp_path / 'mesh'}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                       "mesh.rules={kv_heads: null}"]  # the tiny model has one KV head
    script = (f"import json, distill; s = distill.run(distill.load_config({str(TINY)!r}, {mesh_overrides!r})); "
              "print(json.dumps(s['bpb']))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                                 "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(result.stdout.strip().splitlines()[-1])
    for name, value in one["bpb"].items():
        assert sharded[name] == pytest.approx(value, rel=1e-4), name
