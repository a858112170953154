"""The summary of a report, computed once for every view (`Report.overview`).

The terminal table, the Markdown and the HTML view all show the model's inputs, its parameters
per modality branch, the fusions, the suggested pairs and, after a partial run, where shape
propagation stopped. `summarize` works these out; each view only lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._format import format_shape, one_line, plural
from .modality import Fusion
from .shapes import ShapeFailure

if TYPE_CHECKING:
    from .report import InputInfo, Report

__all__ = ["Summary", "failure_text", "summarize"]


@dataclass(frozen=True)
class Summary:
    """What every view says beside its table."""

    model_name: str
    nodes: int
    fusions: list[Fusion]
    inputs: list[InputInfo]
    total_params: int
    params: list[tuple[str, int]]  # (modality label, count), in input order
    normalised: frozenset[str]  # fusions at an inserted RegBN layer: already normalised
    fusion_lines: list[str]  # one sentence per fusion: operands, modalities, shapes, pair
    pairs: list[tuple[str, str]]
    pair_lines: list[str]  # 'f (modality) with respect to g (modality), at fusion'
    skipped: list[str]
    failure: str  # '' when shape propagation did not fail

    @property
    def headline(self) -> str:
        """``Model: 12 nodes, 1 fusion``."""
        return f"{self.model_name}: {self.nodes} nodes, {plural(len(self.fusions), 'fusion')}"


def summarize(report: Report) -> Summary:
    """The summary of ``report``."""
    pairs = report.pairs
    # A fusion of three or more branches is one fusion, described once per pair: listed once.
    fusions = list({f.name: f for f in reversed(report.fusions)}.values())[::-1]
    return Summary(
        model_name=report.model_name,
        nodes=len(report.rows),
        fusions=fusions,
        inputs=list(report.inputs),
        total_params=report.total_params,
        params=param_items(report),
        normalised=frozenset(row.name for row in report.rows if row.is_regbn),
        fusion_lines=[_fusion_line(report, f) for f in fusions],
        pairs=pairs,
        pair_lines=_pair_lines(report, pairs),
        skipped=report.skipped,
        failure=report.failure_text(),
    )


def param_items(report: Report) -> list[tuple[str, int]]:
    """(modality label, parameter count): single modalities first, in input order."""
    order = {name: i for i, name in enumerate(report.modality_names)}
    by_modality = report.params_by_modality
    keys = sorted(
        by_modality, key=lambda k: (len(k), sorted(order.get(m, len(order)) for m in k))
    )
    items = [(report.modality_label(k) if k else "(no input)", by_modality[k]) for k in keys]
    if report.unused_params:
        items.append(("(unused by forward)", report.unused_params))
    return items


def failure_text(fail: ShapeFailure | None, label: str | None = None) -> str:
    """One sentence naming where shape propagation stopped (``label``: the node's name as users
    see it), or '' when it did not."""
    if fail is None:
        return ""
    shapes = ", ".join(format_shape(s) for s in (fail.input_shapes or ()))
    label = label or fail.node_name
    target = f" ({fail.target})" if str(fail.target) != label else ""
    return (
        f"Shape propagation FAILED at {label!r}{target} "
        f"with input shapes [{shapes}]: {one_line(fail.message).rstrip('.')}. "
        "Rows after it have no shape."
    )


def _pair_lines(report: Report, pairs: list[tuple[str, str]]) -> list[str]:
    """'f (modality) with respect to g (modality), at fusion' for each suggested pair."""
    out = []
    modalities = {row.name: row.modalities for row in report.rows}
    for fusion in report.fusions:
        if tuple(fusion.pair) not in pairs:
            continue
        nodes = fusion.pair_nodes or fusion.pair
        first = modalities.get(nodes[0]) or fusion.modalities[0]
        second = modalities.get(nodes[1]) or next(m for m in fusion.modalities if m != first)
        out.append(
            f"{fusion.pair[0]} ({report.modality_label(first)}) with respect to "
            f"{fusion.pair[1]} ({report.modality_label(second)}), "
            f"at {report.label(fusion.name)}"
        )
    return list(dict.fromkeys(out))


def _fusion_line(report: Report, fusion: Fusion) -> str:
    operands = ", ".join(
        f"{op} {report.modality_label(m)} {format_shape(s)}"
        for op, m, s in zip(
            fusion.labels or fusion.operands, fusion.modalities, fusion.shapes, strict=False
        )
    )
    pair = tuple(fusion.pair)
    if fusion.kind == "regbn":
        return (
            f"{report.label(fusion.name)}: a RegBN layer, already normalising {pair[0]} "
            f"with respect to {pair[1]} ({operands})"
        )
    return f"{report.label(fusion.name)} [{fusion.kind}] of {operands} -> pair {pair!r}"
