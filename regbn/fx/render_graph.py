"""Graph views of a report: the folded dataflow graph (networkx), Graphviz text and a picture.

Every graph node is one displayed line of the report; `node_label` writes what its box shows.
The layout is layered from the inputs (top) to the outputs and needs no Graphviz; the picture is
drawn with matplotlib, an optional dependency imported only by `draw`. In a report measured on
batches, a measured fusion's box is filled by its dependence above chance (pale blue at 0,
orange at 1, the ramp of `report_dependence`) and shows the value.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx

from .._format import format_shape, plural
from ..errors import RegBNValueError
from .render_html import colours
from .report_dependence import RAMP, dependence_cell, dependence_colour, line_row

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.text import Text

    from .._dependence_core import DependenceRow
    from .report import Line, Report

__all__ = ["dot", "draw", "graph", "node_label"]

_NO_MODALITY_COLOUR = "#d9d9d9"
_FUSION_COLOUR = "#d62728"
_REGBN_COLOUR = "#ffd700"


def graph(report: Report, depth: int | None, all_nodes: bool) -> nx.DiGraph:
    """The (folded) dataflow graph, one networkx node (attribute ``line``) per displayed line.

    Parameter reads (get_attr) are left out: they are sources that would crowd the top.
    """
    lines = report.lines(depth, all_nodes)
    ids = _unique_ids(lines)
    owner = {m: key for line, key in zip(lines, ids, strict=True) for m in line.members}
    by_name = {row.name: row for row in report.rows}
    g = nx.DiGraph()
    for line, key in zip(lines, ids, strict=True):
        if all(by_name[m].op == "get_attr" for m in line.members):
            continue
        g.add_node(key, line=line)
    for row in report.rows:
        head = owner[row.name]
        for src in row.inputs:
            tail = owner.get(src)
            if tail is not None and tail != head and tail in g and head in g:
                g.add_edge(tail, head)
    return g


def node_label(line: Line, measured: DependenceRow | None = None) -> list[str]:
    """The text lines of a graph node's box: name, layer, output shape, marks, and the
    dependence above chance of a ``measured`` fusion."""
    layer = f"{line.layer} ({len(line.members)} nodes)" if line.folded else line.layer
    label = [line.label or line.name, layer, format_shape(line.shape)]
    if line.is_fusion:
        label.append("FUSION")
    if measured is not None:
        label.append(f"dependence {dependence_cell(measured)}")
    if line.is_regbn:
        label.append("RegBN")
    return label


def dot(report: Report, depth: int | None, all_nodes: bool) -> str:
    """Graphviz text (``dot -Tsvg``) of the folded graph."""
    g = graph(report, depth, all_nodes)
    palette = colours(report)

    def q(text: str) -> str:
        return f'"{_escape_dot_label(text)}"'

    out = [
        f"digraph {q(report.model_name)} {{",
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=9];',
    ]
    for name, data in g.nodes(data=True):
        line: Line = data["line"]
        measured = line_row(report, line)
        label = "\\n".join(_escape_dot_label(s) for s in node_label(line, measured))
        fill = _box_colour(line, measured, palette)
        extra = f', color="{_FUSION_COLOUR}", penwidth=3' if line.is_fusion else ""
        out.append(f'  {q(name)} [label="{label}", fillcolor="{fill}"{extra}];')
    for u, v in g.edges:
        out.append(f"  {q(u)} -> {q(v)};")
    out.append("}")
    return "\n".join(out) + "\n"


def draw(report: Report, path: str | Path, depth: int | None, all_nodes: bool) -> Path:
    """Write the graph as SVG or PNG (by suffix), laid out from inputs (top) to outputs."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("svg", "png"):
        raise RegBNValueError(
            f"Report.draw: the file must end in .svg or .png, got {path.name!r}"
        )
    # matplotlib is optional (the examples extra) and slow to import: imported on use only.
    import matplotlib
    from matplotlib.figure import Figure

    g = graph(report, depth, all_nodes)
    pos, n_layers, widest = _layered_positions(g)
    fig_w = min(max(6.0, 2.4 * widest), 60.0)
    fig_h = max(3.0, 0.75 * n_layers + 1.0)
    # Agg cannot render beyond 2**16 px a side; long graphs get a lower dpi instead.
    dpi = min(100.0, 30000.0 / max(fig_w, fig_h))
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.95))
    ax.set_axis_off()
    ax.set_xlim(-0.6, max(widest, 1) - 0.4)
    ax.set_ylim(-n_layers + 0.4, 0.6)
    _draw_graph(ax, g, pos, colours(report), report)
    _draw_legend(ax, report)
    title = f"{report.model_name}: {len(report.rows)} nodes, "
    title += plural(len(report.fusions), "fusion")
    if report.failure is not None:
        title += f" (shape propagation failed at {report.failure.node_name})"
    fig.suptitle(title, fontsize=9)
    # SVG keeps its labels as text (searchable, small), not as glyph outlines. One layout pass
    # first: it places the label boxes, which the arrows (drawn below them) clip against when
    # the file is written.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.draw_without_rendering()
        fig.savefig(path, format=fmt)
    return path


def _draw_graph(
    ax: Axes,
    g: nx.DiGraph,
    pos: dict[str, tuple[float, float]],
    palette: dict[str, str],
    report: Report,
) -> None:
    """One labelled box per node, one arrow per edge."""
    texts: dict[str, Text] = {}
    for name, data in g.nodes(data=True):
        line: Line = data["line"]
        measured = line_row(report, line)
        fill = _box_colour(line, measured, palette)
        edge, lw = (_FUSION_COLOUR, 2.5) if line.is_fusion else ("#333333", 0.6)
        x, y = pos[name]
        texts[name] = ax.text(
            x,
            y,
            "\n".join(node_label(line, measured)),
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


def _draw_legend(ax: Axes, report: Report) -> None:
    from matplotlib.patches import Patch  # optional, as in `draw`

    palette = colours(report)
    handles = [Patch(fc=palette[m], label=m) for m in report.modality_names]
    handles.append(Patch(fc="white", ec=_FUSION_COLOUR, lw=2.5, label="fusion"))
    if any(r.is_regbn for r in report.rows):
        handles.append(Patch(fc=_REGBN_COLOUR, label="RegBN"))
    if report.dependence is not None:
        handles += [
            Patch(fc=colour, ec=_FUSION_COLOUR, lw=1, label=f"dependence {value:.1f}")
            for value, colour in RAMP
        ]
    ax.legend(handles=handles, loc="upper right", fontsize=7, frameon=True)


def _box_colour(line: Line, measured: DependenceRow | None, palette: dict[str, str]) -> str:
    """Gold for a RegBN layer, the dependence ramp for a measured fusion, else by modality."""
    if line.is_regbn:
        return _REGBN_COLOUR
    if measured is not None:
        return dependence_colour(measured.above_chance)
    return _fill(line.modalities, palette)


def _fill(modalities: frozenset[str], palette: dict[str, str]) -> str:
    if not modalities:
        return _NO_MODALITY_COLOUR
    # Mixed branches get the lightened mean of their modalities' colours.
    rgb = [_hex_to_rgb(palette.get(m, "#777777")) for m in modalities]
    mean = [sum(c[i] for c in rgb) / len(rgb) for i in range(3)]
    return _rgb_to_hex([0.55 * x + 0.45 for x in mean])


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


def _escape_dot_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _hex_to_rgb(colour: str) -> list[float]:
    colour = colour.lstrip("#")
    return [int(colour[i : i + 2], 16) / 255 for i in (0, 2, 4)]


def _rgb_to_hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(min(max(c, 0.0), 1.0) * 255):02x}" for c in rgb)
