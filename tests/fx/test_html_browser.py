"""The notebook view as a reader sees it: rendered by headless Chromium inside JupyterLab's light
and dark themes, every marked row (fusion, RegBN layer, failed node) reads at WCAG AA contrast
(>= 4.5:1) and every name is left-aligned although JupyterLab right-aligns table cells."""

from __future__ import annotations

import pytest
import torch

import regbn

from . import browser
from .conftest import PMR
from .test_report import Mismatch

AA = 4.5


def _reports() -> dict[str, regbn.Report]:
    x = (torch.randn(4, 1, 28, 28), torch.randn(4, 3, 28, 28))
    patched = regbn.insert(PMR(), [("gray_net", "colored_net")], x)
    return {
        "fusion": regbn.inspect(PMR(), x),
        "regbn": regbn.inspect(patched, x),
        "failed": regbn.inspect(Mismatch(), input_shapes=[(2, 8), (2, 5)]),
    }


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_marked_rows_read_at_aa_contrast_and_names_align_left(theme):
    browser.chromium()
    body = "".join(r._repr_html_() for r in _reports().values())
    found = browser.dump(body, theme)
    marked = [m for m in found if m["row"] != "first-cell"]
    assert {c for m in marked for c in m["row"].split()} >= {"fusion", "regbn", "failed"}
    low = [(m["row"], m["text"], round(m["contrast"], 2)) for m in marked if m["contrast"] < AA]
    assert not low, f"{theme}: text below {AA}:1 contrast: {low}"
    cells = [m for m in marked if m["align"] is not None]
    assert cells and all(m["align"] == ("right" if m["numeric"] else "left") for m in cells)
    (first,) = [m for m in found if m["row"] == "first-cell"]
    assert first["align"] == "left"


def test_the_probe_catches_a_row_without_its_own_text_colour():
    """The check is real: the old style (a pale row keeping the theme's white text) fails it."""
    browser.chromium()
    old = (
        '<div class="regbn-report"><style>.regbn-report tr.fusion td{background:#fde2e1}'
        '</style><table><tbody><tr class="fusion"><td>cat</td></tr></tbody></table></div>'
    )
    (row, first) = browser.dump(old, "dark")
    assert row["contrast"] < 1.5 and first["align"] == "right"
