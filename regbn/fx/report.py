"""Shape inspection: ``regbn.inspect`` and the :class:`Report` it returns.

The report is built from a graph that the shared fx passes already annotated (tracing records
``regbn_module``, shape propagation ``regbn_shape``/``regbn_dtype``, modality analysis
``regbn_modalities``), so inspection sees exactly what ``regbn.insert`` sees.

This module holds the report's data: its rows, the folding of module calls into displayed lines
and the JSON form. The summary is computed once, in `report_summary` (`Report.overview`); the
graph is read in `report_rows`. The views live beside it: ``str(report)`` and ``to_markdown``
in `render_text`, ``_repr_html_`` (notebooks) in `render_html`, ``to_dot`` (Graphviz text) and
``draw`` (SVG/PNG) in `render_graph`, ``to_dict`` in `render_json`. With batches, the
dependence at each fusion comes from `report_dependence`.

A column of the views is one field of `Row` (and of `Line`, which folds rows: `_line_of`), plus
one cell in each renderer's row function (``table_cells``, ``markdown_cells``, ``html_cells``,
``node_label``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, overload

import networkx as nx
import torch
from torch import fx, nn

from .._dependence_core import DependenceReport
from .._format import dtype_name, plural, shape_to_json
from ..errors import RegBNValueError, public
from . import render_graph, render_html, render_json, render_text
from .analysis import analyse, split_by_projection, trace_options
from .modality import Fusion
from .names import display_names
from .report_dependence import measure_fusions
from .report_rows import input_order, params_by_modality, row_fields
from .report_summary import Summary, failure_text, summarize
from .shapes import ShapeFailure

__all__ = ["InputInfo", "Line", "Report", "Row", "inspect"]

# Row budget of the automatic folding: a table or picture longer than this folds module calls.
AUTO_MAX_ROWS = 60


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

    def summary(self) -> str:
        """Inputs, parameters per modality branch, fusions and the suggested pairs."""
        return render_text.summary(self)

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

    # -- views (each in its own module) --------------------------------------------------

    def table(
        self, depth: int | None = None, all_nodes: bool = False, width: int | None = None
    ) -> str:
        """An aligned text table (80-120 columns) followed by the summary."""
        return render_text.table(self, depth, all_nodes, width)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        state = "partial" if self.failure is not None else "complete"
        return (
            f"<regbn Report of {self.model_name}: {len(self.rows)} nodes, "
            f"{plural(len(self.fusions), 'fusion')}, {state}>"
        )

    def to_markdown(self, depth: int | None = None, all_nodes: bool = False) -> str:
        """A GitHub-flavoured Markdown table plus the summary as a list."""
        return render_text.markdown(self, depth, all_nodes)

    def _repr_html_(self) -> str:
        """A styled table for notebooks: every node, grouped by module, modalities as tags."""
        return render_html.html(self)

    def graph(self, depth: int | None = None, all_nodes: bool = False) -> nx.DiGraph:
        """The (folded) dataflow graph, one networkx node per displayed line.

        Parameter reads (get_attr) are left out: they are sources that would crowd the top.
        """
        return render_graph.graph(self, depth, all_nodes)

    def to_dot(self, depth: int | None = None, all_nodes: bool = False) -> str:
        """Graphviz text (``dot -Tsvg``) of the folded graph."""
        return render_graph.dot(self, depth, all_nodes)

    @overload
    def draw(
        self,
        path: None = None,
        depth: int | None = None,
        all_nodes: bool = False,
        engine: render_graph.Engine = "auto",
    ) -> render_graph.Drawing: ...

    @overload
    def draw(
        self,
        path: str | Path,
        depth: int | None = None,
        all_nodes: bool = False,
        engine: render_graph.Engine = "auto",
    ) -> Path: ...

    def draw(
        self,
        path: str | Path | None = None,
        depth: int | None = None,
        all_nodes: bool = False,
        engine: render_graph.Engine = "auto",
    ) -> render_graph.Drawing | Path:
        """Draw the graph, laid out from the inputs (top) to the outputs.

        Nodes are coloured by modality, fusions have a red frame, RegBN layers are gold, and
        every node shows its output shape; a report measured on batches fills each measured
        fusion by its dependence. No edge runs through a box it does not join, and the legend
        has a row of its own. Needs matplotlib, and Graphviz's ``dot`` on the PATH or the
        grandalf package (``pip install regbn[draw]``).

        Args:
            path: a file ending in .svg or .png to write; None returns a `Drawing`, which a
                notebook shows inline (SVG) and ``Drawing.save(path)`` writes later.
            depth: fold module calls below this depth into one box (None: automatic).
            all_nodes: one box per graph node, nothing folded.
            engine: the layout engine: ``"dot"`` (Graphviz), ``"grandalf"`` (pure Python), or
                ``"auto"``, dot where it is on the PATH, else grandalf.

        Returns:
            The path written, or without a path the `Drawing`.

        Raises:
            RegBNValueError: the path ends in neither .svg nor .png; the engine is unknown;
                the engine chosen (or, with "auto", both) is not installed.
            ImportError: matplotlib is not installed.

        Example:
            >>> report = regbn.inspect(model, example_inputs=(image, text))
            >>> report.draw()  # in a notebook: the picture, inline
            >>> report.draw("model.svg")
            PosixPath('model.svg')
        """
        return render_graph.draw(self, path, depth, all_nodes, engine)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists, strings, numbers, None only)."""
        return render_json.to_dict(self)


def _path_depth(path: str | None) -> int:
    return 0 if not path else path.count(".") + 1


# --------------------------------------------------------------------------------------------
# Building a report from an annotated graph
# --------------------------------------------------------------------------------------------


@public
def inspect(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    input_shapes: Any = None,
    input_dtypes: Any = None,
    modalities: dict[str, Any] | None = None,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Sequence[type | str] | None = None,
    autowrap_functions: Sequence[Callable] | None = None,
    batches: Iterable[Any] | None = None,
    progress: bool = True,
) -> Report:
    """Trace ``model``, propagate shapes and modalities, and report every node.

    ``example_inputs`` (tuple, dict of keyword arguments, possibly holding dicts of tensors)
    runs the model for real; ``input_shapes`` (with optional ``input_dtypes``) runs on fake
    tensors, so it needs no memory and works for models on ``torch.device("meta")``. A shape
    is a tuple of sizes or ``(sizes, dtype)``; ``input_shapes`` is one per argument, or a dict by
    argument name whose values may be dicts for dict arguments. ``modalities`` maps a modality
    name to the inputs that make it. A shape-propagation failure gives a partial report
    (``report.failure``); a trace failure raises ``TraceError``.

    ``batches`` (an iterable of batches, each like ``example_inputs``) adds the cross-modal
    dependence at each fusion (`regbn.measure_dependence` on the pair ``pairs="auto"`` would
    take there, run on the traced graph with every module in eval mode, no parameter or buffer
    changed): ``report.dependence``, a column of the tables and the colour of the fusions in
    ``draw``. Random batches measure the architecture, not the data. ``progress`` shows a bar
    of the batches run (tqdm, when installed).
    """
    result = analyse(model, example_inputs, **trace_options(locals()))
    report = report_from_graph(result.gm, result.fusions, result.failure, model=model)
    if batches is not None:
        report.dependence = measure_fusions(
            result.gm, report.open_fusions(), batches, model, progress
        )
    return report


def report_from_graph(
    gm: fx.GraphModule,
    fusions: list[Fusion],
    failure: ShapeFailure | None = None,
    model: nn.Module | None = None,
) -> Report:
    """Build a :class:`Report` from a graph whose nodes carry the ``regbn_*`` meta keys."""
    model = gm if model is None else model
    fusion_names = {f.name for f in fusions}
    labels = display_names(gm)
    rows = [Row(**row_fields(node, gm, fusion_names, labels)) for node in gm.graph.nodes]
    by_modality, unused = params_by_modality(model, rows)
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


def _inputs(gm: fx.GraphModule, rows: list[Row]) -> list[InputInfo]:
    """One entry per modality, in argument order: a dict/tuple argument gives one per entry."""
    by_name = {row.name: row for row in rows}

    def modality(name: str) -> str | None:
        mods = by_name[name].modalities
        return next(iter(mods)) if len(mods) == 1 else None

    return [
        InputInfo(label, by_name[n].shape, by_name[n].dtype, modality(n))
        for n, label in input_order(gm, rows)
    ]
