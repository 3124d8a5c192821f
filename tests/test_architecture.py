"""The layers of docs/architecture.md hold: import-linter's contracts (pyproject.toml) are kept, every
module has a layer, no function imports a project module, and the document lists every layer."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "losses", "teacher", "student")
OPTIONAL_HEAVY = {
    "torch": "HF conversion and TensorBoard writing only",
    "transformers": "HF conversion only",
    "matplotlib": "plots only",
    "tensorboard": "process 0's logger only (the others import nothing of it)",
    "sklearn": "the digits data source only",
    "tokenizers": "Hugging Face tokenizers only",
}
"""Third-party packages a function may import: heavy to import, needed by one feature."""


def layers() -> list[list[str]]:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    [contract] = [c for c in contracts if c["type"] == "layers"]
    return [[name.strip() for name in re.split(r"[|:]", layer)] for layer in contract["layers"]]


def modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def test_the_import_contracts_are_kept():
    """Layers (a module imports only from the layers below its own) and no cycle between the modules
    of any package: a new cycle or an upward import fails here, naming it."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "lint-imports is missing: pip install -e '.[dev]'"
    result = subprocess.run([lint, "--no-cache", "--config", "pyproject.toml"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_every_module_has_a_layer():
    """A new module gets its place in pyproject.toml's layers (and docs/architecture.md) before it lands."""
    listed = [name for layer in layers() for name in layer]
    placed = lambda module: any(module == name or module.startswith(name + ".") for name in listed)  # noqa: E731
    missing = [m for m in modules() if m not in PACKAGES and not placed(m)]
    assert not missing, f"modules in no layer of pyproject.toml's [tool.importlinter]: {missing}"


def test_the_architecture_document_lists_every_layer():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [name for layer in layers() for name in layer if f"`{name}`" not in text]
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_no_function_imports_a_project_module():
    """Imports sit at the top of a module (a cycle cannot hide in a function); functions may import
    only the optional heavy dependencies of `OPTIONAL_HEAVY`."""
    bad = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
                for node in ast.walk(function):
                    names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                             ["." * node.level + (node.module or "")] if isinstance(node, ast.ImportFrom) else [])
                    bad += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in names
                            if name.split(".")[0] not in OPTIONAL_HEAVY]
    assert not bad, f"imports inside functions: {bad}"
