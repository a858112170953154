"""The report's data: what `regbn.inspect` found, one structure every view reads.

`Row` is one fx node, `Line` one displayed line (a node, or a module call folded into one),
`InputInfo` one model input and `Summary` what every view says beside its table (inputs,
parameters per modality branch, fusions, suggested pairs, where shape propagation stopped),
computed once (`ReportData.overview`). `ReportData` holds them all and folds rows into lines.

The views (`render_text`, `render_html`, `render_json`, `render_graph`) read these types and
the helpers they share (`cells`); this module imports none of them. `regbn.Report`
(`report.api`) is `ReportData` plus the methods that call the views.

A column of the views is one field of `Row` (and of `Line`, which folds rows: `_line_of`), plus
one cell in each renderer's row function (``table_cells``, ``markdown_cells``, ``html_cells``,
``node_label``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from ..._format import dtype_name, format_shape, one_line, plural, shape_to_json
from ...errors import RegBNValueError
from ..analysis import split_by_projection
from ..dependence import DependenceReport
from ..modality import Fusion
from ..shapes import ShapeFailure

__all__ = [
    "AUTO_MAX_ROWS",
    "InputInfo",
    "Line",
    "ReportData",
    "Row",
    "Summary",
    "failure_text",
    "param_items",
    "summarize",
]

# Row budget of the automatic folding: a table or picture longer than this folds module calls.
AUTO_MAX_ROWS = 60


@dataclass(frozen=True)
class Row:
    """One fx node of the inspected graph."""

    name: str
    module: str | None
    op: str
    target: str
    shape: tuple | None
    dtype: torch.dtype | None
    modalities: frozenset[str]
    is_fusion: bool
    # Beyond the documented row fields: what the views need.
    inputs: tuple[str, ...] = ()  # names of the nodes this one reads
    layer: str = ""  # short label: module class, function or method name
    params: int = 0  # parameters this node uses directly (a leaf module call, a get_attr)
    is_regbn: bool = False  # a RegBN layer inserted by regbn.insert
    # The module calls enclosing the node, outermost first, as (path, call index): folding
    # uses them so that two consecutive calls of one shared module stay two lines.
    calls: tuple[tuple[str, int], ...] = ()
    # For a node returning a tuple/list/dict of tensors (shape None): the shapes inside it.
    nested: Any = None
    # The name users see and `regbn.insert` accepts: input, module path, read, variable or node.
    label: str = ""

    @property
    def shape_or_nested(self) -> Any:
        return self.shape if self.shape is not None else self.nested

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label or self.name,
            "module": self.module,
            "op": self.op,
            "target": self.target,
            "layer": self.layer,
            "shape": shape_to_json(self.shape),
            "dtype": dtype_name(self.dtype),
            "modalities": sorted(self.modalities),
            "is_fusion": self.is_fusion,
            "is_regbn": self.is_regbn,
            "params": self.params,
            "inputs": list(self.inputs),
            "nested_shapes": shape_to_json(self.nested),
        }


@dataclass(frozen=True)
class InputInfo:
    """One model input (an entry of a dict/tuple input counts as its own input).

    ``modality`` is the modality it starts, or None for an input that joins what it gates (a
    mask, lengths).
    """

    name: str
    shape: tuple | None
    dtype: torch.dtype | None
    modality: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": shape_to_json(self.shape),
            "dtype": dtype_name(self.dtype),
            "modality": self.modality,
        }


@dataclass(frozen=True)
class Line:
    """One displayed line: a single node, or a folded module call (several nodes).

    ``is_fusion`` leaves out inserted RegBN layers: the fusion there is already normalised.
    """

    name: str
    module: str | None
    layer: str
    shape: tuple | None
    dtype: torch.dtype | None
    modalities: frozenset[str]
    is_fusion: bool
    is_regbn: bool
    params: int
    members: tuple[str, ...]
    op: str
    label: str = ""  # the name shown: the node's user-facing name, or the folded module's path

    @property
    def folded(self) -> bool:
        return len(self.members) > 1 or self.op == "module"

    @property
    def shown_module(self) -> str:
        """The enclosing module of a function's result; '' where the name says it already."""
        return "" if self.module in (None, self.label or self.name) else str(self.module)

    @property
    def layer_label(self) -> str:
        """The layer, with the number of nodes a folded module call holds."""
        return f"{self.layer} ({len(self.members)} nodes)" if self.folded else self.layer


@dataclass
class ReportData:
    """What ``regbn.inspect`` found: per-node rows, fusions and a summary; `regbn.Report`
    adds the views."""

    rows: list[Row]
    fusions: list[Fusion]
    failure: ShapeFailure | None = None  # where shape propagation stopped, if it did
    inputs: list[InputInfo] = field(default_factory=list)
    params_by_modality: dict[frozenset[str], int] = field(default_factory=dict)
    unused_params: int = 0
    model_name: str = "model"
    module_types: dict[str, str] = field(default_factory=dict)  # module path -> class name
    # The cross-modal dependence at each fusion (`regbn.inspect(..., batches=...)`), else None.
    dependence: DependenceReport | None = None

    # -- summary -------------------------------------------------------------------------

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The pairs ``regbn.insert`` would use for the fusions found (paste-ready).

        A fusion at an inserted RegBN layer (a patched model) is already normalised: no pair.
        """
        kept, _ = split_by_projection(self.open_fusions())
        return [(f.pair[0], f.pair[1]) for f in kept]

    @property
    def skipped(self) -> list[str]:
        """Why ``pairs="auto"`` would skip a fusion: its W would pass the layer's default
        ``max_projection_bytes`` (token-level features); each names smaller tensors to pair."""
        return split_by_projection(self.open_fusions())[1]

    def open_fusions(self) -> list[Fusion]:
        """The fusions not at an inserted RegBN layer."""
        regbn = {row.name for row in self.rows if row.is_regbn}
        return [f for f in self.fusions if f.name not in regbn]

    @property
    def total_params(self) -> int:
        return sum(self.params_by_modality.values()) + self.unused_params

    @cached_property
    def modality_names(self) -> list[str]:
        """Modalities in input order (the order their first node appears)."""
        seen: dict[str, None] = {i.modality: None for i in self.inputs if i.modality is not None}
        for row in self.rows:
            seen.update(dict.fromkeys(sorted(row.modalities)))
        return list(seen)

    @cached_property
    def _modality_order(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.modality_names)}

    def ordered(self, modalities: Iterable[str]) -> list[str]:
        """The given modalities in input order."""
        order = self._modality_order
        return sorted(modalities, key=lambda m: (order.get(m, len(order)), m))

    def label(self, name: str) -> str:
        """The name users see for the node named ``name`` (`Row.label`)."""
        for row in self.rows:
            if row.name == name:
                return row.label or name
        return name

    def modality_label(self, modalities: Iterable[str]) -> str:
        return "+".join(self.ordered(modalities)) or "-"

    @property
    def overview(self) -> Summary:
        """The summary every view shows (inputs, parameters, fusions, pairs), computed once."""
        return summarize(self)

    def failure_text(self) -> str:
        """One sentence naming where shape propagation stopped, or '' when it did not."""
        if self.failure is None:
            return ""
        return failure_text(self.failure, self.label(self.failure.node_name))

    # -- folding -------------------------------------------------------------------------

    def lines(
        self, depth: int | None = None, all_nodes: bool = False, max_rows: int = AUTO_MAX_ROWS
    ) -> list[Line]:
        """Displayed lines: every node (``all_nodes``), module calls folded below ``depth``,
        or (``depth=None``) the deepest folding that fits in ``max_rows`` lines."""
        if all_nodes:
            return self._fold(None)
        if depth is not None:
            if not isinstance(depth, int) or depth < 0:
                raise RegBNValueError(
                    f"regbn.inspect: depth must be an int >= 0 (0: top-level calls folded; "
                    f"None: automatic), got {depth!r}"
                )
            return self._fold(depth)
        return self._fold(self.auto_depth(max_rows))

    def auto_depth(self, max_rows: int = AUTO_MAX_ROWS) -> int | None:
        """The largest folding depth whose view fits ``max_rows`` (None: nothing to fold)."""
        if len(self.rows) <= max_rows:
            return None
        deepest = max((_path_depth(r.module) for r in self.rows), default=0)
        for depth in range(deepest, 0, -1):
            if len(self._fold(depth)) <= max_rows:
                return depth
        return 1

    def _fold(self, depth: int | None) -> list[Line]:
        if depth is None:
            return [self._line_of([row]) for row in self.rows]

        def key(indexed: tuple[int, Row]) -> tuple:
            i, row = indexed
            calls = row.calls or (((row.module, 0),) if row.module else ())
            if not calls or row.op in ("placeholder", "output"):
                return ("node", i)  # never folded
            # The innermost call at most `depth` deep; the outermost one if all are deeper.
            shallow = [c for c in calls if _path_depth(c[0]) <= depth]
            return ("module", shallow[-1] if shallow else calls[0])

        # Consecutive nodes only: a module call's nodes are contiguous in fx order, and folding
        # a contiguous run keeps the folded graph acyclic.
        lines: list[Line] = []
        for (kind, call), group in itertools.groupby(enumerate(self.rows), key=key):
            members = [row for _, row in group]
            path = call[0] if kind == "module" else None
            if kind == "node" or (len(members) == 1 and members[0].module == path):
                lines.extend(self._line_of([row]) for row in members)
            else:
                lines.append(self._line_of(members, path))
        return lines

    def _line_of(self, members: list[Row], path: str | None = None) -> Line:
        """The line of one node (``path`` None) or of the module call ``path`` folding
        ``members``: it shows the last computed output and the union of the modalities."""
        if path is None:
            last = members[-1]
            return Line(
                last.name,
                last.module,
                last.layer,
                last.shape_or_nested,
                last.dtype,
                last.modalities,
                last.is_fusion and not last.is_regbn,
                last.is_regbn,
                last.params,
                (last.name,),
                last.op,
                last.label or last.name,
            )
        out = ([r for r in members if r.op != "get_attr"] or members)[-1]
        return Line(
            path,
            path,
            self.module_types.get(path, "module"),
            out.shape_or_nested,
            out.dtype,
            frozenset().union(*(r.modalities for r in members)),
            any(r.is_fusion and not r.is_regbn for r in members),
            any(r.is_regbn for r in members),
            sum(r.params for r in members),
            tuple(r.name for r in members),
            "module",
            path,
        )

    def __repr__(self) -> str:
        state = "partial" if self.failure is not None else "complete"
        return (
            f"<regbn Report of {self.model_name}: {len(self.rows)} nodes, "
            f"{plural(len(self.fusions), 'fusion')}, {state}>"
        )


def _path_depth(path: str | None) -> int:
    return 0 if not path else path.count(".") + 1


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


def summarize(report: ReportData) -> Summary:
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


def param_items(report: ReportData) -> list[tuple[str, int]]:
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


def _pair_lines(report: ReportData, pairs: list[tuple[str, str]]) -> list[str]:
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


def _fusion_line(report: ReportData, fusion: Fusion) -> str:
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
