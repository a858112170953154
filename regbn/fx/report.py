"""Shape inspection: ``regbn.inspect`` and the :class:`Report` it returns.

The report is built from a graph that the shared fx passes already annotated (tracing records
``regbn_module``, shape propagation ``regbn_shape``/``regbn_dtype``, modality analysis
``regbn_modalities``), so inspection sees exactly what ``regbn.insert`` sees.

Views: ``str(report)`` (terminal table), ``_repr_html_`` (notebooks), ``to_dict`` (JSON),
``to_markdown``, ``to_dot`` (Graphviz text) and ``draw`` (SVG/PNG with networkx + matplotlib).
"""

from __future__ import annotations

import html
import itertools
import operator
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from .analysis import analyse, split_by_projection
from .modality import Fusion, input_labels
from .shapes import ShapeFailure
from .tracing import is_regbn

__all__ = ["Report", "Row", "inspect"]

# Row budget of the automatic folding: a table or picture longer than this folds module calls.
AUTO_MAX_ROWS = 60
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
)  # fmt: skip
_NO_MODALITY_COLOUR = "#d9d9d9"
_FUSION_COLOUR = "#d62728"
_REGBN_COLOUR = "#ffd700"


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


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

    @property
    def shape_or_nested(self) -> Any:
        return self.shape if self.shape is not None else self.nested

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "op": self.op,
            "target": self.target,
            "layer": self.layer,
            "shape": _shape_to_json(self.shape),
            "dtype": _dtype_str(self.dtype),
            "modalities": sorted(self.modalities),
            "is_fusion": self.is_fusion,
            "is_regbn": self.is_regbn,
            "params": self.params,
            "inputs": list(self.inputs),
            "nested_shapes": _shape_to_json(self.nested),
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

    @property
    def folded(self) -> bool:
        return len(self.members) > 1 or self.op == "module"


@dataclass
class Report:
    """What ``regbn.inspect`` found: per-node rows, fusions, a summary and several views."""

    rows: list[Row]
    fusions: list[Fusion]
    failure: ShapeFailure | None = None  # where shape propagation stopped, if it did
    inputs: list[InputInfo] = field(default_factory=list)
    params_by_modality: dict[frozenset[str], int] = field(default_factory=dict)
    unused_params: int = 0
    model_name: str = "model"
    module_types: dict[str, str] = field(default_factory=dict)  # module path -> class name

    # -- summary -------------------------------------------------------------------------

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The pairs ``regbn.insert`` would use for the fusions found (paste-ready).

        A fusion at an inserted RegBN layer (a patched model) is already normalised: no pair.
        """
        regbn = {row.name for row in self.rows if row.is_regbn}
        kept, _ = split_by_projection([f for f in self.fusions if f.name not in regbn])
        return [tuple(f.pair) for f in kept]

    @property
    def skipped(self) -> list[str]:
        """Why ``pairs="auto"`` would skip a fusion: its W would pass the layer's default
        ``max_projection_bytes`` (token-level features); each names smaller tensors to pair."""
        regbn = {row.name for row in self.rows if row.is_regbn}
        return split_by_projection([f for f in self.fusions if f.name not in regbn])[1]

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

    def modality_label(self, modalities: Iterable[str]) -> str:
        return "+".join(self.ordered(modalities)) or "-"

    def summary(self) -> str:
        """Inputs, parameters per modality branch, fusions and the suggested pairs."""
        inputs = [
            [i.name, _fmt_shape(i.shape), _dtype_str(i.dtype) or "-", self._input_role(i)]
            for i in self.inputs
        ]
        params = [[label, f"{count:,}"] for label, count in self._param_items()]
        lines = [
            f"{self.model_name}: {len(self.rows)} nodes, {_plural(len(self.fusions), 'fusion')}"
        ]
        lines += ["Inputs"] + (_align(inputs) if inputs else ["  (none)"])
        lines += [f"Parameters per modality branch ({self.total_params:,} total)"]
        lines += _align(params, right={1})
        lines += [f"Fusions ({len(self.fusions)})"]
        regbn = {row.name for row in self.rows if row.is_regbn}
        for fusion in self.fusions:
            where = f" in {fusion.module}" if fusion.module else ""
            out = fusion.output_shape
            done = "  (a RegBN layer: already normalised)" if fusion.name in regbn else ""
            lines.append(f"  {fusion.name} [{fusion.kind}]{where} -> {_fmt_shape(out)}{done}")
            operands = [
                [name, self.modality_label(mods), _fmt_shape(shape)]
                for name, mods, shape in zip(
                    fusion.operands, fusion.modalities, fusion.shapes, strict=False
                )
            ]
            lines += _align(operands, indent=6)
        if self.pairs:
            lines += ["Suggested pairs for regbn.insert", f"  pairs={self.pairs!r}"]
            lines += [f"    {text}" for text in self._pair_lines()]
        if self.skipped:
            lines += ["Left out of the suggested pairs"] + [f"  {m}" for m in self.skipped]
        if self.failure is not None:
            lines.append(self.failure_text())
        return "\n".join(lines)

    @staticmethod
    def _input_role(info: InputInfo) -> str:
        if info.modality is None:
            return "no modality of its own (joins what it gates)"
        return "" if info.modality == info.name else f"modality {info.modality}"

    def _pair_lines(self) -> list[str]:
        """'f (modality) with respect to g (modality), at fusion' for each suggested pair."""
        out = []
        for fusion in self.fusions:
            if tuple(fusion.pair) not in self.pairs:
                continue
            first = fusion.modalities[0]
            second = next(m for m in fusion.modalities if m != first)
            out.append(
                f"{fusion.pair[0]} ({self.modality_label(first)}) with respect to "
                f"{fusion.pair[1]} ({self.modality_label(second)}), at {fusion.name}"
            )
        return list(dict.fromkeys(out))

    def failure_text(self) -> str:
        """One sentence naming where shape propagation stopped, or '' when it did not."""
        fail = self.failure
        if fail is None:
            return ""
        shapes = ", ".join(_fmt_shape(s) for s in (fail.input_shapes or ()))
        return (
            f"Shape propagation FAILED at node {fail.node_name!r} ({fail.target}) "
            f"with input shapes [{shapes}]: {_one_line(fail.message).rstrip('.')}. "
            "Rows after it have no shape."
        )

    def _param_items(self) -> list[tuple[str, int]]:
        order = self._modality_order
        keys = sorted(
            self.params_by_modality,
            key=lambda k: (len(k), sorted(order.get(m, len(order)) for m in k)),
        )
        items = [
            (self.modality_label(k) if k else "(no input)", self.params_by_modality[k])
            for k in keys
        ]
        if self.unused_params:
            items.append(("(unused by forward)", self.unused_params))
        return items

    def _fusion_line(self, fusion: Fusion) -> str:
        operands = ", ".join(
            f"{op} {self.modality_label(m)} {_fmt_shape(s)}"
            for op, m, s in zip(fusion.operands, fusion.modalities, fusion.shapes, strict=False)
        )
        return f"{fusion.name} [{fusion.kind}] of {operands} -> pair {tuple(fusion.pair)!r}"

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
                raise ValueError(
                    f"depth must be an int >= 0 (0: top-level calls folded; None: automatic), "
                    f"got {depth!r}"
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
        lines = []
        for (kind, call), group in itertools.groupby(enumerate(self.rows), key=key):
            members = [row for _, row in group]
            path = call[0] if kind == "module" else None
            if kind == "node" or (len(members) == 1 and members[0].module == path):
                lines.extend(self._line_of([row]) for row in members)
            else:
                lines.append(self._line_of(members, path))
        return lines

    def _line_of(self, members: list[Row], path: str | None = None) -> Line:
        last = members[-1]
        if path is None:
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
            )
        shaped = [r for r in members if r.op != "get_attr"] or members
        out = shaped[-1]
        modalities = frozenset().union(*(r.modalities for r in members))
        kind = self.module_types.get(path, "module")
        return Line(
            path,
            path,
            kind,
            out.shape_or_nested,
            out.dtype,
            modalities,
            any(r.is_fusion and not r.is_regbn for r in members),
            any(r.is_regbn for r in members),
            sum(r.params for r in members),
            tuple(r.name for r in members),
            "module",
        )

    # -- text views ----------------------------------------------------------------------

    def table(
        self, depth: int | None = None, all_nodes: bool = False, width: int | None = None
    ) -> str:
        """An aligned text table (80-120 columns) followed by the summary."""
        width = width or _terminal_width()
        failed = self.failure.node_name if self.failure is not None else None
        body = []
        for line in self.lines(depth, all_nodes):
            if failed in line.members:
                mark = "!!"
            else:
                mark = "RB" if line.is_regbn else "*F" if line.is_fusion else ""
            node = f"({len(line.members)} nodes)" if line.folded else line.name
            body.append(
                [
                    mark,
                    node,
                    line.module or "",
                    line.layer,
                    _fmt_shape(line.shape),
                    _dtype_str(line.dtype, short=True),
                    self.modality_label(line.modalities),
                    _fmt_params(line.params),
                ]
            )
        headers = ["", "node", "module", "layer", "output shape", "dtype", "modalities", "params"]
        # The module path mostly repeats the node name, so it gives up room first.
        shrink = [(2, 12), (3, 10), (6, 12), (1, 16), (4, 14)]
        text = _format_table(headers, body, width, right_align={7}, shrink=shrink, optional=2)
        marks = {row[0] for row in body}
        legend = "   ".join(
            text
            for mark, text in (
                ("*F", "*F fusion"),
                ("RB", "RB RegBN layer"),
                ("!!", "!! shape propagation failed here"),
            )
            if mark in marks
        )
        parts = [self.failure_text()] if self.failure is not None else []
        parts += [text] + ([legend] if legend else []) + ["", self.summary()]
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        state = "partial" if self.failure is not None else "complete"
        return (
            f"<regbn Report of {self.model_name}: {len(self.rows)} nodes, "
            f"{_plural(len(self.fusions), 'fusion')}, {state}>"
        )

    def to_markdown(self, depth: int | None = None, all_nodes: bool = False) -> str:
        """A GitHub-flavoured Markdown table plus the summary as a list."""

        def cell(value: object) -> str:
            return str(value).replace("|", "\\|").replace("\n", " ")

        out = [f"### {cell(self.model_name)}", ""]
        if self.failure is not None:
            out += [f"> **{cell(self.failure_text())}**", ""]
        out.append("| node / module | layer | output shape | dtype | modalities | params | |")
        out.append("|---|---|---|---|---|--:|---|")
        for line in self.lines(depth, all_nodes):
            mark = "**fusion**" if line.is_fusion else "RegBN" if line.is_regbn else ""
            values = [
                f"`{line.name}`",
                line.layer,
                _fmt_shape(line.shape),
                _dtype_str(line.dtype),
                self.modality_label(line.modalities),
                _fmt_params(line.params),
                mark,
            ]
            out.append("| " + " | ".join(cell(v) for v in values) + " |")
        out += [
            "",
            "**Inputs**: "
            + ", ".join(f"`{cell(i.name)}` {_fmt_shape(i.shape)}" for i in self.inputs),
            "",
        ]
        out.append(
            f"**Parameters**: {self.total_params:,} total; "
            + "; ".join(f"{cell(label)}: {count:,}" for label, count in self._param_items())
        )
        out += ["", f"**Fusions**: {len(self.fusions)}"]
        out += [f"- {cell(self._fusion_line(f))}" for f in self.fusions]
        if self.pairs:
            out += ["", f"Suggested: `regbn.insert(model, pairs={self.pairs!r}, ...)`"]
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists, strings, numbers, None only)."""
        fail = self.failure
        return {
            "model": self.model_name,
            "inputs": [
                {
                    "name": i.name,
                    "shape": _shape_to_json(i.shape),
                    "dtype": _dtype_str(i.dtype),
                    "modality": i.modality,
                }
                for i in self.inputs
            ],
            "rows": [row.to_dict() for row in self.rows],
            "fusions": [_fusion_to_dict(f) for f in self.fusions],
            "pairs": [list(p) for p in self.pairs],
            "skipped": list(self.skipped),
            "parameters": {
                "total": self.total_params,
                "by_modality": {label: n for label, n in self._param_items()},
            },
            "failure": None
            if fail is None
            else {
                "node": fail.node_name,
                "target": str(fail.target),
                "input_shapes": [_shape_to_json(s) for s in fail.input_shapes or ()],
                "message": str(fail.message),
            },
        }

    # -- HTML ----------------------------------------------------------------------------

    def _repr_html_(self) -> str:
        """A styled table for notebooks: every node, grouped by module, modalities as tags."""
        esc = html.escape
        colours = self._colours()
        css = (
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

        def tags(modalities: frozenset[str]) -> str:
            names = self.ordered(modalities)
            return "".join(
                f'<span class="tag" style="background:{colours.get(m, "#777")}">{esc(m)}</span>'
                for m in names
            )

        failed = self.failure.node_name if self.failure is not None else None
        rows_html = []
        for row in self.rows:
            classes = [
                c
                for c, on in (
                    ("fusion", row.is_fusion),
                    ("regbn", row.is_regbn),
                    ("failed", row.name == failed),
                    ("noshape", row.shape is None),
                )
                if on
            ]
            cells = [
                row.name,
                row.module or "",
                row.layer,
                _fmt_shape(row.shape_or_nested),
                _dtype_str(row.dtype),
            ]
            tds = "".join(f"<td>{esc(str(c))}</td>" for c in cells)
            tds += f"<td>{tags(row.modalities)}</td>"
            tds += f'<td class="num">{esc(_fmt_params(row.params))}</td>'
            rows_html.append(f'<tr class="{" ".join(classes)}">{tds}</tr>')
        head = "".join(
            f"<th>{h}</th>"
            for h in ("node", "module", "layer", "output shape", "dtype", "modalities", "params")
        )

        summary = [
            f"<b>{esc(self.model_name)}</b>: {len(self.rows)} nodes, "
            f"{self.total_params:,} parameters, {_plural(len(self.fusions), 'fusion')}"
        ]
        if self.failure is not None:
            summary.append(f'<b style="color:#b00">{esc(self.failure_text())}</b>')
        summary.append(
            "Inputs: "
            + ", ".join(
                f"{esc(i.name)} {tags(frozenset([i.modality] if i.modality else []))}"
                f"{esc(_fmt_shape(i.shape))}"
                for i in self.inputs
            )
        )
        summary.append(
            "Parameters: "
            + "; ".join(f"{esc(label)}: {count:,}" for label, count in self._param_items())
        )
        for fusion in self.fusions:
            summary.append("Fusion: " + esc(self._fusion_line(fusion)))
        if self.pairs:
            summary.append(f"<code>regbn.insert(model, pairs={esc(repr(self.pairs))}, ...)</code>")
        return (
            f'<div class="regbn-report">{css}'
            + "".join(f"<div>{s}</div>" for s in summary)
            + f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>'
            + "".join(rows_html)
            + "</tbody></table></div></div>"
        )

    def _colours(self) -> dict[str, str]:
        return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(self.modality_names)}

    # -- graph views ---------------------------------------------------------------------

    def graph(self, depth: int | None = None, all_nodes: bool = False) -> nx.DiGraph:
        """The (folded) dataflow graph, one networkx node per displayed line.

        Parameter reads (get_attr) are left out: they are sources that would crowd the top.
        """
        lines = self.lines(depth, all_nodes)
        ids = _unique_ids(lines)
        owner = {m: key for line, key in zip(lines, ids, strict=True) for m in line.members}
        by_name = {row.name: row for row in self.rows}
        g = nx.DiGraph()
        for line, key in zip(lines, ids, strict=True):
            if all(by_name[m].op == "get_attr" for m in line.members):
                continue
            g.add_node(key, line=line)
        for row in self.rows:
            head = owner[row.name]
            for src in row.inputs:
                tail = owner.get(src)
                if tail is not None and tail != head and tail in g and head in g:
                    g.add_edge(tail, head)
        return g

    def to_dot(self, depth: int | None = None, all_nodes: bool = False) -> str:
        """Graphviz text (``dot -Tsvg``) of the folded graph."""
        g = self.graph(depth, all_nodes)
        colours = self._colours()

        def q(text: str) -> str:
            return f'"{_escape_dot_label(text)}"'

        out = [
            f"digraph {q(self.model_name)} {{",
            "  rankdir=TB;",
            '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=9];',
        ]
        for name, data in g.nodes(data=True):
            line: Line = data["line"]
            label = "\\n".join(_escape_dot_label(s) for s in self._node_label(line))
            fill = _REGBN_COLOUR if line.is_regbn else self._fill(line.modalities, colours)
            extra = f', color="{_FUSION_COLOUR}", penwidth=3' if line.is_fusion else ""
            out.append(f'  {q(name)} [label="{label}", fillcolor="{fill}"{extra}];')
        for u, v in g.edges:
            out.append(f"  {q(u)} -> {q(v)};")
        out.append("}")
        return "\n".join(out) + "\n"

    def _node_label(self, line: Line) -> list[str]:
        layer = f"{line.layer} ({len(line.members)} nodes)" if line.folded else line.layer
        label = [line.name, layer, _fmt_shape(line.shape)]
        if line.is_fusion:
            label.append("FUSION")
        if line.is_regbn:
            label.append("RegBN")
        return label

    def _fill(self, modalities: frozenset[str], colours: dict[str, str]) -> str:
        if not modalities:
            return _NO_MODALITY_COLOUR
        # Mixed branches get the lightened mean of their modalities' colours.
        rgb = [_hex_to_rgb(colours.get(m, "#777777")) for m in modalities]
        mean = [sum(c[i] for c in rgb) / len(rgb) for i in range(3)]
        return _rgb_to_hex([0.55 * x + 0.45 for x in mean])

    def draw(self, path: str | Path, depth: int | None = None, all_nodes: bool = False) -> Path:
        """Write the graph as SVG or PNG (by suffix), laid out from inputs (top) to outputs.

        Nodes are coloured by modality, fusions have a red frame, RegBN layers are gold, and
        every node shows its output shape. ``depth`` folds module calls (None: automatic).
        """
        path = Path(path)
        fmt = path.suffix.lower().lstrip(".")
        if fmt not in ("svg", "png"):
            raise ValueError(f"draw() writes .svg or .png, got {path.name!r}")
        from matplotlib.figure import Figure  # optional dependency, imported on use
        from matplotlib.patches import Patch

        g = self.graph(depth, all_nodes)
        pos, n_layers, widest = _layered_positions(g)
        colours = self._colours()
        fig_w = min(max(6.0, 2.4 * widest), 60.0)
        fig_h = max(3.0, 0.75 * n_layers + 1.0)
        # Agg cannot render beyond 2**16 px a side; long graphs get a lower dpi instead.
        dpi = min(100.0, 30000.0 / max(fig_w, fig_h))
        fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
        ax = fig.add_axes((0.01, 0.01, 0.98, 0.95))
        ax.set_axis_off()
        ax.set_xlim(-0.6, max(widest, 1) - 0.4)
        ax.set_ylim(-n_layers + 0.4, 0.6)

        texts = {}
        for name, data in g.nodes(data=True):
            line: Line = data["line"]
            fill = _REGBN_COLOUR if line.is_regbn else self._fill(line.modalities, colours)
            edge, lw = (_FUSION_COLOUR, 2.5) if line.is_fusion else ("#333333", 0.6)
            x, y = pos[name]
            texts[name] = ax.text(
                x,
                y,
                "\n".join(self._node_label(line)),
                ha="center",
                va="center",
                fontsize=6.5,
                family="monospace",
                zorder=3,
                bbox={"boxstyle": "round,pad=0.3", "fc": fill, "ec": edge, "lw": lw},
            )
        for u, v in g.edges:
            # patchA/patchB clip the arrow at the label boxes, so heads stay visible; an edge
            # that skips layers (a residual) bends so it does not run through the boxes between.
            span = round(pos[u][1] - pos[v][1])
            ax.annotate(
                "",
                xy=pos[v],
                xytext=pos[u],
                zorder=1,
                arrowprops={
                    "arrowstyle": "-|>",
                    "color": "#555555",
                    "lw": 0.6,
                    "shrinkA": 1,
                    "shrinkB": 1,
                    "patchA": texts[u].get_bbox_patch(),
                    "patchB": texts[v].get_bbox_patch(),
                    "connectionstyle": f"arc3,rad={0.35 if span > 1 else 0.0}",
                },
            )
        handles = [Patch(fc=colours[m], label=m) for m in self.modality_names]
        handles.append(Patch(fc="white", ec=_FUSION_COLOUR, lw=2.5, label="fusion"))
        if any(r.is_regbn for r in self.rows):
            handles.append(Patch(fc=_REGBN_COLOUR, label="RegBN"))
        ax.legend(handles=handles, loc="upper right", fontsize=7, frameon=True)
        title = f"{self.model_name}: {len(self.rows)} nodes, {_plural(len(self.fusions), 'fusion')}"
        if self.failure is not None:
            title += f" (shape propagation failed at {self.failure.node_name})"
        fig.suptitle(title, fontsize=9)
        # One layout pass first: it places the label boxes, which the arrows (drawn below
        # them) clip against when the file is written.
        import matplotlib

        # SVG keeps its labels as text (searchable, small), not as glyph outlines.
        with matplotlib.rc_context({"svg.fonttype": "none"}):
            fig.draw_without_rendering()
            fig.savefig(path, format=fmt)
        return path


# --------------------------------------------------------------------------------------------
# Building a report from an annotated graph
# --------------------------------------------------------------------------------------------


def inspect(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    input_dtypes: Sequence[torch.dtype | None] | None = None,
    modalities: dict[str, Sequence[str]] | None = None,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Sequence[type | str] | None = None,
    autowrap_functions: Sequence[Callable] | None = None,
) -> Report:
    """Trace ``model``, propagate shapes and modalities, and report every node.

    ``example_inputs`` (tuple, dict of keyword arguments, possibly holding dicts of tensors)
    runs the model for real; ``input_shapes`` (with optional ``input_dtypes``) runs on fake
    tensors, so it needs no memory and works for models on ``torch.device("meta")``.
    A shape-propagation failure gives a partial report (``report.failure``); a trace failure
    raises ``TraceError``.
    """
    result = analyse(
        model,
        example_inputs,
        input_shapes=input_shapes,
        input_dtypes=input_dtypes,
        modalities=modalities,
        concrete_args=concrete_args,
        leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions,
    )
    return report_from_graph(result.gm, result.fusions, result.failure, model=model)


def report_from_graph(
    gm: fx.GraphModule,
    fusions: list[Fusion],
    failure: ShapeFailure | None = None,
    model: nn.Module | None = None,
) -> Report:
    """Build a :class:`Report` from a graph whose nodes carry the ``regbn_*`` meta keys."""
    model = gm if model is None else model
    fusion_names = {f.name for f in fusions}
    rows = [_row(node, gm, fusion_names) for node in gm.graph.nodes]
    by_modality, unused = _params_by_modality(model, rows)
    return Report(
        rows=rows,
        fusions=list(fusions),
        failure=failure,
        inputs=_inputs(gm, rows),
        params_by_modality=by_modality,
        unused_params=unused,
        model_name=type(model).__name__,
        # The model's own classes win over the plain containers fx builds for its paths.
        module_types={name: type(m).__name__ for name, m in gm.named_modules() if name}
        | {name: type(m).__name__ for name, m in model.named_modules() if name},
    )


def _row(node: fx.Node, gm: fx.GraphModule, fusion_names: set[str]) -> Row:
    module = node.meta.get("regbn_module")
    if module is None and node.op == "call_module":
        module = str(node.target)
    shape = node.meta.get("regbn_shape")
    return Row(
        name=node.name,
        module=module or None,
        op=node.op,
        target=_target_str(node),
        shape=tuple(shape) if shape is not None else None,
        nested=_strip_dtypes(node.meta.get("regbn_nested")),
        dtype=node.meta.get("regbn_dtype"),
        modalities=frozenset(node.meta.get("regbn_modalities", ())),
        is_fusion=node.name in fusion_names,
        inputs=tuple(n.name for n in node.all_input_nodes),
        layer=_layer_label(node, gm),
        params=_node_params(node, gm),
        is_regbn=is_regbn(gm, node),
        calls=tuple(tuple(c) for c in node.meta.get("regbn_module_calls", ())),
    )


def _inputs(gm: fx.GraphModule, rows: list[Row]) -> list[InputInfo]:
    """One entry per modality, in argument order: a dict/tuple argument gives one per entry."""
    labels = input_labels(gm)  # node name -> input name, as the modality analysis names them
    by_name = {row.name: row for row in rows}
    argument = {r.name: i for i, r in enumerate(r for r in rows if r.op == "placeholder")}
    order = {row.name: i for i, row in enumerate(rows)}

    def key(name: str) -> tuple[int, int]:
        # A source is a placeholder, or a constant getitem whose one input is the placeholder.
        row = by_name[name]
        owner = name if row.op == "placeholder" else row.inputs[0]
        return argument[owner], order[name]

    def modality(name: str) -> str | None:
        mods = by_name[name].modalities
        return next(iter(mods)) if len(mods) == 1 else None

    ordered = sorted(labels, key=key)
    return [InputInfo(labels[n], by_name[n].shape, by_name[n].dtype, modality(n)) for n in ordered]


def _params_by_modality(model: nn.Module, rows: list[Row]) -> tuple[dict[frozenset[str], int], int]:
    """Attribute each parameter to the modalities of the module call(s) that use it.

    A parameter owned by module ``m`` takes the union of the modalities of the nodes whose
    innermost module is ``m`` (a leaf call of ``m`` or the ops of ``m``'s own forward) and of
    the readers of a ``get_attr`` of it. One shared by two branches is counted for both together.
    """
    by_module: dict[str, set[str]] = {}
    users_of: dict[str, set[str]] = {}
    readers: dict[str, list[Row]] = {}
    for row in rows:
        for src in row.inputs:
            readers.setdefault(src, []).append(row)
    for row in rows:
        if row.module is not None:
            by_module.setdefault(row.module, set()).update(row.modalities)
        if row.op == "get_attr":
            mods = users_of.setdefault(row.target, set())
            for reader in readers.get(row.name, []):
                mods.update(reader.modalities)
    # A parameter inside a leaf module (a tower kept whole, MultiheadAttention's out_proj) counts
    # under the leaf's call.
    leaves = {row.target for row in rows if row.op == "call_module"}
    counts: dict[frozenset[str], int] = {}
    unused = 0
    for name, param in model.named_parameters():
        owner = _leaf_owner(name.rpartition(".")[0], by_module, leaves)
        if owner not in by_module and name not in users_of:
            unused += param.numel()
            continue
        key = frozenset(by_module.get(owner, set()) | users_of.get(name, set()))
        counts[key] = counts.get(key, 0) + param.numel()
    return counts, unused


def _leaf_owner(owner: str, by_module: dict[str, set[str]], leaves: set[str]) -> str:
    """``owner`` itself when its code ran, else the innermost leaf module call that holds it."""
    if owner in by_module:
        return owner
    parent = owner
    while parent:
        parent = parent.rpartition(".")[0]
        if parent in leaves:
            return parent
    return owner


def _target_str(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    module = {
        "_operator": "operator",
        "torch._C._nn": "torch.nn.functional",
        "torch._C._VariableFunctions": "torch",
    }.get(module, module)
    simple = getattr(target, "__name__", None)
    # The public spelling when the module exports it (torch.cat, not its builtin class path).
    if simple and getattr(sys.modules.get(module), simple, None) is target:
        return f"{module}.{simple}"
    name = getattr(target, "__qualname__", None) or simple or repr(target)
    return f"{module}.{name}" if module else name


def _layer_label(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(str(node.target))).__name__
        except AttributeError:
            return str(node.target)
    if node.op == "call_function":
        if node.target is operator.getitem and len(node.args) > 1:
            return f"getitem[{node.args[1]!r}]"
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return {"placeholder": "input", "get_attr": "attr", "output": "output"}[node.op]


def _node_params(node: fx.Node, gm: fx.GraphModule) -> int:
    try:
        if node.op == "call_module":
            return sum(p.numel() for p in gm.get_submodule(str(node.target)).parameters())
        if node.op == "get_attr":
            value = gm.get_parameter(str(node.target))
            return value.numel()
    except AttributeError:  # a buffer or a plain attribute: not a parameter
        return 0
    return 0


# --------------------------------------------------------------------------------------------
# Layout (networkx) and formatting helpers
# --------------------------------------------------------------------------------------------


def _unique_ids(lines: list[Line]) -> list[str]:
    """One graph key per line. A module that computes both before and after a child call (an
    encoder that transposes, runs a GRU, then pools) folds into two lines with one name; they
    stay two graph nodes (one key would close a cycle through the child)."""
    seen: dict[str, int] = {}
    ids = []
    for line in lines:
        count = seen.get(line.name, 0)
        seen[line.name] = count + 1
        ids.append(line.name if count == 0 else f"{line.name} ({count + 1})")
    return ids


def _layered_positions(g: nx.DiGraph) -> tuple[dict[str, tuple[float, float]], int, int]:
    """Layer = longest path from a source (topological generations); order within a layer by
    the mean position of its predecessors (one barycentre sweep) to limit crossings."""
    layers = [list(gen) for gen in nx.topological_generations(g)]
    order = {name: i for i, name in enumerate(g.nodes)}  # fx order as a tie-break
    pos: dict[str, tuple[float, float]] = {}
    widest = max((len(layer) for layer in layers), default=1)
    for depth, layer in enumerate(layers):

        def barycentre(name: str) -> tuple[float, int]:
            xs = [pos[p][0] for p in g.predecessors(name) if p in pos]
            return (sum(xs) / len(xs) if xs else -1.0, order[name])

        layer.sort(key=barycentre)
        offset = (widest - len(layer)) / 2
        for i, name in enumerate(layer):
            pos[name] = (offset + i, -float(depth))
    return pos, max(len(layers), 1), widest


def _format_table(
    headers: list[str],
    body: list[list[str]],
    width: int,
    right_align: set[int] = frozenset(),
    shrink: Sequence[tuple[int, int]] = (),
    optional: int | None = None,
) -> str:
    """Aligned columns, shortened (middle ellipsis) to fit ``width``.

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
    minimum = [max(len(h), 2) for h in headers]
    while excess > 0:
        i = max(range(len(widths)), key=lambda j: widths[j] - minimum[j])
        if widths[i] <= minimum[i]:
            break
        widths[i] -= 1
        excess -= 1

    def fmt(cells: list[str]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            cell = _shorten(cell, widths[i])
            parts.append(cell.rjust(widths[i]) if i in right_align else cell.ljust(widths[i]))
        return (" " * sep).join(parts).rstrip()

    rule = "-" * min(width, sum(widths) + sep * (len(widths) - 1))
    return "\n".join([fmt(headers), rule] + [fmt(r) for r in body] + [rule])


def _shorten(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:width]
    head = (width - 2) // 2
    return text[:head] + ".." + text[len(text) - (width - 2 - head) :]


def _terminal_width() -> int:
    return max(80, min(120, shutil.get_terminal_size((100, 24)).columns))


def _path_depth(path: str | None) -> int:
    return 0 if not path else path.count(".") + 1


def _strip_dtypes(nested: Any) -> Any:
    """regbn_nested holds (shape, dtype) leaves; the views want the shapes alone."""
    if isinstance(nested, dict):
        return {k: _strip_dtypes(v) for k, v in nested.items()}
    if isinstance(nested, tuple) and len(nested) == 2 and isinstance(nested[1], torch.dtype):
        return nested[0]
    if isinstance(nested, (tuple, list)):
        return type(nested)(_strip_dtypes(v) for v in nested)
    return nested


def _fmt_shape(shape: object) -> str:
    if shape is None:
        return "-"
    if isinstance(shape, dict):
        return "{" + ", ".join(f"{k!r}: {_fmt_shape(v)}" for k, v in shape.items()) + "}"
    if isinstance(shape, (tuple, list)) and all(isinstance(d, int) for d in shape):
        return "(" + ", ".join(str(d) for d in shape) + ")"
    if isinstance(shape, (tuple, list)):  # nested: a node returning several tensors
        return "(" + ", ".join(_fmt_shape(s) for s in shape) + ")"
    return str(shape)


def _shape_to_json(shape: object) -> object:
    if isinstance(shape, dict):
        return {str(k): _shape_to_json(v) for k, v in shape.items()}
    if isinstance(shape, (tuple, list)):
        return [_shape_to_json(s) for s in shape]
    if shape is None or isinstance(shape, (int, float, str)):
        return shape
    return str(shape)  # a symbolic size


def _dtype_str(dtype: object, short: bool = False) -> str | None:
    if dtype is None:
        return "-" if short else None
    text = str(dtype).removeprefix("torch.")
    if short:
        text = (
            text.replace("float", "f")
            .replace("bfloat", "bf")
            .replace("int", "i")
            .replace("complex", "c")
            .replace("bool", "b")
        )
    return text


def _fmt_params(n: int) -> str:
    return f"{n:,}" if n else ""


def _align(rows: list[list[str]], indent: int = 2, right: set[int] = frozenset()) -> list[str]:
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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _escape_dot_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _hex_to_rgb(colour: str) -> list[float]:
    colour = colour.lstrip("#")
    return [int(colour[i : i + 2], 16) / 255 for i in (0, 2, 4)]


def _rgb_to_hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(min(max(c, 0.0), 1.0) * 255):02x}" for c in rgb)


def _fusion_to_dict(fusion: Fusion) -> dict[str, Any]:
    return {
        "name": fusion.name,
        "kind": fusion.kind,
        "operands": list(fusion.operands),
        "modalities": [sorted(m) for m in fusion.modalities],
        "shapes": [_shape_to_json(s) for s in fusion.shapes],
        "pair": list(fusion.pair),
        "pair_shapes": [_shape_to_json(s) for s in fusion.pair_shapes],
        "projection_bytes": fusion.projection_bytes,
        "module": fusion.module,
        "output_shape": _shape_to_json(fusion.output_shape),
    }
