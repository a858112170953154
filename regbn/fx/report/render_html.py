"""The notebook view of a report (``report._repr_html_()``): the summary and the fusion rows
first, then the graph folded by module depth and every node, each in a collapsed ``<details>``.

A column is one header in `HTML_HEADERS` and one cell in `html_cells`. A report measured on
batches has one more column, the dependence at each fusion, shaded by its value. Every marked
row sets its own background and text colour, so it reads the same in light and dark themes.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from ..._format import dtype_name, format_count, format_shape, plural
from .cells import (
    DEPENDENCE_HELP,
    colours,
    dependence_cell,
    dependence_colour,
    fusion_row,
    line_row,
    text_colour,
)

if TYPE_CHECKING:
    from .data import Line, ReportData

__all__ = ["html", "html_cells"]

HTML_HEADERS = ("node", "module", "layer", "output shape", "dtype", "modalities", "params")

# Marked rows carry their own background and text colour, and JupyterLab's right alignment and
# centred, fixed-layout tables are overridden: readable in light and dark themes alike. Rows
# without a mark take the theme's colours.
_MARKS = {
    "fusion": ("#fde2e1", "#5c0b0b"),
    "regbn": ("#fff3bf", "#3d2f00"),
    "failed": ("#f8b4b4", "#4d0000"),
}
_CSS = (
    "<style>"
    ".regbn-report{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;"
    "font-size:12px;line-height:1.45;text-align:left}"
    ".regbn-report table{border-collapse:collapse;table-layout:auto!important;"
    "margin:4px 0 8px 0!important}"
    ".regbn-report th,.regbn-report td,.regbn-report tr{text-align:left!important;"
    "padding:2px 8px!important;white-space:nowrap!important;vertical-align:top!important}"
    ".regbn-report th{border-bottom:1px solid rgba(128,128,128,.5)}"
    ".regbn-report td.num{text-align:right!important}"
    + "".join(
        f".regbn-report tr.{mark} td{{background:{bg}!important;color:{fg}!important}}"
        for mark, (bg, fg) in _MARKS.items()
    )
    + ".regbn-report tr.fusion td{font-weight:bold}"
    ".regbn-report tr.noshape td{opacity:.7}"
    ".regbn-report .tag{border-radius:3px;padding:0 4px;margin-right:2px;font-weight:normal}"
    ".regbn-report details{margin:4px 0}"
    ".regbn-report summary{cursor:pointer}"
    ".regbn-report .line{margin:1px 0}"
    "</style>"
)


def html(report: ReportData) -> str:
    """The summary and the key rows (fusions, RegBN layers, where shapes failed) first; the
    graph folded by module depth and every node below, each in a collapsed ``<details>``."""
    failed = report.failure.node_name if report.failure is not None else None
    headers = HTML_HEADERS + (("dependence",) if report.dependence is not None else ())
    every = report.lines(all_nodes=True)
    key = [line for line in every if line.is_fusion or line.is_regbn or failed in line.members]
    depth = report.auto_depth()
    folded = report.lines()
    parts = [f'<div class="regbn-report">{_CSS}']
    parts += [f'<div class="line">{s}</div>' for s in _summary(report)]
    if key:
        parts.append(_table(report, headers, key, failed))
    if depth is not None and len(folded) < len(every):
        parts.append(
            f"<details><summary>The graph, module calls folded below depth {depth} "
            f"({len(folded)} lines)</summary>{_table(report, headers, folded, failed)}</details>"
        )
    parts.append(
        f"<details><summary>Every node ({len(every)})</summary>"
        f"{_table(report, headers, every, failed)}</details></div>"
    )
    return "".join(parts)


def _table(
    report: ReportData, headers: tuple[str, ...], lines: list[Line], failed: str | None
) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(_html_row(report, line, failed) for line in lines)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_cells(report: ReportData, line: Line) -> list[str]:
    """One table row's cells, as HTML, a cell per `HTML_HEADERS` entry."""
    text = [
        line.label or line.name,
        line.shown_module,
        line.layer_label,
        format_shape(line.shape),
        dtype_name(line.dtype) or "",
    ]
    cells = [f"<td>{escape(str(c))}</td>" for c in text] + [
        f"<td>{_tags(report, line.modalities)}</td>",
        f'<td class="num">{escape(format_count(line.params))}</td>',
    ]
    if report.dependence is not None:
        cells.append(_dependence_td(report, line))
    return cells


def _dependence_td(report: ReportData, line: Line) -> str:
    """The dependence cell: the value above chance, shaded as the picture shades the fusion."""
    measured = line_row(report, line) if line.is_fusion else None
    if measured is None:
        return '<td class="num dependence"></td>'
    colour = dependence_colour(measured.above_chance)
    return (
        f'<td class="num dependence" style="background:{colour}!important;'
        f'color:{text_colour(colour)}!important" title="{escape(measured.summary())}">'
        f"{escape(dependence_cell(measured))}</td>"
    )


def _html_row(report: ReportData, line: Line, failed: str | None) -> str:
    flags = (
        ("fusion", line.is_fusion),
        ("regbn", line.is_regbn),
        ("failed", failed in line.members),
        ("noshape", line.shape is None and not line.is_regbn and failed not in line.members),
    )
    classes = " ".join(c for c, on in flags if on)
    return f'<tr class="{classes}">{"".join(html_cells(report, line))}</tr>'


def _tags(report: ReportData, modalities: frozenset[str]) -> str:
    """The modalities as coloured tags, in input order."""
    palette = colours(report)
    spans = []
    for m in report.ordered(modalities):
        bg = palette.get(m, "#777777")
        spans.append(
            f'<span class="tag" style="background:{bg};color:{text_colour(bg)}">{escape(m)}</span>'
        )
    return "".join(spans)


def _summary(report: ReportData) -> list[str]:
    """The summary's lines as HTML fragments."""
    s = report.overview
    out = [
        f"<b>{escape(s.model_name)}</b>: {s.nodes} nodes, "
        f"{s.total_params:,} parameters, {plural(len(s.fusions), 'fusion')}"
    ]
    if s.failure:
        bg, fg = _MARKS["failed"]
        out.append(f'<b style="background:{bg};color:{fg};padding:0 4px">{escape(s.failure)}</b>')
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
