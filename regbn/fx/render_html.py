"""The notebook view of a report (``report._repr_html_()``): a styled table of every node.

A column is one header in `HTML_HEADERS` and one cell in `html_cells`. A report measured on
batches has one more column, the dependence at each fusion, shaded by its value.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from .._format import dtype_name, format_count, format_shape, plural
from .report_dependence import (
    DEPENDENCE_HELP,
    dependence_cell,
    dependence_colour,
    fusion_row,
)

if TYPE_CHECKING:
    from .report import Report, Row

__all__ = ["PALETTE", "colours", "html", "html_cells"]

# One colour per modality, in input order (the graph views use them too).
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
)  # fmt: skip

HTML_HEADERS = ("node", "module", "layer", "output shape", "dtype", "modalities", "params")

_CSS = (
    "<style>"
    ".regbn-report{font-family:ui-monospace,monospace;font-size:12px}"
    ".regbn-report table{border-collapse:collapse}"
    ".regbn-report th,.regbn-report td{padding:2px 8px;text-align:left;"
    "border-bottom:1px solid #eee;white-space:nowrap}"
    ".regbn-report tr.fusion td{background:#fde2e1;font-weight:bold}"
    ".regbn-report tr.regbn td{background:#fff6bf}"
    ".regbn-report tr.failed td{background:#f8b4b4}"
    ".regbn-report tr.noshape td{color:#999}"
    ".regbn-report .tag{border-radius:3px;padding:0 4px;margin-right:2px;color:#fff}"
    ".regbn-report .scroll{max-height:600px;overflow:auto}"
    ".regbn-report td.num{text-align:right}"
    "</style>"
)


def colours(report: Report) -> dict[str, str]:
    """Modality -> colour, in input order."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(report.modality_names)}


def html(report: Report) -> str:
    """The summary above a scrolling table of every node (no folding: a notebook scrolls)."""
    failed = report.failure.node_name if report.failure is not None else None
    rows = "".join(_html_row(report, row, failed) for row in report.rows)
    headers = HTML_HEADERS + (("dependence",) if report.dependence is not None else ())
    head = "".join(f"<th>{h}</th>" for h in headers)
    return (
        f'<div class="regbn-report">{_CSS}'
        + "".join(f"<div>{s}</div>" for s in _summary(report))
        + f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>'
        + rows
        + "</tbody></table></div></div>"
    )


def html_cells(report: Report, row: Row) -> list[str]:
    """One table row's cells, as HTML, a cell per `HTML_HEADERS` entry."""
    text = [
        row.label or row.name,
        row.module or "",
        row.layer,
        format_shape(row.shape_or_nested),
        dtype_name(row.dtype),
    ]
    cells = [f"<td>{escape(str(c))}</td>" for c in text] + [
        f"<td>{_tags(report, row.modalities)}</td>",
        f'<td class="num">{escape(format_count(row.params))}</td>',
    ]
    if report.dependence is not None:
        cells.append(_dependence_td(report, row))
    return cells


def _dependence_td(report: Report, row: Row) -> str:
    """The dependence cell: the value above chance, shaded as the picture shades the fusion."""
    measured = fusion_row(report, row.name) if row.is_fusion else None
    if measured is None:
        return '<td class="num dependence"></td>'
    colour = dependence_colour(measured.above_chance)
    return (
        f'<td class="num dependence" style="background:{colour}" '
        f'title="{escape(measured.summary())}">{escape(dependence_cell(measured))}</td>'
    )


def _html_row(report: Report, row: Row, failed: str | None) -> str:
    flags = (
        ("fusion", row.is_fusion),
        ("regbn", row.is_regbn),
        ("failed", row.name == failed),
        ("noshape", row.shape is None),
    )
    classes = " ".join(c for c, on in flags if on)
    return f'<tr class="{classes}">{"".join(html_cells(report, row))}</tr>'


def _tags(report: Report, modalities: frozenset[str]) -> str:
    """The modalities as coloured tags, in input order."""
    palette = colours(report)
    return "".join(
        f'<span class="tag" style="background:{palette.get(m, "#777")}">{escape(m)}</span>'
        for m in report.ordered(modalities)
    )


def _summary(report: Report) -> list[str]:
    """The summary's lines as HTML fragments."""
    s = report.overview
    out = [
        f"<b>{escape(s.model_name)}</b>: {s.nodes} nodes, "
        f"{s.total_params:,} parameters, {plural(len(s.fusions), 'fusion')}"
    ]
    if s.failure:
        out.append(f'<b style="color:#b00">{escape(s.failure)}</b>')
    out.append(
        "Inputs: "
        + ", ".join(
            f"{escape(i.name)} {_tags(report, frozenset([i.modality] if i.modality else []))}"
            f"{escape(format_shape(i.shape))}"
            for i in s.inputs
        )
    )
    out.append(
        "Parameters: " + "; ".join(f"{escape(label)}: {count:,}" for label, count in s.params)
    )
    for fusion, text in zip(s.fusions, s.fusion_lines, strict=True):
        measured = fusion_row(report, fusion.name)
        extra = f"; dependence {measured.summary()}" if measured is not None else ""
        out.append("Fusion: " + escape(text + extra))
    if report.dependence is not None:
        out.append(escape(DEPENDENCE_HELP))
    if s.pairs:
        out.append(f"<code>regbn.insert(model, pairs={escape(repr(s.pairs))}, ...)</code>")
    return out
