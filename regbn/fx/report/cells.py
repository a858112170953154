"""What the views share, none of them a view: the colours and the dependence cells.

`colours` gives each modality its colour (the table's tags, the picture's boxes) and
`text_colour` the text that reads on it. With batches (``regbn.inspect(..., batches=...)``),
each view shows, per fusion, the measure above chance (``r2 - r2_shuffled``: the share of f's
variance that g explains linearly beyond what a g of its rank explains of any data):
`fusion_row` and `line_row` find a fusion's row, `dependence_cell` writes the value and
`dependence_colour` maps it onto the pictures' colour ramp.
"""

from __future__ import annotations

from ..dependence import DependenceRow
from .data import Line, ReportData

__all__ = [
    "DEPENDENCE_HELP",
    "PALETTE",
    "RAMP",
    "colours",
    "dependence_cell",
    "dependence_colour",
    "fusion_row",
    "line_row",
    "text_colour",
]

DEPENDENCE_HELP = (
    "dependence: r2 - r2 shuffled at the fusion, the share of f's variance g explains "
    "beyond chance (0: independent)"
)
# (value, colour) stops: pale blue at no dependence, pale yellow half way, orange at 1. Light
# enough that a box's black text stays readable.
RAMP = ((0.0, "#deebf7"), (0.5, "#fff7bc"), (1.0, "#fc8d59"))

# One colour per modality, in input order (the graph views use them too).
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
)  # fmt: skip


def fusion_row(report: ReportData, name: str) -> DependenceRow | None:
    """The measured row of fusion ``name``, or None (not measured, or no batches given)."""
    if report.dependence is None:
        return None
    return next((row for row in report.dependence.rows if row.fusion == name), None)


def line_row(report: ReportData, line: Line) -> DependenceRow | None:
    """The row of a displayed line: of its fusion, or for a folded module call holding several,
    the one most dependent (it decides whether RegBN has anything to do there)."""
    if not line.is_fusion or report.dependence is None:
        return None
    rows = [row for name in line.members if (row := fusion_row(report, name)) is not None]
    return max(rows, key=lambda row: row.above_chance, default=None)


def dependence_cell(row: DependenceRow | None) -> str:
    """``+0.881`` (a saturated measure, rank(G) >= N-1, gets a ``*``), or '' without one."""
    if row is None:
        return ""
    return f"{row.above_chance:+.3f}" + ("*" if row.saturated else "")


def dependence_colour(value: float) -> str:
    """The ramp's colour at ``value`` (clipped to [0, 1]), linear between its stops."""
    x = min(max(value, 0.0), 1.0)
    for (x0, c0), (x1, c1) in zip(RAMP, RAMP[1:], strict=False):
        if x <= x1:
            t = (x - x0) / (x1 - x0)
            a, b = _rgb(c0), _rgb(c1)
            return "#" + "".join(f"{round(p + t * (q - p)):02x}" for p, q in zip(a, b, strict=True))
    return RAMP[-1][1]


def _rgb(colour: str) -> tuple[int, ...]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


def colours(report: ReportData) -> dict[str, str]:
    """Modality -> colour, in input order."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(report.modality_names)}


def text_colour(background: str) -> str:
    """Black or white, whichever reads better on ``background`` (``#rrggbb``)."""
    return (
        "#000000"
        if _contrast(background, "#000000") >= _contrast(background, "#ffffff")
        else ("#ffffff")
    )


def _luminance(colour: str) -> float:
    channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two ``#rrggbb`` colours."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)
