"""The real TensorBoard server over a finished run and a 2-run sweep: one chart per metric with a
line per model (each model a sub-run `tb/<model>`), within a run and across a sweep's runs; the
HParams experiment with each run's config, its models' final metrics and each student's gain over
its own control; loopback only. Then the page itself, in headless Chromium: the chart of validation
bpb receives a line for the teacher, the distilled student and the control (read from the network
log of what the page requested), and a screenshot."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import distill
from distill.sweep import load_sweep, run_sweep
from distill.tb import start

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
MODELS = {"tb/teacher", "tb/distilled", "tb/control"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900", "--virtual-time-budget=20000"]


def get(url: str):
    return json.loads(urllib.request.urlopen(url, timeout=30).read())


def post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def time_series(url: str, tag: str) -> dict[str, list[dict]]:
    """What the Time Series dashboard asks for a tag's chart: run -> points."""
    body = urllib.parse.urlencode({"requests": json.dumps([{"plugin": "scalars", "tag": tag}])}).encode()
    [answer] = json.loads(urllib.request.urlopen(url + "experiment/defaultExperimentId/data/plugin/timeseries/"
                                                       "timeSeries", data=body, timeout=30).read())
    return answer["runToSeries"]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory, request) -> Path:
    """A finished tiny run (`single`) and a 2-run sweep (`sweep/...`) side by side."""
    root = tmp_path_factory.mktemp("boards")
    distill.run(distill.load_config(TINY, [f"run.dir={root / 'single'}", "train.steps=4", "teacher.warmup_steps=0"]))
    here = os.getcwd()
    os.chdir(ROOT)  # the sweep file's base path is relative to the repository root
    try:
        results = run_sweep(load_sweep(ROOT / "tests" / "sweep" / "tiny_grid.yaml", out=root / "sweep"), parallel=1,
                            echo=lambda line: None)
    finally:
        os.chdir(here)
    assert all(r.status == "completed" for r in results.values())
    return root


@pytest.fixture(scope="module")
def board(logdir):
    process, url = start(logdir)
    yield url
    os.kill(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def test_one_chart_per_metric_with_a_line_per_model_in_a_run_and_across_a_sweep(logdir, board):
    assert board.startswith("http://127.0.0.1:")
    runs = set(get(board + "data/runs"))
    single = {f"single/{m}" for m in MODELS}
    sweep_runs = sorted(p.name for p in (logdir / "sweep").iterdir() if (p / "summary.json").is_file())
    across = {f"sweep/{r}/{m}" for r in sweep_runs for m in MODELS}
    assert len(sweep_runs) == 2 and single | across | {"single", *(f"sweep/{r}" for r in sweep_runs)} <= runs
    bpb = time_series(board, "eval/bpb")
    assert single | across <= set(bpb)
    summary = json.loads((logdir / "single" / "summary.json").read_text())
    for model in ("teacher", "distilled", "control"):
        assert bpb[f"single/tb/{model}"][-1]["value"] == pytest.approx(summary["bpb"][model], rel=1e-6)
    train_ce = time_series(board, "train/ce")  # a training metric of every model, one chart too
    assert single <= set(train_ce)


def test_hparams_compare_each_student_with_its_own_control(logdir, board):
    experiment = post(board + "data/plugin/hparams/experiment", {"experimentName": ""})
    assert "loss.temperature" in {info["name"] for info in experiment["hparamInfos"]}
    metrics = {(info["name"]["group"], info["name"]["tag"]) for info in experiment["metricInfos"]}
    assert {("tb/distilled", "eval/bpb"), ("tb/control", "eval/bpb"), ("tb/teacher", "eval/bpb"),
            ("tb/distilled", "eval/vs_control_pct")} <= metrics
    summary = json.loads((logdir / "single" / "summary.json").read_text())
    gain = time_series(board, "eval/vs_control_pct")["single/tb/distilled"][-1]["value"]
    expected = (summary["bpb"]["distilled"] - summary["bpb"]["control"]) / summary["bpb"]["control"] * 100
    assert gain == pytest.approx(expected, rel=1e-5)


def page_responses(netlog: Path, endpoint: str) -> list[bytes]:
    """The bodies the page received from `endpoint`, from Chromium's network log."""
    log = json.loads(netlog.read_text())
    types = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    sources = {e["source"]["id"] for e in log["events"] if endpoint in (e.get("params") or {}).get("url", "")}
    bodies: dict[int, bytes] = {}
    for event in log["events"]:
        if event["source"]["id"] in sources and types.get(event["type"]) == "URL_REQUEST_JOB_FILTERED_BYTES_READ":
            bodies[event["source"]["id"]] = bodies.get(event["source"]["id"], b"") + base64.b64decode(
                event["params"].get("bytes", ""))
    return list(bodies.values())


def load_page(chromium: str, url: str, folder: Path) -> tuple[set[str], Path]:
    """Open `url` in headless Chromium: (the runs the page received for the eval/bpb chart, its screenshot)."""
    folder.mkdir(parents=True, exist_ok=True)
    netlog, screenshot = folder / "netlog.json", folder / "tensorboard.png"
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={folder / 'profile'}",
                             f"--log-net-log={netlog}", "--net-log-capture-mode=Everything",
                             f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    charts = [json.loads(body) for body in page_responses(netlog, "/data/plugin/timeseries/timeSeries")]
    return {run for chart in charts for answer in chart if answer["tag"] == "eval/bpb"
            for run in answer["runToSeries"]}, screenshot


def test_the_page_draws_validation_bpb_with_a_line_per_model(board, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)")
    page = board + "?tagFilter=" + urllib.parse.quote("eval/bpb", safe="") + "#timeseries"
    for attempt in range(3):  # a loaded machine may end Chromium's time budget before the charts ask for data
        lines, screenshot = load_page(chromium, page, tmp_path / f"attempt{attempt}")
        if lines:
            break
    assert {f"single/{m}" for m in MODELS} <= lines, lines
    assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
