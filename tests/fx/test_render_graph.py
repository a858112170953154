"""Report.draw: a picture that cannot mislead, laid out by Graphviz's dot and by grandalf.

The geometry is read from the layout (boxes and sampled edge curves, in points) and from the
figure's transforms, not from pixels: no edge runs through a box it does not join, nothing
lies outside the figure, the legend covers no box, labels are 9 pt and fit their boxes, and
every edge ends in an arrowhead in the SVG and the PNG.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

from regbn.errors import RegBNValueError
from regbn.fx.report import inspect, render_graph

from .test_report import Block

matplotlib = pytest.importorskip("matplotlib")  # optional: the draw and examples extras
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

ENGINES = ["dot", "grandalf"]


def need(engine: str) -> None:
    """Skip where an engine is missing, except on CI, which must test both."""
    if engine == "dot":
        missing = shutil.which("dot") is None
    else:
        try:
            import grandalf  # noqa: F401
        except ImportError:
            missing = True
        else:
            missing = False
    if missing:
        what = "Graphviz's dot" if engine == "dot" else "grandalf"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} is not installed; CI must test both layout engines")
        pytest.skip(f"{what} is not installed")


# ---------------------------------------------------------------------------------------------
# Models: two towers, and 61 nodes of residual towers on a dict batch with a gated fusion
# ---------------------------------------------------------------------------------------------


class TwoTower(nn.Module):
    """An image tower of five modules, a shorter text tower, fusion by concat, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.text_embed = nn.Embedding(100, 16)
        self.text_proj = nn.Linear(16, 8)
        self.head = nn.Linear(16, 4)

    def forward(self, image, tokens):
        img = self.image(image)
        txt = self.text_proj(self.text_embed(tokens).mean(1))
        return self.head(torch.cat([img, txt], dim=1))


class ResTower(nn.Module):
    def __init__(self, d_in: int, d: int, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(n)])
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(self.blocks(self.proj(x)))


class GatedTowers(nn.Module):
    """Residual audio and video towers on a dict batch, a gated fusion, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = ResTower(20, 16, 5)
        self.video = ResTower(30, 16, 5)
        self.gate = nn.Linear(32, 16)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 5))

    def forward(self, batch):
        a = self.audio(batch["audio"]).relu()
        v = self.video(batch["video"].flatten(1))
        g = torch.sigmoid(self.gate(torch.cat([a, v], -1)))
        return self.head(g * a + (1 - g) * v)


def two_tower():
    inputs = (torch.randn(2, 3, 16, 16), torch.randint(0, 100, (2, 7)))
    return inspect(TwoTower(), example_inputs=inputs)


def gated_towers():
    batch = {"audio": torch.randn(2, 20), "video": torch.randn(2, 5, 6)}
    report = inspect(GatedTowers(), example_inputs=(batch,))
    assert len(report.rows) == 61
    return report


MODELS = {"two_tower": two_tower, "61_nodes": gated_towers}


# ---------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------

Box = tuple[float, float, float, float]


def segment_hits_box(p, q, box: Box, inset: float = 0.5) -> bool:
    """Whether segment pq enters ``box`` shrunk by ``inset`` (Liang-Barsky clipping)."""
    x0, y0, x1, y1 = box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset
    dx, dy = q[0] - p[0], q[1] - p[1]
    t0, t1 = 0.0, 1.0
    for d, lo, hi, start in ((dx, x0, x1, p[0]), (dy, y0, y1, p[1])):
        if d == 0:
            if not lo < start < hi:
                return False
            continue
        a, b = (lo - start) / d, (hi - start) / d
        t0, t1 = max(t0, min(a, b)), min(t1, max(a, b))
        if t0 >= t1:
            return False
    return True


def crossings(layout) -> list[tuple[tuple[str, str], str]]:
    """(edge, node) for every box an edge runs through, other than its own two ends."""
    out = []
    for edge in layout.edges:
        pts = layout.polyline(edge)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        reach = (min(xs), min(ys), max(xs), max(ys))
        for node, box in layout.boxes.items():
            if node in edge or not overlaps(reach, box):
                continue
            if any(segment_hits_box(p, q, box) for p, q in zip(pts, pts[1:], strict=False)):
                out.append((edge, node))
    return out


def overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def on_border(point, box: Box, tol: float = 1.0) -> bool:
    x, y = point
    inside = box[0] - tol <= x <= box[2] + tol and box[1] - tol <= y <= box[3] + tol
    near = min(abs(x - box[0]), abs(x - box[2]), abs(y - box[1]), abs(y - box[3])) <= tol
    return inside and near


def test_the_crossing_check_sees_an_edge_through_a_box():
    # The check itself can fail: a straight edge from a short tower's end to the fusion,
    # past a box of the long tower, as the old layout drew it.
    layout = render_graph.Layout(
        engine="test",
        boxes={"text": (0, 100, 40, 120), "image.4": (30, 50, 70, 70), "cat": (60, 0, 100, 20)},
        edges={("text", "cat"): [(20, 100), (40, 60), (60, 40), (80, 25)]},
        tips={("text", "cat"): (80, 20)},
        bounds=(0, 0, 100, 120),
    )
    assert crossings(layout) == [(("text", "cat"), "image.4")]
    layout.boxes["image.4"] = (100, 50, 140, 70)
    assert crossings(layout) == []


# ---------------------------------------------------------------------------------------------
# The layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("all_nodes", [False, True])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("engine", ENGINES)
def test_no_edge_runs_through_a_box(engine, model, all_nodes):
    need(engine)
    report = MODELS[model]()
    drawing = report.draw(engine=engine, all_nodes=all_nodes)
    layout = drawing.layout
    g = report.graph(all_nodes=all_nodes)
    assert layout.engine == engine
    assert set(layout.boxes) == set(g.nodes) and set(layout.edges) == set(g.edges)
    assert crossings(layout) == []
    boxes = list(layout.boxes.values())
    assert not any(overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    for (u, v), pts in layout.edges.items():
        assert on_border(pts[0], layout.boxes[u]), (u, v, pts[0])
        assert on_border(layout.tips[(u, v)], layout.boxes[v]), (u, v)
        # Inputs at the top, each edge going down: the picture reads one way.
        assert layout.boxes[u][1] > layout.boxes[v][3]
    if model == "two_tower":
        assert ("text_proj", "cat") in layout.edges
        sources = [n for n in g if g.in_degree(n) == 0]
        assert len({layout.boxes[n][3] for n in sources}) == 1  # inputs on one row


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("engine", ENGINES)
def test_nothing_is_clipped_and_the_legend_covers_no_box(engine, model):
    need(engine)
    report = MODELS[model]()
    drawing = report.draw(engine=engine, all_nodes=True)
    fig, layout = drawing.figure, drawing.layout
    (ax,) = fig.axes
    with matplotlib.rc_context(render_graph.RC):
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        width, height = fig.bbox.width, fig.bbox.height

        def to_px(box: Box) -> Box:
            (a, b), (c, d) = ax.transData.transform([(box[0], box[1]), (box[2], box[3])])
            return a, b, c, d

        node_px = {n: to_px(b) for n, b in layout.boxes.items()}
        for box in node_px.values():
            assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
        for edge in layout.edges:
            for x, y in ax.transData.transform(layout.polyline(edge)):
                assert 0 <= x <= width and 0 <= y <= height
        legend = drawing.legend.get_window_extent(renderer)
        legend_box = (legend.x0, legend.y0, legend.x1, legend.y1)
        assert 0 <= legend.x0 and legend.x1 <= width and 0 <= legend.y0 and legend.y1 <= height
        assert not any(overlaps(legend_box, b) for b in node_px.values())
        for edge in layout.edges:
            pts = ax.transData.transform(layout.polyline(edge))
            pairs = zip(pts, pts[1:], strict=False)
            assert not any(segment_hits_box(p, q, legend_box) for p, q in pairs)
        # Every label at 9 pt or more, inside its box.
        texts = list(ax.texts)
        assert len(texts) == len(layout.boxes)
        for text, box in zip(texts, node_px.values(), strict=True):
            assert text.get_fontsize() >= 9
            extent = text.get_window_extent(renderer)
            assert box[0] < extent.x0 and extent.x1 < box[2], text.get_text()
            assert box[1] < extent.y0 and extent.y1 < box[3], text.get_text()
    assert min(t.get_fontsize() for t in drawing.legend.get_texts()) >= 9


def _svg_scale(root: ET.Element) -> float:
    """Points per SVG user unit."""
    width = float(root.attrib["width"].removesuffix("pt"))
    return width / float(root.attrib["viewBox"].split()[2])


@pytest.mark.parametrize("engine", ENGINES)
def test_svg_and_png_have_an_arrowhead_per_edge_and_9pt_text(tmp_path, engine):
    need(engine)
    report = two_tower()
    drawing = report.draw(engine=engine)
    n_edges = len(drawing.layout.edges)
    root = ET.fromstring(drawing.svg)
    ns = "{http://www.w3.org/2000/svg}"
    heads = [g for g in root.iter(f"{ns}g") if g.attrib.get("id", "").startswith("arrow-")]
    assert len(heads) == n_edges
    for head in heads:
        (path,) = head.iter(f"{ns}path")
        assert "fill: #4d4d4d" in path.attrib["style"] and path.attrib["d"].count("L") == 2
    sizes = [
        float(m.group(1)) * _svg_scale(root)
        for text in root.iter(f"{ns}text")
        if (m := re.search(r"font-size: ([\d.]+)px", text.attrib.get("style", "")))
    ]
    assert len(sizes) >= 3 * len(drawing.layout.boxes) and min(sizes) >= 9
    assert "text_proj" in drawing.svg  # labels stay text

    # The PNG: each arrowhead's centre is painted in the edge colour.
    png = drawing.save(tmp_path / "two.png")
    image = matplotlib.image.imread(png)
    (ax,) = drawing.figure.axes
    dpi = image.shape[1] / drawing.figure.get_size_inches()[0]
    scale = dpi / drawing.figure.dpi
    edge_rgb = [0x4D / 255] * 3
    for edge, tip in drawing.layout.tips.items():
        base = drawing.layout.edges[edge][-1]
        centre = ((2 * tip[0] + base[0]) / 3, (2 * tip[1] + base[1]) / 3)
        x, y = ax.transData.transform(centre) * scale
        pixel = image[int(image.shape[0] - y), int(x), :3]
        assert abs(pixel - edge_rgb).max() < 0.15, (edge, pixel)


@pytest.mark.parametrize("engine", ENGINES)
def test_colours_and_marks_survive_either_engine(engine):
    need(engine)
    report = two_tower()
    drawing = report.draw(engine=engine, all_nodes=True)
    (ax,) = drawing.figure.axes
    fills = {
        p.get_gid().removeprefix("node-"): matplotlib.colors.to_hex(p.get_facecolor())
        for p in ax.patches
        if (p.get_gid() or "").startswith("node-")
    }
    names = list(report.graph(all_nodes=True).nodes)
    fill = {names[int(i)]: colour for i, colour in fills.items()}
    assert fill["image_0"] == fill["image_4"] != fill["text_proj"] == fill["text_embed"]
    frames = {
        names[int(p.get_gid().removeprefix("node-"))]: p.get_linewidth()
        for p in ax.patches
        if (p.get_gid() or "").startswith("node-")
    }
    assert frames["cat"] > 2 > frames["head"]  # the fusion's red frame


# ---------------------------------------------------------------------------------------------
# Choosing the engine, inline pictures, errors, speed
# ---------------------------------------------------------------------------------------------


def test_auto_takes_dot_where_installed_else_grandalf(monkeypatch):
    need("grandalf")
    report = two_tower()
    broken = shutil.which("false")
    monkeypatch.setattr(render_graph.shutil, "which", lambda name: None)
    assert report.draw().layout.engine == "grandalf"
    with pytest.raises(RegBNValueError, match=r"^Report\.draw: engine='dot' needs Graphviz"):
        report.draw(engine="dot")
    # A dot that runs but fails: engine="dot" says so, "auto" falls back to grandalf.
    monkeypatch.setattr(render_graph.shutil, "which", lambda name: broken)
    with pytest.raises(RegBNValueError, match=r"^Report\.draw: Graphviz's dot .* failed to lay"):
        report.draw(engine="dot")
    assert report.draw().layout.engine == "grandalf"
    monkeypatch.setattr(render_graph.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "grandalf.graphs", None)  # as if not installed
    with pytest.raises(RegBNValueError, match=r"needs grandalf.*pip install grandalf"):
        report.draw()
    monkeypatch.undo()
    need("dot")
    assert report.draw().layout.engine == "dot"


def test_draw_without_a_path_is_an_inline_picture(tmp_path):
    report = two_tower()
    drawing = report.draw()
    svg = drawing._repr_svg_()
    assert ET.fromstring(svg).tag.endswith("svg") and "FUSION" in svg
    assert "laid out by" in repr(drawing)
    assert drawing.save(tmp_path / "a.svg").read_text() == svg
    assert drawing.save(tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = report.draw(str(tmp_path / "b.svg"))
    assert path == tmp_path / "b.svg" and path.read_text().startswith("<?xml")
    with pytest.raises(RegBNValueError, match=r"^Report\.draw: the file must end in \.svg"):
        drawing.save(tmp_path / "a.pdf")
    with pytest.raises(RegBNValueError, match=r"^Report\.draw: engine must be 'auto'"):
        report.draw(engine="neato")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_300_node_model_is_laid_out_in_seconds(engine):
    need(engine)
    from .test_report import Deep

    report = inspect(Deep(n=37), input_shapes=[(2, 12), (2, 20)])
    start = time.perf_counter()
    drawing = report.draw(engine=engine, all_nodes=True)
    assert time.perf_counter() - start < 15
    assert len(drawing.layout.boxes) >= 300
    assert crossings(drawing.layout) == []
