"""Shared set-up for the example tests: the examples folder on sys.path, and a script runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
if str(EXAMPLES) not in sys.path:
    # The examples are scripts, not a package: import them the way `python examples/x.py` does.
    sys.path.insert(0, str(EXAMPLES))


def run_script(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run an example with this interpreter; the examples folder is its sys.path[0]."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
