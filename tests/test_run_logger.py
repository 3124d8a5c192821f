"""Tests for distill.run_logger: metrics.jsonl + TensorBoard event files in the run directory."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from distill.run_logger import (
    METRICS_FILE,
    RunLogger,
    load_event_accumulator,
    read_metrics_jsonl,
    read_scalars,
)


def _strict_json(line: str) -> dict:
    def reject(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(line, parse_constant=reject)


def _event_files(run_dir) -> list[str]:
    return sorted(n for n in os.listdir(run_dir) if "tfevents" in n)


def _hparams_content(run_dir):
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = load_event_accumulator(run_dir).PluginTagToContent("hparams")
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}


def _train_metrics(step: int, scale: float = 1.0) -> dict[str, float]:
    return {
        "teacher/ce": scale * 3.0 / step,
        "student/distilled/kd": scale * 0.5 + step,
        "student/distilled/alpha": 0.25,
    }


# ---- jsonl + scalars ----------------------------------------------------------------------


def test_jsonl_lines_are_json_with_step_and_tags(tmp_path):
    import jax.numpy as jnp

    with RunLogger(tmp_path, hparams={"lr": 1e-3}) as logger:
        for step in range(1, 4):
            logger.log(step, {
                "teacher/ce": 1.5 / step,
                "student/distilled/kd": np.float32(0.25 * step),
                "student/distilled/loss": jnp.asarray(2.0 * step, dtype=jnp.float32),
                "student/distilled/tokens": np.int64(128 * step),
            })
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 3
    for step, line in enumerate(lines, start=1):
        record = _strict_json(line)
        assert record["step"] == step
        assert record["teacher/ce"] == pytest.approx(1.5 / step)
        assert record["student/distilled/kd"] == pytest.approx(0.25 * step)
        assert record["student/distilled/loss"] == pytest.approx(2.0 * step)
        assert record["student/distilled/tokens"] == 128 * step
        assert isinstance(record["student/distilled/tokens"], int)
    assert read_metrics_jsonl(tmp_path) == [_strict_json(line) for line in lines]


def test_scalars_read_back_equal_logged_values_and_steps(tmp_path):
    logged = {}
    with RunLogger(tmp_path, hparams={}) as logger:
        for step in (0, 1, 2, 5, 10, 100):
            metrics = _train_metrics(step + 1)
            logger.log(step, metrics)
            for tag, value in metrics.items():
                logged.setdefault(tag, []).append((step, value))
        logger.log(100, {"eval/student/distilled/bpb": 1.234})
        logged["eval/student/distilled/bpb"] = [(100, 1.234)]
    scalars = read_scalars(tmp_path)
    assert set(scalars) == set(logged)
    for tag, points in logged.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
        # TensorBoard stores scalars as float32
        np.testing.assert_allclose([v for _, v in scalars[tag]], [v for _, v in points],
                                   rtol=1e-6, err_msg=tag)


def test_rejects_non_scalars_and_reserved_step(tmp_path):
    with RunLogger(tmp_path, hparams={}) as logger:
        with pytest.raises(ValueError, match="teacher/ce"):
            logger.log(1, {"teacher/ce": np.ones(3)})
        with pytest.raises(ValueError, match="step"):
            logger.log(1, {"step": 1.0})
        with pytest.raises(TypeError):
            logger.log(1.5, {"teacher/ce": 1.0})


def test_nan_and_inf_are_strings_in_jsonl_and_floats_when_read(tmp_path):
    with RunLogger(tmp_path, hparams={}) as logger:
        logger.log(1, {"a": float("nan"), "b": np.float32("inf"), "c": -math.inf, "d": 1.0})
    (line,) = (tmp_path / METRICS_FILE).read_text().splitlines()
    record = _strict_json(line)  # valid, strict JSON
    assert record == {"step": 1, "a": "NaN", "b": "Infinity", "c": "-Infinity", "d": 1.0}
    (read,) = read_metrics_jsonl(tmp_path)
    assert math.isnan(read["a"]) and read["b"] == math.inf and read["c"] == -math.inf
    scalars = read_scalars(tmp_path)
    assert math.isnan(scalars["a"][0][1]) and scalars["b"] == [(1, math.inf)]


# ---- histograms and text ------------------------------------------------------------------


def test_histogram_is_readable(tmp_path):
    load = np.array([0.1, 0.3, 0.2, 0.4, 0.0, 0.5, 0.25, 0.25])
    with RunLogger(tmp_path, hparams={}) as logger:
        logger.log_histogram(3, "teacher/expert_load/layer_0", load)
        logger.log_histogram(4, "teacher/expert_load/layer_0", np.array([1.0, np.nan, 2.0]))
    acc = load_event_accumulator(tmp_path)
    assert acc.Tags()["histograms"] == ["teacher/expert_load/layer_0"]
    first, second = acc.Histograms("teacher/expert_load/layer_0")
    assert first.step == 3
    assert first.histogram_value.num == load.size
    assert first.histogram_value.min == pytest.approx(load.min())
    assert first.histogram_value.max == pytest.approx(load.max())
    assert first.histogram_value.sum == pytest.approx(load.sum())
    assert sum(first.histogram_value.bucket) == load.size
    assert (second.step, second.histogram_value.num) == (4, 2)  # the NaN is left out
    assert read_metrics_jsonl(tmp_path) == []  # histograms are TensorBoard-only


def test_text_is_readable_under_its_exact_tag(tmp_path):
    config = "train:\n  steps: 10\n"
    with RunLogger(tmp_path, hparams={}) as logger:
        logger.log_text(0, "config", config, preformatted=True)
        logger.log_text(0, "notes", "*hello*")
    acc = load_event_accumulator(tmp_path)
    assert set(acc.PluginTagToContent("text")) == {"config", "notes"}
    (event,) = acc.Tensors("config")
    text = event.tensor_proto.string_val[0].decode()
    assert text == "```\n" + config + "\n```"
    assert acc.Tensors("notes")[0].tensor_proto.string_val[0].decode() == "*hello*"


# ---- hparams ------------------------------------------------------------------------------


def test_hparams_in_the_run_dir_itself(tmp_path):
    from tensorboard.plugins.hparams import api_pb2, metadata

    hparams = {"optim.lr": 3e-4, "train.steps": 10, "student.name": "distilled",
               "mesh.enabled": False, "data.path": None, "loss.layers": [1, 2]}
    with RunLogger(tmp_path, hparams=hparams) as logger:
        for step in range(1, 4):
            logger.log(step, _train_metrics(step))
        logger.log(3, {"eval/student/distilled/bpb": 1.5})
        logger.finish({"eval/student/distilled/bpb": 1.5, "eval/teacher/bpb": 1.25,
                       "teacher/ce": 3.0 / 3})

    # exactly one event file, directly in the run dir; no sub-run directories
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []
    assert len(_event_files(tmp_path)) == 1

    content = _hparams_content(tmp_path)
    assert set(content) == {metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG,
                            metadata.SESSION_END_INFO_TAG}
    ssi = content[metadata.SESSION_START_INFO_TAG].session_start_info
    assert ssi.hparams["optim.lr"].number_value == pytest.approx(3e-4)
    assert ssi.hparams["train.steps"].number_value == 10
    assert ssi.hparams["student.name"].string_value == "distilled"
    assert ssi.hparams["mesh.enabled"].WhichOneof("kind") == "bool_value"
    assert ssi.hparams["mesh.enabled"].bool_value is False
    assert ssi.hparams["data.path"].string_value == "None"
    assert ssi.hparams["loss.layers"].string_value == "[1, 2]"

    experiment = content[metadata.EXPERIMENT_TAG].experiment
    assert {h.name for h in experiment.hparam_infos} == set(hparams)
    types = {h.name: api_pb2.DataType.Name(h.type) for h in experiment.hparam_infos}
    assert types["mesh.enabled"] == "DATA_TYPE_BOOL"
    assert types["optim.lr"] == "DATA_TYPE_FLOAT64"
    assert types["student.name"] == "DATA_TYPE_STRING"
    assert [(m.name.group, m.name.tag) for m in experiment.metric_infos] == [
        ("", "eval/student/distilled/bpb"), ("", "eval/teacher/bpb"), ("", "teacher/ce")]
    sei = content[metadata.SESSION_END_INFO_TAG].session_end_info
    assert api_pb2.Status.Name(sei.status) == "STATUS_SUCCESS"

    # The dashboard reads each metric's last scalar: final values exist under their tags,
    # without duplicating a point that log() already wrote at the final step.
    scalars = read_scalars(tmp_path)
    assert scalars["eval/teacher/bpb"] == [(3, 1.25)]
    assert scalars["eval/student/distilled/bpb"] == [(3, 1.5)]
    assert [s for s, _ in scalars["teacher/ce"]] == [1, 2, 3]


def test_finish_adds_a_final_point_only_where_the_last_one_differs(tmp_path):
    with RunLogger(tmp_path, hparams={}) as logger:
        logger.log(2, {"eval/student/distilled/bpb": 1.5, "eval/teacher/bpb": 1.0})
        logger.log(3, _train_metrics(3))
        logger.finish({"eval/student/distilled/bpb": 1.5, "eval/teacher/bpb": 0.75})
    scalars = read_scalars(tmp_path)
    assert scalars["eval/student/distilled/bpb"] == [(2, 1.5)]
    assert scalars["eval/teacher/bpb"] == [(2, 1.0), (3, 0.75)]
    assert [r["step"] for r in read_metrics_jsonl(tmp_path)] == [2, 3]  # finish: TB only


def test_progress_is_visible_before_close(tmp_path):
    import time

    logger = RunLogger(tmp_path, hparams={}, flush_secs=0.2)
    try:
        logger.log(1, {"teacher/ce": 2.0})
        assert read_metrics_jsonl(tmp_path) == [{"step": 1, "teacher/ce": 2.0}]
        time.sleep(1.0)
        assert read_scalars(tmp_path)["teacher/ce"] == [(1, 2.0)]
        logger.log(2, {"teacher/ce": 1.0})
        logger.finish({})
        assert read_scalars(tmp_path)["teacher/ce"] == [(1, 2.0), (2, 1.0)]
    finally:
        logger.close()


def test_failure_inside_context_manager_marks_the_session_failed(tmp_path):
    from tensorboard.plugins.hparams import api_pb2, metadata

    with pytest.raises(RuntimeError):
        with RunLogger(tmp_path, hparams={"lr": 0.1}) as logger:
            logger.log(1, {"teacher/ce": 1.0})
            raise RuntimeError("boom")
    content = _hparams_content(tmp_path)
    assert metadata.EXPERIMENT_TAG not in content
    sei = content[metadata.SESSION_END_INFO_TAG].session_end_info
    assert api_pb2.Status.Name(sei.status) == "STATUS_FAILURE"


# ---- resume -------------------------------------------------------------------------------


def _run(tmp_path, steps, *, resume_step=None, scale=1.0, hparams=None, finish=False):
    with RunLogger(tmp_path, hparams=hparams or {"lr": 0.1}, resume_step=resume_step) as logger:
        for step in steps:
            logger.log(step, _train_metrics(step, scale))
            logger.log_histogram(step, "teacher/expert_load/layer_0", np.arange(4.0) * scale)
            if step % 4 == 0:
                logger.log(step, {"eval/student/distilled/bpb": scale * step})
        if finish:
            logger.finish({"eval/student/distilled/bpb": scale * 8})


def test_resume_keeps_each_step_exactly_once(tmp_path):
    from tensorboard.compat.proto import event_pb2

    _run(tmp_path, range(1, 11), finish=True)
    # A crash at step 10, a checkpoint at step 5: steps 6..10 are recomputed (other values).
    _run(tmp_path, range(6, 11), resume_step=5, scale=2.0)

    records = read_metrics_jsonl(tmp_path)
    train = [r for r in records if "teacher/ce" in r]
    assert [r["step"] for r in train] == list(range(1, 11))
    for r in train:
        assert r["teacher/ce"] == pytest.approx((1.0 if r["step"] <= 5 else 2.0) * 3.0 / r["step"])
    assert [(r["step"], r["eval/student/distilled/bpb"]) for r in records
            if "eval/student/distilled/bpb" in r] == [(4, 4), (8, 16.0)]

    scalars = read_scalars(tmp_path)
    for tag in _train_metrics(1):
        assert [s for s, _ in scalars[tag]] == list(range(1, 11)), tag
    np.testing.assert_allclose([v for _, v in scalars["teacher/ce"]],
                               [(1.0 if s <= 5 else 2.0) * 3.0 / s for s in range(1, 11)],
                               rtol=1e-6)
    assert scalars["eval/student/distilled/bpb"] == [(4, 4.0), (8, 16.0)]
    acc = load_event_accumulator(tmp_path)
    assert [h.step for h in acc.Histograms("teacher/expert_load/layer_0")] == list(range(1, 11))

    # TensorBoard's purge marker: the new file starts with SessionLog.START at resume_step + 1.
    files = _event_files(tmp_path)
    assert len(files) == 2 and [p for p in tmp_path.iterdir() if p.is_dir()] == []
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    def events(name):
        return [event_pb2.Event.FromString(raw)
                for raw in RawEventFileLoader(str(tmp_path / name)).Load()]

    new_events = events(files[-1])
    starts = [e.step for e in new_events
              if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [6]

    # The old file itself no longer holds steps > 5, so readers that ignore SessionLog.START
    # (TensorBoard's Rust data server) see each step once too.
    old_steps = {e.step for e in events(files[0])
                 if any(v.HasField("simple_value") for v in e.summary.value)}
    assert old_steps == {1, 2, 3, 4, 5}

    # The finished first session's HParams summaries are gone: the run is not finished now.
    from tensorboard.plugins.hparams import metadata

    assert set(_hparams_content(tmp_path)) == {metadata.SESSION_START_INFO_TAG}


def test_resume_replaces_hparams_and_drops_torn_jsonl_line(tmp_path):
    from tensorboard.plugins.hparams import metadata

    _run(tmp_path, range(1, 8), hparams={"lr": 0.1})
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 8, "teacher/c')  # a crash mid-write
    _run(tmp_path, range(6, 9), resume_step=5, hparams={"lr": 0.2}, finish=True)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    records = [_strict_json(line) for line in lines]
    assert [r["step"] for r in records if "teacher/ce" in r] == list(range(1, 9))
    ssi = _hparams_content(tmp_path)[metadata.SESSION_START_INFO_TAG].session_start_info
    assert ssi.hparams["lr"].number_value == pytest.approx(0.2)


def test_fresh_start_discards_an_earlier_attempt(tmp_path):
    _run(tmp_path, range(1, 4))  # crashed before its first checkpoint
    _run(tmp_path, range(1, 3), scale=2.0)  # resume_step=None: a fresh start
    assert [r["step"] for r in read_metrics_jsonl(tmp_path)] == [1, 2]
    scalars = read_scalars(tmp_path)
    assert scalars["teacher/ce"] == [(1, 6.0), (2, 3.0)]
    assert len(_event_files(tmp_path)) == 1


# ---- disabled -----------------------------------------------------------------------------


def test_disabled_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, hparams={"lr": 0.1}, enabled=False) as logger:
        logger.log(1, {"teacher/ce": 1.0})
        logger.log_histogram(1, "h", np.ones(3))
        logger.log_text(1, "t", "x")
        logger.finish({"teacher/ce": 1.0})
    logger.close()
    assert not run_dir.exists()

    # nor does it touch an existing run when told to resume
    _run(run_dir, range(1, 4))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    RunLogger(run_dir, hparams={}, enabled=False, resume_step=1).close()
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


# ---- routing to per-model sub-runs (the trainer's distill.rundir.tensorboard_route) ----------


def test_routed_tags_go_to_their_sub_runs_and_resume_there_too(tmp_path):
    from distill.rundir import tensorboard_route

    with RunLogger(tmp_path, hparams={"lr": 1e-3}, route=tensorboard_route) as logger:
        for step in (1, 2, 3):
            logger.log(step, {**_train_metrics(step), "perf/step_seconds": 0.5})
        logger.log_histogram(3, "student/distilled/expert_load/layer0", [0.2, 0.8])
        logger.log(3, {"eval/student/distilled/bpb": 2.5, "eval/teacher/bpb": 2.0})
        logger.finish({"eval/student/distilled/bpb": 2.5, "eval/student/distilled/vs_control_pct": -3.0})
    assert set(read_scalars(tmp_path)) == {"perf/step_seconds"}
    assert read_scalars(tmp_path / "tb" / "teacher") == {"train/ce": [(1, 3.0), (2, 1.5), (3, 1.0)],
                                                         "eval/bpb": [(3, 2.0)]}
    distilled = read_scalars(tmp_path / "tb" / "distilled")
    assert distilled["eval/bpb"] == [(3, 2.5)] and distilled["eval/vs_control_pct"] == [(3, -3.0)]
    assert "train/expert_load/layer0" in load_event_accumulator(tmp_path / "tb" / "distilled").Tags()["histograms"]
    assert [row["step"] for row in read_metrics_jsonl(tmp_path) if "student/distilled/kd" in row] == [1, 2, 3]
    experiment = _hparams_content(tmp_path)["_hparams_/experiment"].experiment
    assert {(m.name.group, m.name.tag) for m in experiment.metric_infos} == {
        ("tb/distilled", "eval/bpb"), ("tb/distilled", "eval/vs_control_pct")}
    # A resume from step 2 drops step 3 from every sub-run, as from the run directory.
    with RunLogger(tmp_path, route=tensorboard_route, resume_step=2) as logger:
        logger.log(3, _train_metrics(3, scale=2.0))
    assert read_scalars(tmp_path / "tb" / "teacher")["train/ce"] == [(1, 3.0), (2, 1.5), (3, 2.0)]
    assert "eval/bpb" not in read_scalars(tmp_path / "tb" / "teacher")
