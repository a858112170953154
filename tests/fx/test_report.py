"""regbn.inspect: rows, shapes (checked against torch's ShapeProp), modalities and the views."""

from __future__ import annotations

import json
import re
import warnings
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import regbn
from regbn.errors import RegBNTypeError, RegBNValueError
from regbn.fx.analysis import find_fusions
from regbn.fx.report import Report, inspect
from regbn.fx.tracing import TraceError, trace

# ---------------------------------------------------------------------------------------------
# Models: vector features, conv maps, 3D volumes, tokens, dict inputs, residual stacks
# ---------------------------------------------------------------------------------------------


class Vectors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6))
        self.enc_b = nn.Sequential(nn.Linear(12, 8), nn.Tanh())
        self.head = nn.Linear(14, 3)

    def forward(self, a, b):
        return self.head(torch.cat([self.enc_a(a), self.enc_b(b)], dim=1))


class ConvBranch(nn.Module):
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 7 * 7, 16)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv(x)), 4)
        return self.fc(h.flatten(1))


class ConvMaps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gray_net = ConvBranch(1)
        self.colored_net = ConvBranch(3)
        self.head = nn.Linear(32, 10)

    def forward(self, gray, colored):
        return self.head(torch.cat([self.gray_net(gray), self.colored_net(colored)], 1))


class Volumes(nn.Module):
    """Two MRI-like 3D volumes; the fusion multiplies the feature volumes."""

    def __init__(self) -> None:
        super().__init__()
        self.t1 = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2))
        self.t2 = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2))
        self.out = nn.Conv3d(4, 1, 1)

    def forward(self, t1, t2):
        return self.out(self.t1(t1) * self.t2(t2)).mean(dim=(2, 3, 4))


class Tokens(nn.Module):
    """Text tokens attend to image patches; residual adds stay inside their modality."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.text_mlp = nn.Linear(16, 16)
        self.patches = nn.Linear(12, 16)

    def forward(self, ids, image):
        q = self.embed(ids)
        q = q + self.text_mlp(q)  # a residual: not a fusion
        k = self.patches(image)
        att = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1)
        return att @ k


class DictInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Linear(20, 8)
        self.video = nn.Conv2d(3, 8, 3)

    def forward(self, batch):
        v = self.video(batch["video"]).mean(dim=(2, 3))
        return self.audio(batch["audio"]) + v


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class Encoder(nn.Module):
    def __init__(self, d_in: int, d: int, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(n)])

    def forward(self, x):
        return self.blocks(self.proj(x))


class Deep(nn.Module):
    """Two residual encoders: 4 nodes per block, about 8n + 10 nodes."""

    def __init__(self, n: int = 37) -> None:
        super().__init__()
        self.audio = Encoder(12, 8, n)
        self.video = Encoder(20, 8, n)
        self.head = nn.Linear(16, 3)

    def forward(self, audio, video):
        return self.head(torch.cat([self.audio(audio), self.video(video)], -1))


class Siamese(nn.Module):
    """One encoder shared by both modalities."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
        self.head = nn.Linear(12, 2)

    def forward(self, a, b):
        return self.head(torch.cat([self.enc(a), self.enc(b)], 1))


CASES = {
    "vectors": (Vectors, lambda: (torch.randn(3, 10), torch.randn(3, 12))),
    "conv": (ConvMaps, lambda: (torch.randn(2, 1, 28, 28), torch.randn(2, 3, 28, 28))),
    "volumes": (Volumes, lambda: (torch.randn(2, 1, 8, 8, 8), torch.randn(2, 2, 8, 8, 8))),
    "tokens": (Tokens, lambda: (torch.randint(0, 50, (2, 7)), torch.randn(2, 5, 12))),
    "dict": (
        DictInputs,
        lambda: ({"audio": torch.randn(2, 20), "video": torch.randn(2, 3, 6, 6)},),
    ),
}


def reference_shapes(model: nn.Module, inputs: tuple) -> dict[str, tuple | None]:
    """Every node's shape by torch's own ShapeProp (None for non-tensor values)."""
    gm = trace(model)
    ShapeProp(gm).propagate(*inputs)
    out = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        out[node.name] = tuple(meta.shape) if hasattr(meta, "shape") else None
    return out


def as_shapes(inputs: tuple):
    def spec(x):
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return (tuple(x.shape), x.dtype)

    return [spec(x) for x in inputs]


# ---------------------------------------------------------------------------------------------
# Shapes, modules, modalities
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_shapes_match_shapeprop_for_every_node(case):
    cls, make = CASES[case]
    torch.manual_seed(0)
    model, inputs = cls().eval(), make()
    expected = reference_shapes(model, inputs)
    real = inspect(model, inputs)
    fake = inspect(model, input_shapes=as_shapes(inputs))
    for report in (real, fake):
        assert report.failure is None
        assert [r.name for r in report.rows] == list(expected)
        got = {r.name: r.shape for r in report.rows}
        assert got == expected
    assert [r.dtype for r in real.rows] == [r.dtype for r in fake.rows]


def test_module_paths_ops_and_targets():
    report = inspect(ConvMaps(), input_shapes=[(2, 1, 28, 28), (2, 3, 28, 28)])
    rows = {r.name: r for r in report.rows}
    assert rows["gray_net_conv"].module == "gray_net.conv"
    assert rows["gray_net_conv"].op == "call_module"
    assert rows["gray_net_conv"].layer == "Conv2d"
    assert rows["gray_net_conv"].params == 1 * 4 * 9 + 4
    # Functional ops inside a traced-through module belong to it.
    assert rows["max_pool2d"].module == "gray_net"
    assert rows["flatten_1"].module == "colored_net"
    assert rows["max_pool2d"].target.endswith("max_pool2d")
    assert rows["cat"].module is None and rows["cat"].target == "torch.cat"
    assert rows["gray"].op == "placeholder" and rows["gray"].module is None
    assert rows["output"].shape == (2, 10) and rows["output"].dtype == torch.float32


def test_modalities_and_fusions():
    report = inspect(ConvMaps(), input_shapes=[(2, 1, 28, 28), (2, 3, 28, 28)])
    rows = {r.name: r for r in report.rows}
    assert rows["gray_net_fc"].modalities == {"gray"}
    assert rows["colored_net_fc"].modalities == {"colored"}
    assert rows["cat"].modalities == {"gray", "colored"}
    assert [r.name for r in report.rows if r.is_fusion] == ["cat"]
    (fusion,) = report.fusions
    assert fusion.name == "cat" and fusion.kind == "cat"
    assert fusion.shapes == ((2, 16), (2, 16))
    assert report.pairs == [("gray_net.fc", "colored_net.fc")]  # as the model's code names them
    assert [(i.name, i.shape) for i in report.inputs] == [
        ("gray", (2, 1, 28, 28)),
        ("colored", (2, 3, 28, 28)),
    ]


def test_residual_adds_are_not_fusions():
    report = inspect(Tokens(), input_shapes=[((2, 7), torch.int64), (2, 5, 12)])
    adds = [r for r in report.rows if r.layer == "add"]
    assert adds and not any(r.is_fusion for r in adds)
    assert [f.kind for f in report.fusions] == ["matmul"]
    deep = inspect(Deep(n=3), input_shapes=[(2, 12), (2, 20)])
    assert sum(r.layer == "add" for r in deep.rows) == 6
    assert [f.name for f in deep.fusions] == ["cat"]


def test_dict_inputs_give_one_modality_per_entry():
    report = inspect(DictInputs(), input_shapes=[{"audio": (2, 20), "video": (2, 3, 6, 6)}])
    audio, video = "batch['audio']", "batch['video']"
    # In the order the forward reads them.
    assert [(i.name, i.shape) for i in report.inputs] == [
        (video, (2, 3, 6, 6)),
        (audio, (2, 20)),
    ]
    (fusion,) = report.fusions
    assert fusion.kind == "add" and set(fusion.modalities) == {
        frozenset([audio]),
        frozenset([video]),
    }
    assert report.params_by_modality == {
        frozenset([audio]): 20 * 8 + 8,
        frozenset([video]): 3 * 8 * 9 + 8,
    }


def test_parameters_per_modality_branch():
    model = Vectors()
    report = inspect(model, input_shapes=[(3, 10), (3, 12)])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert report.params_by_modality == {
        frozenset(["a"]): count(model.enc_a),
        frozenset(["b"]): count(model.enc_b),
        frozenset(["a", "b"]): count(model.head),
    }
    assert report.total_params == count(model)
    shared = inspect(Siamese(), input_shapes=[(2, 6), (2, 6)])
    assert shared.params_by_modality[frozenset(["a", "b"])] == count(Siamese())


def test_meta_device_model_far_larger_than_memory():
    # 2 x 40000^2 weights: 12.8 GB of float32 that never exist.
    with torch.device("meta"):
        model = Vectors()
        model.enc_a = nn.Sequential(nn.Linear(10, 40_000), nn.ReLU(), nn.Linear(40_000, 40_000))
        model.enc_b = nn.Sequential(nn.Linear(12, 40_000), nn.Linear(40_000, 40_000))
        model.head = nn.Linear(80_000, 3)
    report = inspect(model, input_shapes=[(4, 10), (4, 12)])
    assert report.failure is None
    assert report.total_params > 3_200_000_000
    rows = {r.name: r for r in report.rows}
    assert rows["cat"].shape == (4, 80_000) and rows["cat"].is_fusion
    assert rows["output"].shape == (4, 3)
    assert "3,20" in str(report)  # the parameter total, formatted


class Mismatch(nn.Module):
    """Shape propagation fails at a.2: 16 features arrive where the Linear expects 17."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(17, 4))
        self.b = nn.Linear(5, 4)

    def forward(self, x, y):
        return self.a(x) * self.b(y)


def test_shape_failure_gives_a_partial_report():
    report = inspect(Mismatch(), input_shapes=[(2, 8), (2, 5)])
    assert report.failure is not None
    assert report.failure.node_name == "a_2"
    assert tuple(report.failure.input_shapes) == ((2, 16),)
    rows = {r.name: r for r in report.rows}
    assert rows["a_1"].shape == (2, 16)
    assert rows["a_2"].shape is None
    text = str(report)
    assert "FAILED at 'a.2' with input shapes" in text and "(2, 16)" in text
    assert "!!  a.2" in text
    assert report.to_dict()["failure"]["node"] == "a_2"
    assert "a.2" in report._repr_html_()


def test_trace_failure_raises_trace_error():
    class Untraceable(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TraceError, match="test_report.py"):
        inspect(Untraceable(), input_shapes=[(2, 3)])


def test_without_inputs_modalities_still_work():
    report = inspect(Vectors())
    assert all(r.shape is None for r in report.rows)
    assert [f.name for f in report.fusions] == ["cat"]


# ---------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------


def two_branch_report() -> Report:
    return inspect(ConvMaps(), input_shapes=[(2, 1, 28, 28), (2, 3, 28, 28)])


def test_str_is_an_aligned_table_within_the_width():
    report = two_branch_report()
    for width in (80, 100, 120):
        text = report.table(width=width)
        table = text.split("\n\n")[0].splitlines()
        assert max(len(line) for line in table) <= width
    text = str(report)
    assert "cat" in text and "*F" in text
    assert "Suggested pairs for regbn.insert" in text
    assert "pairs=[('gray_net.fc', 'colored_net.fc')]" in text


def test_long_models_fold_and_all_nodes_shows_every_node():
    report = inspect(Deep(n=37), input_shapes=[(2, 12), (2, 20)])
    assert len(report.rows) >= 300
    default = report.lines()
    assert len(default) <= 60 and any(line.folded for line in default)
    assert len(report.lines(all_nodes=True)) == len(report.rows)
    top = report.lines(depth=1)
    assert [line.name for line in top if line.folded] == ["audio", "video"]
    assert sum(len(line.members) for line in top) == len(report.rows)
    assert len(str(report).splitlines()) < 100
    full = report.table(all_nodes=True)
    assert all(row.label in full for row in report.rows)
    with pytest.raises(ValueError):
        report.lines(depth=-1)


def test_folding_keeps_two_calls_of_a_shared_module_apart():
    report = inspect(Siamese(), input_shapes=[(2, 6), (2, 6)])
    folded = [line for line in report.lines(depth=1) if line.folded]
    assert [line.name for line in folded] == ["enc", "enc"]
    assert [line.modalities for line in folded] == [{"a"}, {"b"}]


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.tags: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_html_parses_and_holds_every_row_escaped():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, batch):
            return self.fc(batch["<img src=x>"]) * batch["a&b"]

    report = inspect(Odd(), input_shapes=[{"<img src=x>": (2, 4), "a&b": (2, 4)}])
    parser = _Cells()
    parser.feed(report._repr_html_())
    body = [cells for cells in parser.rows if cells]
    # the key rows (the fusion) first, then every node in the last table
    assert [cells[0] for cells in body] == ["mul"] + [r.label for r in report.rows]
    assert "img" not in parser.tags and "script" not in parser.tags
    assert any("batch['<img src=x>']" in "".join(cells) for cells in body)
    conv = two_branch_report()._repr_html_()
    assert 'class="fusion"' in conv and "tag" in conv


def test_to_dict_is_json_ready():
    report = inspect(Tokens(), input_shapes=[((2, 7), torch.int64), (2, 5, 12)])
    data = json.loads(json.dumps(report.to_dict()))
    assert len(data["rows"]) == len(report.rows)
    ids = next(r for r in data["rows"] if r["name"] == "ids")
    assert ids["shape"] == [2, 7] and ids["dtype"] == "int64" and ids["modalities"] == ["ids"]
    assert data["fusions"][0]["kind"] == "matmul"
    assert data["pairs"] == [list(p) for p in report.pairs]
    assert data["parameters"]["total"] == report.total_params
    assert data["failure"] is None


def test_markdown_and_dot():
    report = two_branch_report()
    md = report.to_markdown()
    assert md.count("\n| ") >= len(report.rows) and "**fusion**" in md
    dot = report.to_dot(depth=1)
    assert dot.startswith('digraph "ConvMaps"') and '"gray_net" -> "cat";' in dot
    assert "penwidth=3" in dot  # the fusion is framed
    assert report.to_dot(all_nodes=True).count("->") >= len(report.rows) - 3


def test_draw_svg_and_png_for_a_300_node_model(tmp_path):
    pytest.importorskip("matplotlib")  # an optional dependency (the examples extra)
    report = inspect(Deep(n=37), input_shapes=[(2, 12), (2, 20)])
    assert len(report.rows) >= 300
    svg = report.draw(tmp_path / "deep.svg", all_nodes=True)
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = svg.read_text()
    assert "audio.blocks.36.fc2" in text and "FUSION" in text  # text kept as text
    png = report.draw(tmp_path / "deep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(RegBNValueError, match=r"^Report\.draw: .*svg or .png"):
        report.draw(tmp_path / "deep.jpg")
    with pytest.raises(RegBNValueError, match=r"^regbn\.inspect: depth must be an int >= 0"):
        report.lines(depth=-1)


def test_draw_marks_inserted_regbn_layers(tmp_path):
    pytest.importorskip("matplotlib")  # an optional dependency (the examples extra)
    import regbn.fx.insertion as insertion

    model = Vectors()
    patched = insertion.insert(
        model, pairs=[("enc_a", "enc_b")], example_inputs=(torch.randn(4, 10), torch.randn(4, 12))
    )
    report = inspect(patched, input_shapes=[(4, 10), (4, 12)])
    regbn_rows = [r for r in report.rows if r.is_regbn]
    assert [r.name for r in regbn_rows] == ["regbn_0"]
    assert regbn_rows[0].nested == ((4, 6), (4, 8))
    assert report.pairs == []  # already normalised: nothing left to suggest
    assert "RB  regbn_0" in report.table(all_nodes=True)
    assert "RegBN" in report.to_dot()
    report.draw(tmp_path / "patched.svg")
    assert "RegBN" in (tmp_path / "patched.svg").read_text()


def test_tracing_options_and_keyword_inputs():
    model = ConvMaps()
    report = inspect(
        model,
        {"gray": torch.randn(2, 1, 28, 28), "colored": torch.randn(2, 3, 28, 28)},
        leaf_modules=["gray_net"],
    )
    rows = {r.name: r for r in report.rows}
    assert rows["gray_net"].op == "call_module" and rows["gray_net"].shape == (2, 16)
    assert rows["gray_net"].layer == "ConvBranch"
    assert rows["gray_net"].params == sum(p.numel() for p in model.gray_net.parameters())
    assert "colored_net_conv" in rows  # the other branch is still traced through


class AudioGRU(nn.Module):
    """A module that computes before and after a child call: transpose, GRU, then pool."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 6, batch_first=True)

    def forward(self, x):
        out, _ = self.gru((x * 2.0).transpose(1, 2))
        return out.mean(1)


class AudioText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = AudioGRU()
        self.text = nn.Linear(5, 6)
        self.xattn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, wave, words):
        a = self.audio(wave)
        t = self.text(words)
        x, _ = self.xattn(a[:, None], t[:, None], t[:, None])
        return self.head(x.squeeze(1) * a)


@pytest.mark.parametrize("depth", [0, 1, 2, 3, None])
def test_draw_at_every_depth_when_a_module_computes_around_a_child_call(tmp_path, depth):
    report = inspect(AudioText(), input_shapes=[(2, 4, 7), (2, 5)])
    graph = report.graph(depth=depth)
    assert nx.is_directed_acyclic_graph(graph)
    if depth == 2:  # audio before and after its GRU: two lines, two graph nodes
        assert [n for n in graph if n.startswith("audio")] == ["audio", "audio_gru", "audio (2)"]
    path = report.draw(tmp_path / f"d{depth}.svg", depth=depth)
    ET.parse(path)
    assert "digraph" in report.to_dot(depth=depth)


def test_parameters_inside_leaf_modules_count_under_their_modality():
    model = AudioText()
    report = inspect(model, input_shapes=[(2, 4, 7), (2, 5)])
    assert report.unused_params == 0
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # MultiheadAttention's out_proj is a child of the leaf xattn: counted with it.
    assert report.params_by_modality[frozenset({"wave", "words"})] == count(model.xattn) + count(
        model.head
    )
    assert "unused" not in report.summary()


# ---------------------------------------------------------------------------------------------
# The dependence at each fusion: inspect(..., batches=...)
# ---------------------------------------------------------------------------------------------


def _vector_batches(coupled: bool, n_batches: int = 3, size: int = 64) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        a = torch.randn(size, 10, generator=gen)
        noise = torch.randn(size, 12, generator=gen)
        b = torch.cat([a, a[:, :2]], 1) + 0.1 * noise if coupled else noise
        out.append((a, b))
    return out


def test_inspect_with_batches_shows_the_dependence_in_every_view(tmp_path):
    torch.manual_seed(0)
    batches = _vector_batches(coupled=True)
    report = inspect(Vectors(), batches[0], batches=batches)
    (row,) = report.dependence.rows
    assert row.fusion == "cat" and row.n_samples == 3 * 64 and row.above_chance > 0.3
    value = f"{row.above_chance:+.3f}"
    # Text: a dependence column, the value on the fusion's line, the full row in the summary.
    table = report.table(width=120)
    assert "dependence" in table.splitlines()[0]
    (fusion_line,) = [line for line in table.splitlines() if line.startswith("*F  cat")]
    assert fusion_line.rstrip().endswith(value)
    assert f"dependence: {row.summary()}" in table
    # Markdown: one more column, filled on the fusion's row only.
    md = report.to_markdown().splitlines()
    header = next(line for line in md if line.startswith("| node"))
    assert header.endswith("| dependence |")
    cat = next(line for line in md if line.startswith("| `cat`"))
    assert cat.endswith(f"| {value} |") and header.count("|") == cat.count("|")
    # HTML, parsed: the column's cells, the value on the fusion's row, shaded.
    parser = _Cells()
    html = report._repr_html_()
    parser.feed(html)
    body = [cells for cells in parser.rows if cells]
    assert all(len(cells) == 8 for cells in body)
    every = body[-len(report.rows) :]
    assert {cells[0]: cells[-1] for cells in every}["cat"] == value
    assert [cells[-1] for cells in every].count("") == len(every) - 1
    assert body[0][0] == "cat" and body[0][-1] == value  # the fusion row comes first
    assert 'class="num dependence" style="background:#' in html
    # The picture and Graphviz text: the value on the fusion's node, filled by the ramp.
    assert f"dependence {value}" in report.to_dot()
    svg = report.draw(tmp_path / "dep.svg")
    ET.parse(svg)
    assert f"dependence {value}" in svg.read_text()
    assert report.draw(tmp_path / "dep.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(json.dumps(report.to_dict()))["dependence"]["rows"][0]["fusion"] == "cat"


def test_inspect_dependence_tells_coupled_from_independent_and_is_off_by_default():
    torch.manual_seed(0)
    model = Vectors()
    coupled = inspect(model, input_shapes=[(2, 10), (2, 12)], batches=_vector_batches(True))
    independent = inspect(model, input_shapes=[(2, 10), (2, 12)], batches=_vector_batches(False))
    assert coupled.dependence.rows[0].above_chance > 0.3
    assert abs(independent.dependence.rows[0].above_chance) < 0.1
    plain = inspect(model, input_shapes=[(2, 10), (2, 12)])
    assert plain.dependence is None and plain.to_dict()["dependence"] is None
    assert "dependence" not in str(plain) and "dependence" not in plain._repr_html_()


def test_inspect_batches_errors_name_inspect():
    model = Vectors()
    shapes = [(2, 10), (2, 12)]
    with pytest.raises(RegBNTypeError, match=r"^regbn\.inspect: batches must be an iterable"):
        inspect(model, input_shapes=shapes, batches=torch.zeros(3))
    with pytest.raises(RegBNValueError, match=r"^regbn\.inspect: batch 0: the model failed"):
        inspect(model, input_shapes=shapes, batches=[(torch.zeros(4, 3), torch.zeros(4, 12))])
    with pytest.raises(RegBNValueError, match=r"^regbn\.inspect: batch 0: inputs: got 3"):
        inspect(model, input_shapes=shapes, batches=[(torch.zeros(4, 10),) * 3])


# ---------------------------------------------------------------------------------------------
# What a notebook user meets
# ---------------------------------------------------------------------------------------------


def test_html_opens_on_the_key_rows_and_folds_the_rest():
    report = inspect(Deep(n=37), input_shapes=[(2, 12), (2, 20)])
    html = report._repr_html_()
    first_table = html.index("<table>")
    assert html.index('<tr class="fusion">') < html.index("<details>")  # the fusion comes first
    assert first_table < html.index("<details>")
    assert "max-height" not in html and "overflow" not in html  # no scroll box
    depth = report.auto_depth()
    assert depth is not None
    assert f"folded below depth {depth} ({len(report.lines())} lines)" in html
    assert f"Every node ({len(report.rows)})" in html
    for mark in ("fusion", "regbn", "failed"):  # own background and text colour, both
        assert re.search(rf"tr\.{mark} td\{{background:#\w+!important;color:#\w+!important", html)


def test_table_wraps_long_names_instead_of_cutting_them():
    report = inspect(Deep(n=37), input_shapes=[(2, 12), (2, 20)])
    for width in (80, 100):
        text = report.table(width=width, all_nodes=True)
        table = text.split("\n\n")[0]
        assert ".." not in table and max(len(line) for line in table.splitlines()) <= width
        header = table.splitlines()[0]
        start = header.index("node")
        stop = header.index(header[start + 4 :].split()[0], start + 4)  # the next column
        names, current = [], ""
        lines = table.splitlines()
        rules = [i for i, line in enumerate(lines) if line.startswith("---")]
        for line in lines[rules[0] + 1 : rules[-1]]:
            cell, rest = line[start:stop].strip(), line[stop:].strip()
            if rest:  # a row starts; a line with only the name column continues it
                names.append(current)
                current = cell
            else:
                current += cell
        names = [*names[1:], current]
        assert names == [row.label for row in report.rows]


def test_fusions_print_as_users_name_them():
    fusions = find_fusions(ConvMaps(), (torch.randn(2, 1, 28, 28), torch.randn(2, 3, 28, 28)))
    (fusion,) = fusions
    text = str(fusion)
    assert "frozenset" not in text and text.startswith("cat [cat]: ")
    pretty = []

    class Printer:
        def text(self, s):
            pretty.append(s)

    fusion._repr_pretty_(Printer(), False)
    assert pretty == [f"Fusion({text})"]


def test_inspect_of_a_patched_model_lists_the_fusion_as_normalised():
    x = (torch.randn(4, 10), torch.randn(4, 12))
    patched = regbn.insert(Vectors(), [("enc_a", "enc_b")], x)
    report = inspect(patched, x)
    (fusion,) = report.fusions
    assert fusion.kind == "regbn" and fusion.pair == ("enc_a.2", "enc_b.1")
    assert report.pairs == []  # nothing left to insert
    text = str(report)
    assert "1 fusion" in text
    assert "a RegBN layer, already normalising enc_a.2 with respect to enc_b.1" in text
    (row,) = [r for r in report.rows if r.is_regbn]
    assert row.dtype == torch.float32 and "RB  regbn_0" in text
    with pytest.raises(RegBNValueError, match=r"already normalised by its RegBN layer \(regbn_0 "
                       r"on \('enc_a.2', 'enc_b.1'\)\), so there is nothing to insert"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and no warning that says the opposite first
            regbn.insert(patched, "auto", x)
    with pytest.warns(UserWarning, match=r"already holds RegBN layers \['regbn_0'\]"):
        again = regbn.insert(patched, [("enc_a.0", "enc_b.0")], x)
    assert isinstance(again.regbn_1, regbn.RegBN)


def test_printout_keeps_classes_and_puts_each_layer_after_its_inputs():
    x = (torch.randn(4, 10), torch.randn(4, 12))
    patched = regbn.insert(Vectors(), [("enc_a", "enc_b")], x)
    text = repr(patched)
    order = [line.strip().split(")")[0].lstrip("(") for line in text.splitlines()
             if line.startswith("  (")]  # fmt: skip
    assert order.index("regbn_0") == order.index("enc_b") + 1
    assert text.startswith("Vectors(") and "Sequential(" in text
    assert list(dict(patched.named_children()))[-1] == "regbn_0"  # parameters() order unchanged
