"""The benchmarks run end to end in their --quick mode and write the JSON the docs quote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# every test here runs a benchmark script end to end in a subprocess
pytestmark = pytest.mark.slow


def _run(args: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.parametrize("script", ["bench_layer.py", "bench_distributed.py"])
def test_quick_run_writes_json(script, tmp_path):
    out = tmp_path / "result.json"
    done = _run([sys.executable, str(BENCH / script), "--quick", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["cases"] and "--quick" in result["command"]
    for case in result["cases"]:
        times = [v for k, v in case.items() if k.endswith("_s")]
        assert times and all(t > 0 for t in times)
    assert "|" in done.stdout  # the markdown table


def test_bench_layer_official_options_on_cpu(tmp_path):
    """gpu_check.sh's bench_layer call, on the CPU: the official options, the floor with norms."""
    out = tmp_path / "layer.json"
    done = _run([sys.executable, str(BENCH / "bench_layer.py"), "--device", "cpu", "--quick",
                 "--options", "official", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["options"] == {"name": "official", "normalize_input": True,
                                 "normalize_output": True, "affine": True}
    assert all(c["floor_norms_s"] > 0 and c["ratio_to_floor_norms"] > 0 for c in result["cases"])


def test_profile_splits_the_step(tmp_path):
    out = tmp_path / "profile.json"
    done = _run([sys.executable, str(BENCH / "bench_layer.py"), "--device", "cpu", "--quick",
                 "--profile", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    phases = result["phases_ms"]
    assert "backward" in phases and "other" in phases and all(v >= 0 for v in phases.values())
    assert result["shape"]["options"]["name"] == "official"
    assert set(result["timed_ms"]) == {"ours_train", "floor_norms", "floor"}
    assert "| phase |" in done.stdout


def test_sync_debug_says_it_needs_cuda_on_the_cpu(tmp_path):
    out = tmp_path / "sync.json"
    done = _run([sys.executable, str(BENCH / "bench_layer.py"), "--device", "cpu", "--quick",
                 "--sync-debug", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text())["sync_per_step"] is None
    assert "--device cuda" in done.stdout


def test_scaling_quick(tmp_path):
    out = tmp_path / "scaling.json"
    done = _run([sys.executable, str(BENCH / "bench_scaling.py"), "--quick", "--out", str(out)],
                timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    ran = [c for c in result["cases"] if "step_s" in c]
    assert {c["projection"] for c in ran} == {"full", "channel"}
    for c in ran:
        assert c["step_s"] > 0 and c["peak_rss_mb"] >= c["baseline_rss_mb"] > 0
    assert set(result["slopes"]) == {"full vs B", "channel vs B"}


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_stops_clearly_without_cuda(tmp_path):
    """Without a CUDA device the script runs nothing and says why, with exit code 2."""
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "",
           "RESULTS": str(tmp_path)}
    done = _run(["bash", str(BENCH / "gpu_check.sh")], timeout=120, env=env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "no CUDA device" in done.stderr and "nothing was run" in done.stderr
    assert "torch" in done.stdout  # the versions are printed first
    assert list(tmp_path.iterdir()) == []
