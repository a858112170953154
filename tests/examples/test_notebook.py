"""The notebooks run top to bottom (the main one in quick mode), and are committed without
outputs."""

from __future__ import annotations

import json
import sys

import nbformat
import pytest
from conftest import EXAMPLES

NOTEBOOK = EXAMPLES / "notebooks" / "patch_a_pretrained_model.ipynb"
TWO_TOWER = EXAMPLES / "notebooks" / "two_tower_image_text.ipynb"


@pytest.mark.parametrize("path", [NOTEBOOK, TWO_TOWER], ids=["pretrained", "two_tower"])
def test_notebook_is_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def _execute(path, tmp_path, monkeypatch):
    """``path`` run top to bottom in a kernel of this interpreter, in quick mode."""
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # A kernelspec pinned to this interpreter, so the notebook sees this environment's regbn
    # whatever `python` is on PATH.
    spec = tmp_path / "jupyter" / "kernels" / "regbn-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "regbn test",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("REGBN_NOTEBOOK_QUICK", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="regbn-test",
        timeout=90,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails
    nbformat.write(nb, tmp_path / "executed.ipynb")  # kept for a look when the test fails
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def _shown(outputs, mime: str) -> list[str]:
    return [o["data"][mime] for o in outputs if mime in o.get("data", {})]


@pytest.mark.slow
def test_notebook_runs_in_quick_mode(tmp_path, monkeypatch):
    outputs = _execute(NOTEBOOK, tmp_path, monkeypatch)
    # The report as HTML, the pictures inline (SVG, no file needed), the plot, progress shown.
    assert any('<tr class="fusion">' in html for html in _shown(outputs, "text/html"))
    assert len(_shown(outputs, "image/svg+xml")) == 2
    assert len(_shown(outputs, "image/png")) == 1
    assert any("Fusion(cat [cat]: g (gray), c (colored)" in text
               for text in _shown(outputs, "text/plain"))  # fmt: skip
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    widgets = _shown(outputs, "application/vnd.jupyter.widget-view+json")
    assert widgets or "fine-tuning" in streams  # tqdm: a widget, or text without ipywidgets


@pytest.mark.slow
def test_two_tower_notebook_runs(tmp_path, monkeypatch):
    outputs = _execute(TWO_TOWER, tmp_path, monkeypatch)
    html = _shown(outputs, "text/html")
    assert any("image.fc" in h and "text.proj" in h and '<tr class="fusion">' in h for h in html)
    assert any('<tr class="regbn">' in h for h in html)  # the patched model's report
    assert len(_shown(outputs, "image/svg+xml")) == 1
    plain = "".join(_shown(outputs, "text/plain"))
    assert "(regbn_0): RegBN(" in plain
