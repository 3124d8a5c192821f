"""Sharding, proven against one device: the same 20-step co-distillation on three 8-device meshes
(simulated CPU devices, in a subprocess) gives the losses of a 1-device run to 1e-4; every large
parameter is split as the rules say; a run resumes on another mesh (8 devices -> 1 and back).
The default run covers data x fsdp x expert; `python -m pytest -m slow` adds the other two meshes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import distill
from distill.run_logger import read_metrics_jsonl

CONFIG = Path(__file__).parents[1] / "configs" / "sharded.yaml"
WORKER = Path(__file__).with_name("sharded_worker.py")
MESHES = {"data8": {"data": 8}, "dp_fsdp_ep": {"data": 2, "fsdp": 2, "expert": 2},
          "dp_fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2}}
MOE, DENSE = "groups/0/layers/1/feed_forward", "groups/0/layers/0/feed_forward"


def run_worker(jobs: list[dict]) -> dict[str, dict]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, str(WORKER), json.dumps(jobs)], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {report["run_dir"]: report for report in reports}


def one_device(run_dir: Path, **kw):
    return distill.run(distill.load_config(CONFIG, [f"run.dir={run_dir}"]), **kw)


def rewound(run_dir: Path, to: Path) -> Path:
    """A copy of a finished 20-step run with its step-20 checkpoint removed: resuming it redoes 11-20."""
    shutil.copytree(run_dir, to)
    shutil.rmtree(to / "checkpoints" / "20")
    return to


class Runs:
    """The 1-device reference and, on first use, each mesh's run (one worker subprocess per mesh),
    so the default test run pays for one 8-device mesh and `-m slow` for the other two."""

    def __init__(self, root: Path):
        self.root = root
        self.reports: dict[str, dict] = {}
        one_device(root / "single")

    def report(self, mesh: str) -> dict:
        if mesh not in self.reports:
            jobs = [{"run_dir": str(self.root / mesh), "mesh": MESHES[mesh], "collectives": mesh == "dp_fsdp_ep"}]
            if mesh == "dp_fsdp_ep":  # 1 -> 8 devices: steps 1-10 ran on one device, 11-20 run on this mesh
                jobs.append({"run_dir": str(rewound(self.root / "single", self.root / "to8")), "mesh": MESHES[mesh]})
            for run_dir, report in run_worker(jobs).items():
                self.reports[Path(run_dir).name] = report
        return self.reports[mesh]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("sharding"))


# data + fsdp + expert runs by default (it exercises the most: FSDP gathers, expert all-to-all);
# pure data parallel and data + fsdp + tensor are `slow`.
MESH_PARAMS = [pytest.param(name, marks=[] if name == "dp_fsdp_ep" else [pytest.mark.slow]) for name in MESHES]


def metrics(run_dir: Path) -> dict[int, dict]:
    by_step: dict[int, dict] = {}
    for row in read_metrics_jsonl(run_dir):
        by_step.setdefault(row["step"], {}).update(row)
    return by_step


def assert_same_losses(run_dir: Path, reference: Path, steps=range(1, 21)):
    ours, theirs = metrics(run_dir), metrics(reference)
    compared = 0
    for step in steps:
        for key, expected in theirs[step].items():
            if key == "step" or key.startswith("perf/") or "expert_load" in key:
                continue  # timings; integer expert counts (a routing tie may flip)
            assert ours[step][key] == pytest.approx(expected, rel=1e-4, abs=1e-6), (run_dir.name, step, key)
            compared += 1
    assert compared > 20 * 10


@pytest.mark.parametrize("mesh", MESH_PARAMS)
def test_mesh_gives_the_losses_of_one_device(runs, mesh):
    runs.report(mesh)
    root = runs.root
    assert_same_losses(root / mesh, root / "single")
    final = json.loads((root / mesh / "summary.json").read_text())["bpb"]
    single = json.loads((root / "single" / "summary.json").read_text())["bpb"]
    assert final == pytest.approx(single, rel=1e-4)


# Shard shapes written out from the rules (embed->fsdp, heads/kv_heads/mlp/vocab->tensor,
# experts->expert), for the teacher of sharded.yaml: d=32, 4 heads, 2 kv heads, head_dim 8,
# 4 experts of width 32, dense mlp 64, vocab 256.
EXPECTED_TEACHER = {
    "data8": {"embed": [256, 32], f"{MOE}/gate": [4, 32, 32], f"{MOE}/down": [4, 32, 32],
              f"{DENSE}/gate": [32, 64], "groups/0/layers/0/attention/k": [32, 2, 8], "lm_head": [32, 256]},
    "dp_fsdp_ep": {"embed": [256, 16], f"{MOE}/gate": [2, 16, 32], f"{MOE}/down": [2, 32, 16],
                   f"{DENSE}/gate": [16, 64], "groups/0/layers/0/attention/k": [16, 2, 8], "lm_head": [16, 256]},
    "dp_fsdp_tp": {"embed": [128, 16], f"{MOE}/gate": [4, 16, 16], f"{MOE}/down": [4, 16, 16],
                   f"{DENSE}/gate": [16, 32], "groups/0/layers/0/attention/k": [16, 1, 8], "lm_head": [16, 128]},
}


@pytest.mark.parametrize("mesh", MESH_PARAMS)
def test_parameters_are_split_as_the_rules_say(runs, mesh):
    report = runs.report(mesh)
    for name, shape in EXPECTED_TEACHER[mesh].items():
        assert report["teacher"][name] == [shape], (mesh, name)
    distilled, control = report["students"]
    assert distilled["embed"] == [{"data8": [256, 16], "dp_fsdp_ep": [256, 8], "dp_fsdp_tp": [128, 8]}[mesh]]
    assert all(len(shapes) == 1 for shapes in control.values())  # "replicated": whole on every device
    assert control["embed"] == [[256, 16]]
    # Adam's moments sit with their parameters.
    moments = {k: v for k, v in report["teacher_opt"].items() if k.endswith(f"mu/{MOE}/gate")}
    assert list(moments.values()) == [[EXPECTED_TEACHER[mesh][f"{MOE}/gate"]]]


@pytest.mark.parametrize("mesh", MESH_PARAMS)
def test_memory_per_device_is_what_the_shardings_imply(runs, mesh):
    report = runs.report(mesh)
    assert report["bytes_implied"] == report["bytes_held"]
    if mesh == "data8":
        assert report["bytes_held"] == [report["total_bytes"]] * 8
    else:  # the teacher and the distilled student are split; the replicated control is not
        assert max(report["bytes_held"]) < 0.6 * report["total_bytes"]


def test_a_run_resumes_on_another_mesh(runs):
    runs.report("dp_fsdp_ep")
    root = runs.root
    one_device(rewound(root / "dp_fsdp_ep", root / "from8"))  # 8 devices -> 1
    assert_same_losses(root / "from8", root / "single")  # steps 1-10 on 8 devices, 11-20 on one
    assert_same_losses(root / "to8", root / "single")  # steps 1-10 on one device, 11-20 on 8
    assert runs.reports["to8"]["step"] == 20
    assert json.loads((root / "to8" / "summary.json").read_text())["resumed_from"] == 10


def test_expert_parallel_step_moves_tokens_not_weights(runs):
    report = runs.report("dp_fsdp_ep")
    exchanged = [shape for op, shape, _ in report["collectives"] if op == "all-to-all"]
    # Tokens travel to their experts' devices: [1 destination, C = 32 slots, d] per exchange,
    # d = 32 for the teacher, 16 for the distilled student.
    assert any("f32[1,32,32]" in shape for shape in exchanged) and any("f32[1,32,16]" in shape for shape in exchanged)
    assert report["all_expert_gathers"] == []  # without expert parallelism GSPMD gathers f32[4,16,32] etc.


def test_a_mesh_the_model_cannot_split_is_refused_before_anything_is_written(tmp_path, reliability_record):
    result = subprocess.run(
        [sys.executable, "-m", "distill.cli", "run", str(CONFIG), f"run.dir={tmp_path / 'r'}", "mesh.data=1",
         "mesh.expert=8"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "its experts dimension (4) does not split over mesh expert=8" in message
    assert not (tmp_path / "r").exists()
    reliability_record("bad_input", case="experts-divisible", input="4 experts over an expert axis of 8 (8 devices)",
                       exit=result.returncode, message=message.replace(str(tmp_path), "WORK"))
