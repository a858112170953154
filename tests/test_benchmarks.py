"""The benchmarks run end to end in their --quick mode and write the JSON the README quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_layer.py", "bench_distributed.py"])
def test_quick_run_writes_json(script, tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["cases"] and "--quick" in result["command"]
    for case in result["cases"]:
        times = [v for k, v in case.items() if k.endswith("_s")]
        assert times and all(t > 0 for t in times)
    assert "|" in done.stdout  # the markdown table
