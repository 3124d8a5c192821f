"""The real TensorBoard server on two runs of one folder: both runs' scalars under the same tags,
the HParams experiment with the runs' config and final metrics; loopback only; stopped by pid."""

from __future__ import annotations

import json
import os
import signal
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import distill
from distill.tb import start

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


def get(url: str):
    return json.loads(urllib.request.urlopen(url, timeout=30).read())


def post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def test_tensorboard_serves_two_runs_for_comparison(tmp_path):
    for temperature in (1.0, 2.0):
        distill.run(distill.load_config(TINY, [f"run.dir={tmp_path / f'T{temperature}'}", "train.steps=4",
                                               "teacher.warmup_steps=0", f"loss.temperature={temperature}"]))
    process, url = start(tmp_path)
    try:
        assert url.startswith("http://127.0.0.1:")
        runs = get(url + "data/runs")
        assert sorted(runs) == ["T1.0", "T2.0"]  # one TensorBoard run per run directory, nothing else
        tag = "eval/student/distilled/bpb"
        for run in runs:
            query = urllib.parse.urlencode({"run": run, "tag": tag})
            points = get(url + f"data/plugin/scalars/scalars?{query}")
            assert [step for _, step, _ in points] == [4]
            summary = json.loads((tmp_path / run / "summary.json").read_text())
            assert points[0][2] == pytest.approx(summary["bpb"]["distilled"], rel=1e-6)
        experiment = post(url + "data/plugin/hparams/experiment", {"experimentName": ""})
        hparams = {info["name"] for info in experiment["hparamInfos"]}
        assert "loss.temperature" in hparams
        metrics = {info["name"]["tag"] for info in experiment["metricInfos"]}
        assert tag in metrics
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
