"""The quick start runs as a script and prints what it promises."""

from __future__ import annotations

import pytest
from conftest import EXAMPLES, run_script


@pytest.mark.slow
def test_quickstart_runs():
    proc = run_script(str(EXAMPLES / "quickstart.py"), timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "f_norm (50, 512), g_norm (50, 64, 7, 7)" in out
    assert "last_lambda" in out and "||W_run||_F" in out
    assert "eval: f_norm (1, 512), g_norm (1, 64, 7, 7)" in out
    assert "W is (3136, 512)" in out
