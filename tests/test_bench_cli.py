"""`distill bench NAME`: runs experiments/bench/NAME.py with its arguments."""

from __future__ import annotations

import re
import subprocess
import sys

from distill import cli


def test_unknown_benchmark_lists_the_known_ones(capsys):
    assert cli.main(["bench", "nonsense"]) == 2
    message = capsys.readouterr().err
    assert "no benchmark 'nonsense'" in message and "step" in message and "model" in message
    assert "_common" not in message
    assert cli.main(["bench", "_common"]) == 2


def test_step_benchmark_prints_the_roofline_table():
    result = subprocess.run([sys.executable, "-m", "distill.cli", "bench", "step", "--quick", "--sections", "roofline"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rates = re.findall(r"\|\s+(float32|bfloat16) \| 1024 x 1024 x 1024 \|\s+\d+ \|\s+([\d,.]+) \|", result.stdout)
    assert [dtype for dtype, _ in rates] == ["float32", "bfloat16"]
    assert all(float(rate.replace(",", "")) > 0 for _, rate in rates)
