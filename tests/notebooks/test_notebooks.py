"""The notebooks in notebooks/: committed without outputs, one `parameters` cell each, and each one
runs headless from top to bottom with small parameters injected after that cell (papermill's
convention), in a fresh kernel of this interpreter whose working directory is a temporary one."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
NAMES = ["quickstart.ipynb", "losses.ipynb", "routing.ipynb"]
CELL_TIMEOUT_S = 600  # a cold XLA cache on a busy 2-core machine; warm, each notebook takes seconds

# Over the cpu-teacher / cpu-student presets: two layers, both MoE, four experts.
TINY = {"intermediate_size": 32, "intermediate_size_mlp": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "num_local_experts": 4, "attention_chunk_size": 8, "floor_scale": 8}


def small_parameters(name: str, tmp: Path) -> dict:
    """What each notebook runs with here: tiny models, a few steps, no TensorBoard server."""
    if name == "quickstart.ipynb":
        return {"run_dir": str(tmp / "quickstart"), "steps": 8, "teacher_model": {**TINY, "hidden_size": 32},
                "student_model": {**TINY, "hidden_size": 16}, "seq_len": 32, "batch_size": 4,
                "max_bytes": 1_000_000, "eval_every": 4, "eval_batches": 2, "log_every": 2,
                "open_tensorboard": False}
    if name == "losses.ipynb":
        return {"vocab": 24, "fit_steps": 30}
    if name == "routing.ipynb":
        # no run there yet: the notebook trains one first; a teacher with more experts and MoE layers
        # than its students, as in quickstart.ipynb's run
        return {"run_dir": str(tmp / "routing"), "config": str(REPO / "tests/configs/tiny.yaml"),
                "overrides": ["train.steps=6", "train.eval_every=6", "train.checkpoint_every=6",
                              "data.max_bytes=1000000", "teacher.model.num_hidden_layers=4",
                              "teacher.model.num_local_experts=8"],
                "max_batches": 2}
    raise KeyError(name)


def committed() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def parameters_cells(notebook) -> list[int]:
    return [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]


def test_the_notebooks_are_there():
    assert sorted(p.name for p in committed()) == sorted(NAMES), "a new notebook needs its small_parameters here"


@pytest.mark.parametrize("path", committed(), ids=lambda p: p.name)
def test_committed_without_outputs_and_with_one_parameters_cell(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: strip them before committing"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count: strip it"
    cells = parameters_cells(notebook)
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'parameters', expected exactly one"
    assert notebook.cells[cells[0]].cell_type == "code"


def with_parameters(notebook, parameters: dict):
    """A copy of `notebook` with a cell assigning `parameters` right after the 'parameters' cell."""
    source = "# Injected by tests/notebooks/test_notebooks.py\n" + "".join(
        f"{key} = {value!r}\n" for key, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    notebook = copy.deepcopy(notebook)
    notebook.cells.insert(parameters_cells(notebook)[0] + 1, cell)
    return notebook


def this_interpreter_kernel(directory: Path) -> str:
    """A kernelspec that starts ipykernel under sys.executable (not whatever `python` is on PATH)."""
    spec = directory / "kernels" / "distill-tests"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "distill tests", "language": "python"}))
    return "distill-tests"


# routing.ipynb trains a run of its own first: `slow` (python -m pytest -m slow) keeps the default suite short.
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n == "routing.ipynb" else [])
                                  for n in NAMES])
def test_notebook_runs_headless(name, tmp_path, monkeypatch):
    source = nbformat.read(NOTEBOOKS / name, as_version=4)
    parameters = small_parameters(name, tmp_path)
    unknown = [key for key in parameters if f"\n{key} = " not in "\n" + source.cells[parameters_cells(source)[0]].source]
    assert not unknown, f"{name}: the parameters cell does not define {unknown}"
    notebook = with_parameters(source, parameters)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # debugpy's warning about frozen modules
    kernel = this_interpreter_kernel(tmp_path / "jupyter")
    work = tmp_path / "cwd"
    work.mkdir()
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name=kernel,
                            resources={"metadata": {"path": str(work)}})
    try:
        client.execute()
    except CellExecutionError as error:  # the message holds the failing cell's source and traceback
        pytest.fail(f"{name} failed:\n" + re.sub(r"\x1b\[[0-9;]*m", "", str(error)), pytrace=False)
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type == "code" and "plt.show()" in cell.source:
            images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert images, f"{name} cell {i} drew no figure:\n{cell.source}"
