"""Graph views of a report: the folded dataflow graph (networkx), Graphviz text and a picture.

Every graph node is one displayed line of the report; `node_label` writes what its box shows.
The picture is laid out by a layered (Sugiyama) engine, inputs at the top: Graphviz ``dot``
where it is installed, else grandalf (pure Python, the ``draw`` extra). Either way the layout
is read back as geometry (`Layout`: boxes and edge curves, in points) and drawn by matplotlib,
so the colours, marks and legend are the same whichever engine placed the boxes, and tests can
check the geometry itself: no edge runs through a box it does not start or end at.

In a report measured on batches, a measured fusion's box is filled by its dependence above
chance (pale blue at 0, orange at 1, the ramp of `report_dependence`) and shows the value.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import networkx as nx

from ..._format import format_shape, plural
from ...errors import RegBNValueError
from .cells import RAMP, colours, dependence_cell, dependence_colour, line_row

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure
    from matplotlib.legend import Legend

    from ..dependence.core import DependenceRow
    from .data import Line, ReportData

__all__ = ["Drawing", "Layout", "box_size", "dot", "draw", "graph", "layout", "node_label"]

Engine = Literal["auto", "dot", "grandalf"]
Point = tuple[float, float]

_NO_MODALITY_COLOUR = "#d9d9d9"
_FUSION_COLOUR = "#d62728"
_REGBN_COLOUR = "#ffd700"
_EDGE_COLOUR = "#4d4d4d"

# Sizes in points (1/72 inch); the figure is sized so that one layout unit is one point.
FONT_SIZE = 9.0
_TITLE_SIZE = 10.0
# The advance of DejaVu Sans Mono (matplotlib's bundled monospace) is 1233/2048 em; boxes are
# sized from it so that dot and grandalf lay out the very boxes matplotlib draws.
_CHAR_WIDTH = 0.602 * FONT_SIZE
_LINE_HEIGHT = 1.2 * FONT_SIZE
_PAD_X, _PAD_Y = 6.0, 5.0
_NODE_SEP = 18.0  # between boxes of a layer
_RANK_SEP = 40.0  # between layers: room for the curves and an arrowhead
_ARROW = 8.0  # arrowhead length
_MARGIN = 10.0
_DUMMY_WIDTH = 8.0  # the lane a long edge takes through a layer (grandalf)
# SVG keeps its labels as text (searchable, small), not as glyph outlines. Agg's hinting rounds
# each glyph's advance to whole pixels, which at 100 dpi widens a label by 6 % and out of its
# box; unhinted, the PNG's text is as wide as the SVG's.
RC: dict[Any, Any] = {"svg.fonttype": "none", "svg.hashsalt": "regbn", "text.hinting": "none"}


def graph(report: ReportData, depth: int | None, all_nodes: bool) -> nx.DiGraph:
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
    layer = line.layer_label
    label = [line.label or line.name, layer, format_shape(line.shape)]
    if line.is_fusion:
        label.append("FUSION")
    if measured is not None:
        label.append(f"dependence {dependence_cell(measured)}")
    if line.is_regbn:
        label.append("RegBN")
    return label


def dot(report: ReportData, depth: int | None, all_nodes: bool) -> str:
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


# ---------------------------------------------------------------------------------------------
# Layout: boxes and edge curves, from dot or grandalf
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where a graph's boxes and edges lie, in points, y pointing up.

    Attributes:
        engine: ``"dot"`` or ``"grandalf"``, the engine that placed the boxes.
        boxes: node -> (x0, y0, x1, y1), the box drawn around its label.
        edges: (tail, head) -> the edge's curve: cubic Bezier control points
            ``p0, c, c, p1, c, c, p2, ...`` (3k + 1 points), ending where its arrowhead starts.
        tips: (tail, head) -> the arrowhead's point, on the head's box.
        bounds: (x0, y0, x1, y1) holding every box, curve and arrowhead with a margin.
    """

    engine: str
    boxes: dict[str, tuple[float, float, float, float]]
    edges: dict[tuple[str, str], list[Point]]
    tips: dict[tuple[str, str], Point]
    bounds: tuple[float, float, float, float]

    def polyline(self, edge: tuple[str, str], per_curve: int = 16) -> list[Point]:
        """The edge sampled as a polyline, arrowhead included (for geometric checks)."""
        pts = self.edges[edge]
        out = [pts[0]]
        for i in range(0, len(pts) - 3, 3):
            p0, p1, p2, p3 = pts[i : i + 4]
            for k in range(1, per_curve + 1):
                t = k / per_curve
                a, b, c, d = (1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t * t * (1 - t), t**3
                out.append(
                    (
                        a * p0[0] + b * p1[0] + c * p2[0] + d * p3[0],
                        a * p0[1] + b * p1[1] + c * p2[1] + d * p3[1],
                    )
                )
        out.append(self.tips[edge])
        return out


def box_size(label: Sequence[str]) -> tuple[float, float]:
    """The (width, height) in points of a box holding ``label`` at `FONT_SIZE`."""
    width = max((len(s) for s in label), default=1) * _CHAR_WIDTH + 2 * _PAD_X
    return width, len(label) * _LINE_HEIGHT + 2 * _PAD_Y


def layout(g: nx.DiGraph, sizes: dict[str, tuple[float, float]], engine: Engine = "auto") -> Layout:
    """Lay out ``g`` from its sources (top) down, each node a box of ``sizes[node]`` points.

    ``engine="auto"`` takes Graphviz ``dot`` where it is on the PATH, else grandalf.
    """
    if engine not in ("auto", "dot", "grandalf"):
        raise RegBNValueError(
            f"Report.draw: engine must be 'auto', 'dot' or 'grandalf', got {engine!r}"
        )
    if engine == "dot" or (engine == "auto" and shutil.which("dot")):
        try:
            return _dot_layout(g, sizes)
        except _DotFailed:
            if engine == "dot":
                raise
            # An old or broken Graphviz should not cost the user the picture.
    return _grandalf_layout(g, sizes)


class _DotFailed(RegBNValueError):
    """Graphviz's dot ran but gave no layout."""


def _dot_layout(g: nx.DiGraph, sizes: dict[str, tuple[float, float]]) -> Layout:
    """Boxes of fixed size and unlabelled, so dot needs no fonts and places what we draw."""
    exe = shutil.which("dot")
    if exe is None:
        raise RegBNValueError(
            "Report.draw: engine='dot' needs Graphviz's dot on the PATH, found none; install "
            "Graphviz (apt install graphviz, brew install graphviz, conda install graphviz) or "
            "pass engine='grandalf' (pip install grandalf)"
        )
    names = list(g.nodes)
    index = {n: i for i, n in enumerate(names)}
    text = [
        "digraph G {",
        f"  rankdir=TB; nodesep={_NODE_SEP / 72:.3f}; ranksep={_RANK_SEP / 72:.3f};",
        '  node [shape=box, fixedsize=true, label=""];',
        f"  edge [arrowsize={_ARROW / 10:.2f}];",
    ]
    for i, n in enumerate(names):
        w, h = sizes[n]
        text.append(f"  n{i} [width={w / 72:.4f}, height={h / 72:.4f}];")
    # Every input on the top row, as grandalf places them, whatever the towers' depths.
    sources = " ".join(f"n{index[n]};" for n in names if g.in_degree(n) == 0)
    if sources:
        text.append(f"  {{rank=min; {sources}}}")
    text += [f"  n{index[u]} -> n{index[v]};" for u, v in g.edges]
    text.append("}")
    try:
        done = subprocess.run(
            [exe, "-Tjson0"], input="\n".join(text), capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise ValueError(done.stderr.strip()[:200])
        data = json.loads(done.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired) as err:
        raise _DotFailed(
            f"Report.draw: Graphviz's dot ({exe}) failed to lay out {len(names)} boxes: {err}; "
            "pass engine='grandalf' instead"
        ) from None
    boxes = {}
    by_gvid: dict[int, str] = {}
    for obj in data.get("objects", []):
        if "pos" not in obj:  # the subgraph holding the inputs' rank
            continue
        name = names[int(obj["name"][1:])]
        by_gvid[obj["_gvid"]] = name
        x, y = (float(c) for c in obj["pos"].split(","))
        w, h = sizes[name]
        boxes[name] = (x - w / 2, y - h / 2, x + w / 2, y + h / 2)
    edges: dict[tuple[str, str], list[Point]] = {}
    tips: dict[tuple[str, str], Point] = {}
    for e in data.get("edges", []):
        key = (by_gvid[e["tail"]], by_gvid[e["head"]])
        points: list[Point] = []
        for item in e["pos"].split():
            if item.startswith("e,"):
                x, y = item[2:].split(",")
                tips[key] = (float(x), float(y))
            elif not item.startswith("s,"):
                x, y = item.split(",")
                points.append((float(x), float(y)))
        edges[key] = points
        tips.setdefault(key, points[-1])
    return Layout("dot", boxes, edges, tips, _bounds(boxes, edges, tips))


def _grandalf_layout(g: nx.DiGraph, sizes: dict[str, tuple[float, float]]) -> Layout:
    """grandalf ranks and orders the nodes, with a dummy node where a long edge crosses a
    layer; the edges are then routed here: straight down through a layer (in their own lane,
    at a node's or a dummy's x) and curved only in the gaps between layers, where no box is."""
    try:
        from grandalf.graphs import Edge, Graph, Vertex
        from grandalf.layouts import SugiyamaLayout
    except ImportError:
        raise RegBNValueError(
            "Report.draw: the pure-Python layout (engine='grandalf', taken where Graphviz's dot "
            "is not on the PATH) needs grandalf, which is not installed; pip install grandalf "
            "(or regbn[draw]), or install Graphviz"
        ) from None

    class View:
        def __init__(self, w: float, h: float) -> None:
            self.w, self.h, self.xy = w, h, (0.0, 0.0)

    vertex = {}
    for n in g.nodes:
        vertex[n] = Vertex(n)
        vertex[n].view = View(*sizes[n])
    gedges = {(u, v): Edge(vertex[u], vertex[v]) for u, v in g.edges}
    big = Graph(list(vertex.values()), list(gedges.values()))
    rank: dict[object, int] = {}
    x: dict[object, float] = {}
    width: dict[object, float] = {}
    layers: list[list[object]] = []
    chains: dict[tuple[str, str], list[object]] = {}
    offset = 0.0
    # Components side by side, in the order of their first node (fx order: inputs first).
    order = {n: i for i, n in enumerate(g.nodes)}
    for comp in sorted(big.C, key=lambda c: min(order[v.data] for v in c.sV)):
        sug = SugiyamaLayout(comp)
        sug.xspace, sug.dw, sug.dh = _NODE_SEP, _DUMMY_WIDTH, 0.0
        sug.init_all()
        sug.draw(N=1.5 if len(comp.sV) < 400 else 0.5)
        left = float("inf")
        right = -float("inf")
        for r, layer in enumerate(sug.layers):
            while len(layers) <= r:
                layers.append([])
            packed = _separate([(v.view.xy[0], v.view.w) for v in layer])
            for v, cx in zip(layer, packed, strict=True):
                rank[v], x[v], width[v] = r, cx, v.view.w
                left = min(left, cx - v.view.w / 2)
                right = max(right, cx + v.view.w / 2)
            layers[r] += layer
        shift = offset - left
        for layer in sug.layers:
            for v in layer:
                x[v] += shift
        offset += right - left + 2 * _NODE_SEP
        for (u, v), e in gedges.items():
            if e in comp.sE:
                ctrl = sug.ctrls.get(e, {})
                chains[(u, v)] = (
                    [vertex[u]]
                    + [ctrl[r] for r in range(rank[vertex[u]] + 1, rank[vertex[v]])]
                    + [vertex[v]]
                )
    # Each layer a band as tall as its tallest box; the gaps between bands hold no box.
    band = [
        max((sizes[v.data][1] for v in layer if isinstance(v, Vertex)), default=0.0)
        for layer in layers
    ]
    top, centre = 0.0, []
    for h in band:
        centre.append(top - h / 2)
        top -= h + _RANK_SEP
    boxes = {}
    for n, v in vertex.items():
        w, h = sizes[n]
        cy = centre[rank[v]]
        boxes[n] = (x[v] - w / 2, cy - h / 2, x[v] + w / 2, cy + h / 2)
    out_port = _ports(chains, x, width, first=True)
    in_port = _ports(chains, x, width, first=False)
    edges: dict[tuple[str, str], list[Point]] = {}
    tips: dict[tuple[str, str], Point] = {}
    band_top = [c + h / 2 for c, h in zip(centre, band, strict=True)]
    band_bottom = [c - h / 2 for c, h in zip(centre, band, strict=True)]
    for key, chain in chains.items():
        pts: list[Point] = [(out_port[key], boxes[key[0]][1])]
        _line(pts, (pts[0][0], band_bottom[rank[chain[0]]]))
        for dummy in chain[1:-1]:
            _s_curve(pts, (x[dummy], band_top[rank[dummy]]))
            _line(pts, (x[dummy], band_bottom[rank[dummy]]))
        # The last gap keeps an arrowhead's length free above the head's layer.
        head_top = boxes[key[1]][3]
        _s_curve(pts, (in_port[key], band_top[rank[chain[-1]]] + _ARROW))
        _line(pts, (in_port[key], head_top + _ARROW))
        edges[key] = pts
        tips[key] = (in_port[key], head_top)
    return Layout("grandalf", boxes, edges, tips, _bounds(boxes, edges, tips))


def _separate(row: list[tuple[float, float]]) -> list[float]:
    """Centres of a layer's (centre, width) boxes, in order, pushed apart where they overlap.

    grandalf's x is the mean of its four Brandes-Koepf placements, which can bring neighbours
    closer than their widths; a box over an edge's lane would put the edge through the box."""
    out: list[float] = []
    for i, (cx, w) in enumerate(row):
        if i:
            prev_cx, prev_w = out[-1], row[i - 1][1]
            cx = max(cx, prev_cx + (prev_w + w) / 2 + _NODE_SEP)
        out.append(cx)
    return out


def _ports(
    chains: dict[tuple[str, str], list[object]],
    x: dict[object, float],
    width: dict[object, float],
    first: bool,
) -> dict[tuple[str, str], float]:
    """Where each edge leaves its tail's box (``first``) or enters its head's: spread along the
    box's middle in the order of the other ends, so edges neither cross at a box nor share
    an arrowhead."""
    by_node: dict[object, list[tuple[float, tuple[str, str]]]] = {}
    for key, chain in chains.items():
        node, other = (chain[0], chain[1]) if first else (chain[-1], chain[-2])
        by_node.setdefault(node, []).append((x[other], key))
    out = {}
    for node, ends in by_node.items():
        ends.sort()
        k = len(ends)
        step = min(14.0, 0.6 * width[node] / max(k - 1, 1))
        for i, (_, key) in enumerate(ends):
            out[key] = x[node] + (i - (k - 1) / 2) * step
    return out


def _line(pts: list[Point], to: Point) -> None:
    """A straight piece as a cubic Bezier (nothing when it has no length)."""
    a = pts[-1]
    if a == to:
        return
    pts += [
        (a[0] + (to[0] - a[0]) / 3, a[1] + (to[1] - a[1]) / 3),
        (a[0] + 2 * (to[0] - a[0]) / 3, a[1] + 2 * (to[1] - a[1]) / 3),
        to,
    ]


def _s_curve(pts: list[Point], to: Point) -> None:
    """A curve across a gap, vertical at both ends; its control points share the gap's
    heights, so the curve stays inside the gap."""
    a = pts[-1]
    mid = (a[1] + to[1]) / 2
    pts += [(a[0], mid), (to[0], mid), to]


def _bounds(
    boxes: dict[str, tuple[float, float, float, float]],
    edges: dict[tuple[str, str], list[Point]],
    tips: dict[tuple[str, str], Point],
) -> tuple[float, float, float, float]:
    # Control points hold their curve (convex hull), so they bound it.
    xs = [c for b in boxes.values() for c in (b[0], b[2])]
    ys = [c for b in boxes.values() for c in (b[1], b[3])]
    for pts in [*edges.values(), list(tips.values())]:
        xs += [p[0] for p in pts]
        ys += [p[1] for p in pts]
    if not xs:
        return (0.0, 0.0, 2 * _MARGIN, 2 * _MARGIN)
    return (min(xs) - _MARGIN, min(ys) - _MARGIN, max(xs) + _MARGIN, max(ys) + _MARGIN)


# ---------------------------------------------------------------------------------------------
# The picture
# ---------------------------------------------------------------------------------------------


class Drawing:
    """A report's graph, drawn: shows inline in a notebook (SVG); `save` writes SVG or PNG.

    Attributes:
        layout: the geometry drawn (`Layout`, in points).
        figure: the matplotlib figure.
        legend: the figure's legend (a row of its own above the graph, over no box).
    """

    def __init__(self, figure: Figure, layout: Layout, legend: Legend) -> None:
        self.figure = figure
        self.layout = layout
        self.legend = legend
        self._svg: str | None = None

    @property
    def svg(self) -> str:
        """The picture as SVG text (labels kept as text: searchable and small)."""
        if self._svg is None:
            buf = io.StringIO()
            self._write(buf, "svg")
            self._svg = buf.getvalue()
        return self._svg

    def _repr_svg_(self) -> str:
        return self.svg

    def save(self, path: str | Path) -> Path:
        """Write the picture to ``path``, SVG or PNG by its suffix; returns the path.

        Raises:
            RegBNValueError: the suffix is neither .svg nor .png.
        """
        path = Path(path)
        fmt = _format(path)
        if fmt == "svg":
            path.write_text(self.svg, encoding="utf-8")
        else:
            with open(path, "wb") as f:
                self._write(f, "png")
        return path

    def _write(self, target: io.StringIO | io.BufferedWriter, fmt: str) -> None:
        import matplotlib

        # Agg cannot render beyond 2**16 px a side: very long graphs get a lower dpi.
        w, h = self.figure.get_size_inches()
        dpi = min(100.0, 30000.0 / max(w, h))
        metadata = {"Date": None} if fmt == "svg" else {"Software": None}
        with matplotlib.rc_context(RC):
            self.figure.savefig(target, format=fmt, dpi=dpi, metadata=metadata)

    def __repr__(self) -> str:
        n = len(self.layout.boxes)
        return f"<Drawing: {plural(n, 'node')}, laid out by {self.layout.engine}>"


def _format(path: Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("svg", "png"):
        raise RegBNValueError(
            f"Report.draw: the file must end in .svg or .png, got {path.name!r}; "
            "or call draw() without a path for an inline picture"
        )
    return fmt


def draw(
    report: ReportData,
    path: str | Path | None,
    depth: int | None,
    all_nodes: bool,
    engine: Engine = "auto",
) -> Drawing | Path:
    """The graph laid out from inputs (top) to outputs: a `Drawing`, or written to ``path``."""
    if path is not None:
        _format(Path(path))  # refuse a bad suffix before the work
    # matplotlib is optional (the draw and examples extras) and slow to import: on use only.
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch, PathPatch, Polygon
    from matplotlib.path import Path as MPath

    g = graph(report, depth, all_nodes)
    palette = colours(report)
    labels, fills, fusion = {}, {}, {}
    for name, data in g.nodes(data=True):
        line: Line = data["line"]
        measured = line_row(report, line)
        labels[name] = node_label(line, measured)
        fills[name] = _box_colour(line, measured, palette)
        fusion[name] = line.is_fusion
    lay = layout(g, {n: box_size(labels[n]) for n in g.nodes}, engine)

    title = f"{report.model_name}: {len(report.rows)} nodes, "
    title += plural(len(report.fusions), "fusion")
    if report.failure is not None:
        title += f" (shape propagation failed at {report.failure.node_name})"
    handles = _legend_handles(report)
    gx0, gy0, gx1, gy1 = lay.bounds
    graph_w, graph_h = gx1 - gx0, gy1 - gy0
    title_h = _TITLE_SIZE * 2.2
    title_w = len(title) * 0.62 * _TITLE_SIZE + 2 * _MARGIN
    ncol, legend_w, legend_h = _legend_shape(handles, max(graph_w, title_w, 300.0) - 2 * _MARGIN)
    fig_w = max(graph_w, title_w, legend_w + 2 * _MARGIN, 300.0)
    fig_h = graph_h + title_h + legend_h + _MARGIN
    fig = Figure(figsize=(fig_w / 72, fig_h / 72))
    # The graph's axes are exactly its bounds at one point per unit, below the legend's row.
    ax = fig.add_axes(((fig_w - graph_w) / 2 / fig_w, 0.0, graph_w / fig_w, graph_h / fig_h))
    ax.set_axis_off()
    ax.set_xlim(gx0, gx1)
    ax.set_ylim(gy0, gy1)
    fig.text(0.5, 1 - 4 / fig_h, title, ha="center", va="top", fontsize=_TITLE_SIZE)
    legend = fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 1 - title_h / fig_h),
        ncol=ncol,
        fontsize=FONT_SIZE,
        frameon=True,
    )
    gids = {n: i for i, n in enumerate(g.nodes)}
    for key, pts in lay.edges.items():
        codes = [MPath.MOVETO] + [MPath.CURVE4] * (len(pts) - 1)
        ax.add_patch(PathPatch(MPath(pts, codes), fc="none", ec=_EDGE_COLOUR, lw=0.9, zorder=1))
        head = Polygon(
            _arrowhead(pts[-1], lay.tips[key]),
            closed=True,
            fc=_EDGE_COLOUR,
            ec=_EDGE_COLOUR,
            lw=0.5,
            zorder=2,
        )
        head.set_gid(f"arrow-{gids[key[0]]}-{gids[key[1]]}")
        ax.add_patch(head)
    for name in g.nodes:
        x0, y0, x1, y1 = lay.boxes[name]
        edge, lw = (_FUSION_COLOUR, 2.5) if fusion[name] else ("#333333", 0.7)
        r = 3.0
        patch = FancyBboxPatch(
            (x0 + r, y0 + r),
            x1 - x0 - 2 * r,
            y1 - y0 - 2 * r,
            boxstyle=f"round,pad={r}",
            fc=fills[name],
            ec=edge,
            lw=lw,
            zorder=3,
        )
        patch.set_gid(f"node-{gids[name]}")
        ax.add_patch(patch)
        ax.text(
            (x0 + x1) / 2,
            (y0 + y1) / 2,
            "\n".join(labels[name]),
            ha="center",
            va="center",
            fontsize=FONT_SIZE,
            family="monospace",
            zorder=4,
            linespacing=1.2,
        )
    for artist in ax.get_children():
        artist.set_clip_on(False)
    drawing = Drawing(fig, lay, legend)
    return drawing if path is None else drawing.save(path)


def _arrowhead(base: Point, tip: Point) -> list[Point]:
    dx, dy = tip[0] - base[0], tip[1] - base[1]
    n = max((dx * dx + dy * dy) ** 0.5, 1e-9)
    half = 0.4 * _ARROW
    px, py = -dy / n * half, dx / n * half
    return [tip, (base[0] + px, base[1] + py), (base[0] - px, base[1] - py)]


def _legend_handles(report: ReportData) -> list[Artist]:
    from matplotlib.patches import Patch  # optional, as in `draw`

    palette = colours(report)
    # The swatches are the boxes' own (lightened) fills, so a box's colour matches its entry.
    handles: list[Artist] = [
        Patch(fc=_fill(frozenset({m}), palette), ec="#333333", lw=0.7, label=m)
        for m in report.modality_names
    ]
    handles.append(Patch(fc="white", ec=_FUSION_COLOUR, lw=2.5, label="fusion"))
    if any(r.is_regbn for r in report.rows):
        handles.append(Patch(fc=_REGBN_COLOUR, label="RegBN"))
    if report.dependence is not None:
        handles += [
            Patch(fc=colour, ec=_FUSION_COLOUR, lw=1, label=f"dependence {value:.1f}")
            for value, colour in RAMP
        ]
    return handles


def _legend_shape(handles: list[Artist], room: float) -> tuple[int, float, float]:
    """As many columns as fit in ``room`` points, and the legend's (width, height) in points,
    measured on a scratch figure (text widths depend on the font)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shape = (1, 0.0, 0.0)
    for ncol in range(len(handles), 0, -1):
        fig = Figure(figsize=(1, 1), dpi=72)
        legend = fig.legend(handles=handles, ncol=ncol, fontsize=FONT_SIZE, frameon=True)
        with matplotlib.rc_context(RC):
            box = legend.get_window_extent(FigureCanvasAgg(fig).get_renderer())
        shape = (ncol, box.width, box.height)
        if box.width <= room:
            break
    return shape


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


def _escape_dot_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _hex_to_rgb(colour: str) -> list[float]:
    colour = colour.lstrip("#")
    return [int(colour[i : i + 2], 16) / 255 for i in (0, 2, 4)]


def _rgb_to_hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(min(max(c, 0.0), 1.0) * 255):02x}" for c in rgb)
