"""Cross-modal dependence in a report: what ``regbn.inspect(..., batches=...)`` adds.

`measure_fusions` runs `regbn.dependence.measure_graph` on the graph the report was built from
(nothing is traced twice), one pair per open fusion, as ``regbn.insert(..., pairs="auto")``
chooses it. The views then show, per fusion, the measure above chance (``r2 - r2_shuffled``:
the share of f's variance that g explains linearly beyond what a g of its rank explains of any
data). `fusion_row` and `line_row` find a fusion's row, `dependence_cell` writes the value and
`dependence_colour` maps it onto the pictures' colour ramp.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from torch import fx, nn

from .._dependence_core import DependenceReport, DependenceRow, check_batch, check_batches
from ..errors import RegBNTypeError, RegBNValueError
from .modality import Fusion

if TYPE_CHECKING:
    from .report import Line, Report

__all__ = [
    "DEPENDENCE_HELP",
    "RAMP",
    "dependence_cell",
    "dependence_colour",
    "fusion_row",
    "line_row",
    "measure_fusions",
]

CALLER = "regbn.inspect"
DEPENDENCE_HELP = (
    "dependence: r2 - r2 shuffled at the fusion, the share of f's variance g explains "
    "beyond chance (0: independent)"
)
# (value, colour) stops: pale blue at no dependence, pale yellow half way, orange at 1. Light
# enough that a box's black text stays readable.
RAMP = ((0.0, "#deebf7"), (0.5, "#fff7bc"), (1.0, "#fc8d59"))


def measure_fusions(
    gm: fx.GraphModule,
    fusions: Sequence[Fusion],
    batches: Iterable[Any],
    model: nn.Module,
    progress: bool = True,
) -> DependenceReport:
    """The dependence at each of ``fusions`` (those not at an inserted RegBN layer), measured
    on ``batches`` through ``gm``, the report's traced graph; a fusion whose RegBN W would pass
    the layer's ``max_projection_bytes`` is left out, as ``pairs="auto"`` leaves it out."""
    # regbn.dependence imports regbn.fx (analysis, tracing), whose package imports this module.
    from ..dependence import measure_graph, pairs_of_fusions

    pairs, names, skipped = pairs_of_fusions(fusions)
    if not pairs:
        # Still run the batches' checks, so a bad argument is refused with or without fusions.
        list(_checked(batches))
        return DependenceReport((), skipped=tuple(skipped))
    report = measure_graph(
        gm, pairs, batches, caller=CALLER, progress=progress, fusions=names, model=model
    )
    return DependenceReport(
        report.rows,
        report.lambda_rule,
        report.permutations,
        report.seed,
        report.max_samples,
        tuple(skipped),
    )


def _checked(batches: Iterable[Any]) -> Iterable[Any]:
    try:
        for i, batch in enumerate(check_batches(batches)):
            check_batch(batch, i)
            yield batch
    except (RegBNValueError, RegBNTypeError) as e:
        text = str(e).replace("regbn.measure_dependence: ", f"{CALLER}: ", 1)
        raise type(e)(text) from e


def fusion_row(report: Report, name: str) -> DependenceRow | None:
    """The measured row of fusion ``name``, or None (not measured, or no batches given)."""
    if report.dependence is None:
        return None
    return next((row for row in report.dependence.rows if row.fusion == name), None)


def line_row(report: Report, line: Line) -> DependenceRow | None:
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
