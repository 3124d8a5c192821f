"""Regenerate the tables of docs/reliability.md from the tests' own records.

    python experiments/reliability/report.py            # fault, bad-input and security tests
    python experiments/reliability/report.py --slow     # also the 20x kill -9 trial (minutes)

Runs the tests with DISTILL_RELIABILITY_RECORDS set (each passing test appends what it did and
saw), then rewrites the parts of docs/reliability.md between the `<!-- table:NAME -->` markers.
A failing test leaves no record and fails this script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
TESTS = ["tests/trainer/test_faults.py", "tests/test_bad_input.py", "tests/test_security.py",
         "tests/trainer/test_sharding.py::test_a_mesh_the_model_cannot_split_is_refused_before_anything_is_written"]


def collect(slow: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as scratch:
        records = Path(scratch) / "records.jsonl"
        env = {**os.environ, "DISTILL_RELIABILITY_RECORDS": str(records)}
        marks = ["-m", ""] if slow else []
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", *marks, *TESTS], cwd=ROOT, env=env)
        if result.returncode != 0:
            sys.exit(f"report: the tests failed (exit {result.returncode}); docs/reliability.md left as it was")
        return [json.loads(line) for line in records.read_text().splitlines()]


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def tables(records: list[dict]) -> dict[str, str]:
    faults = ["| fault | how injected | trials | outcome |", "|---|---|---|---|"]
    faults += [f"| {cell(r['fault'])} | {cell(r['injection'])} | {r['trials']} | {cell(r['outcome'])} |"
               for r in records if r["kind"] == "fault"]
    bad = ["| input | exit | message |", "|---|---|---|"]
    bad += [f"| {cell(r['input'])} | {r['exit']} | `{cell(r['message'])}` |"
            for r in sorted((r for r in records if r["kind"] == "bad_input"), key=lambda r: r["case"])]
    security = ["| check | outcome |", "|---|---|"]
    security += [f"| {cell(r['check'])} | {cell(r['outcome'])} |" for r in records if r["kind"] == "security"]
    return {"faults": "\n".join(faults), "bad-input": "\n".join(bad), "security": "\n".join(security)}


def rewrite(doc: str, generated: dict[str, str]) -> str:
    for name, table in generated.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        if not pattern.search(doc):
            sys.exit(f"report: {DOC} has no <!-- table:{name} --> ... <!-- /table:{name} --> block")
        doc = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), doc)
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slow", action="store_true", help="include the slow kill -9 trials")
    args = parser.parse_args()
    records = collect(args.slow)
    DOC.write_text(rewrite(DOC.read_text(), tables(records)))
    counts = {kind: sum(r["kind"] == kind for r in records) for kind in ("fault", "bad_input", "security")}
    print(f"report: {DOC.relative_to(ROOT)} rewritten from {len(records)} records {counts}")


if __name__ == "__main__":
    main()
