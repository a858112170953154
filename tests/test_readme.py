"""The README's tour runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import regbn

README = Path(__file__).resolve().parents[1] / "README.md"


def test_tour_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python block"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert isinstance(scope["layer"], regbn.RegBN) and scope["layer"].last_lambda > 0
    assert (tmp_path / "model.svg").stat().st_size > 0
    assert "regbn_0" in dict(scope["patched"].named_children())
    assert "Suggested pairs" in capsys.readouterr().out
