"""Text views of a report: the terminal table (``str(report)``), its summary, and Markdown.

A column is one header here and one cell in `table_cells` (terminal) or `markdown_cells`. A
report measured on batches has one more column, the dependence at each fusion.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..._format import dtype_name, format_count, format_shape
from .cells import DEPENDENCE_HELP, dependence_cell, fusion_row, line_row

if TYPE_CHECKING:
    from .data import InputInfo, Line, ReportData

__all__ = ["markdown", "markdown_cells", "summary", "table", "table_cells"]

TABLE_HEADERS = ["", "node", "module", "layer", "output shape", "dtype", "modalities", "params"]
# (column, narrowest) in the order columns give up room, wrapping their cells: a long nested
# shape first, then the module path (blank where the name says it), which is also the column
# left out when that is not enough.
_SHRINK = [(4, 16), (2, 12), (3, 10), (6, 12), (1, 16)]
_OPTIONAL = 2
_RIGHT = {7}
_LEGEND = (
    ("*F", "*F fusion"),
    ("RB", "RB RegBN layer"),
    ("!!", "!! shape propagation failed here"),
)

MARKDOWN_HEADER = "| node / module | layer | output shape | dtype | modalities | params | |"
MARKDOWN_RULE = "|---|---|---|---|---|--:|---|"


# -- terminal table ------------------------------------------------------------------------


def table(report: ReportData, depth: int | None, all_nodes: bool, width: int | None) -> str:
    """An aligned text table (80-120 columns), its legend, then the summary."""
    width = width or _terminal_width()
    failed = report.failure.node_name if report.failure is not None else None
    lines = report.lines(depth, all_nodes)
    body = [table_cells(report, line, failed) for line in lines]
    headers, right = TABLE_HEADERS, _RIGHT
    if report.dependence is not None:
        headers, right = [*TABLE_HEADERS, "dependence"], {*_RIGHT, len(TABLE_HEADERS)}
        cells = [dependence_cell(line_row(report, line)) for line in lines]
        body = [[*row, cell] for row, cell in zip(body, cells, strict=True)]
    text = _format_table(
        headers, body, width, right_align=right, shrink=_SHRINK, optional=_OPTIONAL
    )
    marks = {row[0] for row in body}
    legend = "   ".join(text for mark, text in _LEGEND if mark in marks)
    if report.dependence is not None:
        legend = "\n".join(filter(None, [legend, _dependence_legend(report)]))
    parts = [report.failure_text()] if report.failure is not None else []
    parts += [text] + ([legend] if legend else []) + ["", summary(report)]
    return "\n".join(parts)


def table_cells(report: ReportData, line: Line, failed: str | None) -> list[str]:
    """One line of the terminal table, a cell per `TABLE_HEADERS` entry."""
    if failed in line.members:
        mark = "!!"
    else:
        mark = "RB" if line.is_regbn else "*F" if line.is_fusion else ""
    return [
        mark,
        line.label or line.name,
        line.shown_module,
        line.layer_label,
        format_shape(line.shape),
        dtype_name(line.dtype, short=True) or "-",
        report.modality_label(line.modalities),
        format_count(line.params),
    ]


def summary(report: ReportData) -> str:
    """Inputs, parameters per modality branch, fusions and the suggested pairs, as text."""
    s = report.overview
    inputs = [
        [i.name, format_shape(i.shape), dtype_name(i.dtype) or "-", _input_role(i)]
        for i in s.inputs
    ]
    params = [[label, f"{count:,}"] for label, count in s.params]
    lines = [s.headline]
    lines += ["Inputs"] + (_align(inputs) if inputs else ["  (none)"])
    lines += [f"Parameters per modality branch ({s.total_params:,} total)"]
    lines += _align(params, right={1})
    lines += [f"Fusions ({len(s.fusions)})"]
    for fusion in s.fusions:
        where = f" in {fusion.module}" if fusion.module else ""
        if fusion.kind == "regbn":
            lines.append(
                f"  {report.label(fusion.name)} [regbn]{where}: a RegBN layer, already "
                f"normalising {fusion.pair[0]} with respect to {fusion.pair[1]}"
            )
        else:
            out = format_shape(fusion.output_shape)
            lines.append(f"  {report.label(fusion.name)} [{fusion.kind}]{where} -> {out}")
        operands = [
            [name, report.modality_label(mods), format_shape(shape)]
            for name, mods, shape in zip(
                fusion.labels or fusion.operands, fusion.modalities, fusion.shapes, strict=False
            )
        ]
        lines += _align(operands, indent=6)
        measured = fusion_row(report, fusion.name)
        if measured is not None:
            lines.append(f"      dependence: {measured.summary()}")
    if s.pairs:
        lines += ["Suggested pairs for regbn.insert", f"  pairs={s.pairs!r}"]
        lines += [f"    {text}" for text in s.pair_lines]
    if s.skipped:
        lines += ["Left out of the suggested pairs"] + [f"  {m}" for m in s.skipped]
    if s.failure:
        lines.append(s.failure)
    return "\n".join(lines)


def _dependence_legend(report: ReportData) -> str:
    """What the dependence column means, and on how many samples it was measured."""
    dep = report.dependence
    if dep is None or not dep.rows:
        return "dependence: no fusion measured (none found, or every one left out of the pairs)"
    saturated = any(row.saturated for row in dep.rows)
    return (
        f"{DEPENDENCE_HELP}; N {dep.rows[0].n_samples}"
        + ("; *: rank(G) >= N-1, measure more samples" if saturated else "")
    )


def _input_role(info: InputInfo) -> str:
    if info.modality is None:
        return "no modality of its own (joins what it gates)"
    return "" if info.modality == info.name else f"modality {info.modality}"


# -- Markdown ------------------------------------------------------------------------------


def markdown(report: ReportData, depth: int | None, all_nodes: bool) -> str:
    """A GitHub-flavoured Markdown table plus the summary as a list."""
    s = report.overview
    out = [f"### {_md(s.model_name)}", ""]
    if s.failure:
        out += [f"> **{_md(s.failure)}**", ""]
    measured = report.dependence is not None
    out += [MARKDOWN_HEADER + (" dependence |" if measured else "")]
    out += [MARKDOWN_RULE + ("--:|" if measured else "")]
    for line in report.lines(depth, all_nodes):
        cells = markdown_cells(report, line)
        if measured:
            cells.append(dependence_cell(line_row(report, line)))
        out.append("| " + " | ".join(_md(v) for v in cells) + " |")
    out += [
        "",
        "**Inputs**: " + ", ".join(f"`{_md(i.name)}` {format_shape(i.shape)}" for i in s.inputs),
        "",
    ]
    out.append(
        f"**Parameters**: {s.total_params:,} total; "
        + "; ".join(f"{_md(label)}: {count:,}" for label, count in s.params)
    )
    out += ["", f"**Fusions**: {len(s.fusions)}"]
    for fusion, text in zip(s.fusions, s.fusion_lines, strict=True):
        row = fusion_row(report, fusion.name)
        out.append(f"- {_md(text)}" + (f"; dependence {_md(row.summary())}" if row else ""))
    if measured:
        out += ["", _md(_dependence_legend(report))]
    if s.pairs:
        out += ["", f"Suggested: `regbn.insert(model, pairs={s.pairs!r}, ...)`"]
    return "\n".join(out) + "\n"


def markdown_cells(report: ReportData, line: Line) -> list[object]:
    """One row of the Markdown table, a cell per column of `MARKDOWN_HEADER`."""
    return [
        f"`{line.label or line.name}`",
        line.layer,
        format_shape(line.shape),
        dtype_name(line.dtype),
        report.modality_label(line.modalities),
        format_count(line.params),
        "**fusion**" if line.is_fusion else "RegBN" if line.is_regbn else "",
    ]


def _md(value: object) -> str:
    """A Markdown table cell: pipes escaped, on one line."""
    return str(value).replace("|", "\\|").replace("\n", " ")


# -- layout --------------------------------------------------------------------------------


def _format_table(
    headers: list[str],
    body: list[list[str]],
    width: int,
    right_align: set[int] | frozenset[int] = frozenset(),
    shrink: Sequence[tuple[int, int]] = (),
    optional: int | None = None,
) -> str:
    """Aligned columns that fit ``width``; a cell wider than its column wraps onto the next
    lines (at dots, commas or underscores), so no name is ever cut.

    ``shrink`` lists (column, narrowest) in the order columns give up room; if that is not
    enough the ``optional`` column is left out, and then the widest column shrinks further.
    """
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    sep = 2
    excess = sum(widths) + sep * (len(widths) - 1) - width
    for i, narrowest in shrink:
        cut = max(0, min(excess, widths[i] - max(narrowest, len(headers[i]))))
        widths[i] -= cut
        excess -= cut
    if excess > 0 and optional is not None:
        keep = [i for i in range(len(headers)) if i != optional]
        renumber = {old: new for new, old in enumerate(keep)}
        return _format_table(
            [headers[i] for i in keep],
            [[row[i] for i in keep] for row in body],
            width,
            {renumber[i] for i in right_align if i in renumber},
            [(renumber[i], n) for i, n in shrink if i in renumber],
        )
    minimum = [max(len(h), 6) for h in headers]
    while excess > 0:
        i = max(range(len(widths)), key=lambda j: widths[j] - minimum[j])
        if widths[i] <= minimum[i]:
            break
        widths[i] -= 1
        excess -= 1

    def fmt(cells: list[str]) -> list[str]:
        pieces = [_wrap(cell, widths[i]) for i, cell in enumerate(cells)]
        out = []
        for k in range(max(len(p) for p in pieces)):
            parts = []
            for i, piece in enumerate(pieces):
                cell = piece[k] if k < len(piece) else ""
                parts.append(cell.rjust(widths[i]) if i in right_align else cell.ljust(widths[i]))
            out.append((" " * sep).join(parts).rstrip())
        return out

    rule = "-" * min(width, sum(widths) + sep * (len(widths) - 1))
    lines = [*fmt(headers), rule]
    for row in body:
        lines += fmt(row)
    return "\n".join([*lines, rule])


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in pieces of at most ``width`` characters, broken after a '.', ', ' or '_'
    where one falls in the piece (``gray_net.`` / ``conv1``); nothing is dropped."""
    pieces = []
    while len(text) > width:
        cut = max(text.rfind(c, 0, width) for c in "._, ") + 1
        if cut <= width // 3:  # no break point in reach: split the word itself
            cut = width
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return [*pieces, text]


def _terminal_width() -> int:
    return max(80, min(120, shutil.get_terminal_size((100, 24)).columns))


def _align(
    rows: list[list[str]], indent: int = 2, right: set[int] | frozenset[int] = frozenset()
) -> list[str]:
    """Rows of cells as aligned text lines (the summary's small tables)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))] if rows else []
    return [
        " " * indent
        + "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]
