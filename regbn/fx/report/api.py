"""``regbn.inspect`` and the `Report` it returns: the report's data plus its views.

The report is built from a graph that the earlier steps annotated (tracing records
``regbn_module``, shape propagation ``regbn_tensor``, modality analysis ``regbn_modalities``),
so inspection sees exactly what ``regbn.insert`` sees. `Report` is `ReportData` (`data`) with
one method per view: ``str(report)`` and ``to_markdown`` (`render_text`), ``_repr_html_``
(`render_html`, notebooks), ``graph``, ``to_dot`` and ``draw`` (`render_graph`), ``to_dict``
(`render_json`). With batches, `inspect` measures the dependence at each fusion
(`regbn.fx.dependence.measure_fusions`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, overload

import networkx as nx
from torch import fx, nn

from ...errors import public
from ..analysis import analyse, trace_options
from ..dependence import measure_fusions
from ..modality import Fusion
from ..names import display_names
from ..shapes import ShapeFailure
from . import render_graph, render_html, render_json, render_text
from .data import InputInfo, ReportData, Row
from .rows import input_order, params_by_modality, row_fields

__all__ = ["Report", "inspect", "report_from_graph"]


class Report(ReportData):
    """What ``regbn.inspect`` found: per-node rows, fusions, a summary and several views."""

    def summary(self) -> str:
        """Inputs, parameters per modality branch, fusions and the suggested pairs."""
        return render_text.summary(self)

    # -- views (each in its own module) --------------------------------------------------

    def table(
        self, depth: int | None = None, all_nodes: bool = False, width: int | None = None
    ) -> str:
        """An aligned text table (80-120 columns) followed by the summary."""
        return render_text.table(self, depth, all_nodes, width)

    def __str__(self) -> str:
        return self.table()


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

    Args:
        model: the ``nn.Module`` to inspect.
        example_inputs: real inputs (tuple, dict of keyword arguments, possibly holding dicts
            of tensors); the model runs for real.
        input_shapes: runs on fake tensors instead, so it needs no memory and works for
            models on ``torch.device("meta")``. A shape is a tuple of sizes or
            ``(sizes, dtype)``; ``input_shapes`` is one per argument, or a dict by argument
            name whose values may be dicts for dict arguments.
        input_dtypes: dtypes for ``input_shapes``.
        modalities: maps a modality name to the inputs that make it.
        concrete_args: tracing option, as in torch.fx.
        leaf_modules: module classes or dotted paths to keep as one call.
        autowrap_functions: functions to keep as one call.
        batches: an iterable of batches, each like ``example_inputs``; adds the cross-modal
            dependence at each fusion (`regbn.measure_dependence` on the pair
            ``pairs="auto"`` would take there, run on the traced graph with every module in
            eval mode, no parameter or buffer changed): ``report.dependence``, a column of
            the tables and the colour of the fusions in ``draw``. Random batches measure the
            architecture, not the data.
        progress: show a bar of the batches run (tqdm, when installed).

    Returns:
        A `Report`: one row per fx node, the fusions, a summary and its views (``str``,
        ``_repr_html_``, ``to_dict``, ``draw``). A shape-propagation failure gives a partial
        report (``report.failure``).

    Raises:
        TraceError: the model cannot be traced.
        RegBNValueError: bad inputs, shapes, modalities or batches.
        RegBNTypeError: an argument of the wrong type.

    Example:
        >>> report = regbn.inspect(model, input_shapes=[(2, 1, 28, 28), (2, 3, 28, 28)])
        >>> print(report)
        >>> report.pairs
        [('gray_net.fc', 'colored_net.fc')]
    """
    result = analyse(model, example_inputs, **trace_options(locals()))
    report = report_from_graph(
        result.gm, result.fusions, result.failure, model=model, labels=result.names
    )
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
    labels: dict[str, str] | None = None,
) -> Report:
    """Build a :class:`Report` from a graph whose nodes carry the ``regbn_*`` meta keys;
    ``labels``: the names users see, when the analysis made them already."""
    model = gm if model is None else model
    fusion_names = {f.name for f in fusions}
    labels = labels or display_names(gm)
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
