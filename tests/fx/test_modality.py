from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regbn
from regbn.fx import Fusion, annotate_modalities, build_graph, find_fusions, insert, trace

from .conftest import AdditiveMaps, B, Case, DictInput, ThreeModal


def test_fusion_kinds_of_every_case(case: Case):
    fusions = find_fusions(case.make(), case.inputs())
    assert [f.kind for f in fusions] == case.fusion_kinds
    for f in fusions:
        assert isinstance(f, Fusion)
        assert len(f.operands) == len(f.modalities) == len(f.shapes) >= 2
        for i, a in enumerate(f.modalities):
            assert a
            for b in f.modalities[i + 1 :]:
                assert not a & b


def test_fusions_without_shapes():
    fusions = find_fusions(ThreeModal())
    assert [(f.name, f.kind) for f in fusions] == [("cat", "cat")]
    assert fusions[0].shapes == (None, None, None)


def test_modalities_on_every_node():
    gm = trace(ThreeModal())
    graph = annotate_modalities(gm)
    assert isinstance(graph, nx.DiGraph)
    mods = {n.name: n.meta["regbn_modalities"] for n in gm.graph.nodes}
    assert mods["enc_a"] == {"a"} and mods["enc_c"] == {"c"}
    assert mods["cat"] == {"a", "b", "c"}
    assert mods["output"] == {"a", "b", "c"}


def test_three_operand_pair_rule():
    (fusion,) = find_fusions(
        ThreeModal(), (torch.randn(B, 5), torch.randn(B, 6), torch.randn(B, 7))
    )
    assert fusion.operands == ("enc_a", "enc_b", "enc_c")
    assert fusion.modalities == (frozenset("a"), frozenset("b"), frozenset("c"))
    assert fusion.shapes == ((B, 4), (B, 4), (B, 4))
    assert fusion.pair == ("enc_a", "enc_b")  # first operand against the second


def test_dict_entries_are_modalities():
    gm = trace(DictInput())
    annotate_modalities(gm)
    mods = {n.name: n.meta["regbn_modalities"] for n in gm.graph.nodes}
    assert mods["audio_enc"] == {"batch['audio']"}
    assert mods["image_enc"] == {"batch['image']"}
    assert mods["batch"] == {"batch['audio']", "batch['image']"}
    (fusion,) = find_fusions(DictInput())
    assert fusion.modalities == (frozenset({"batch['audio']"}), frozenset({"batch['image']"}))


class TupleInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(5, 4)

    def forward(self, x):
        return self.a(x[0]) + self.b(x[1])


def test_tuple_entries_are_modalities():
    inputs = ((torch.randn(B, 3), torch.randn(B, 5)),)
    (fusion,) = find_fusions(TupleInput(), inputs)
    assert fusion.kind == "add"
    assert fusion.modalities == (frozenset({"x[0]"}), frozenset({"x[1]"}))
    patched = insert(TupleInput(), [("x[0]", "x[1]")], inputs)
    assert patched.regbn_0.f_shape == (3,)


def test_indexing_a_tensor_input_is_not_a_modality():
    class Rows(nn.Module):
        def forward(self, x):
            return x[0] + x[1]

    assert find_fusions(Rows(), (torch.randn(4, 3),)) == []


class NotFusions(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x, y):
        h = self.fc(x)
        h = h + x  # residual inside one modality
        h = torch.mul(1, h) * self.scale  # constants and parameters are not operands
        h = h * 2.0 / 3.0
        h = h.view(y.size(0), -1)  # a shape read from another modality is not a tensor operand
        return h, y * y


def test_residual_constants_and_parameters_are_not_fusions():
    inputs = (torch.randn(B, 4), torch.randn(B, 4))
    assert find_fusions(NotFusions(), inputs) == []


class AllKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(4, 4, 2)
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
        self.w = nn.Parameter(torch.randn(2, 4, 4))

    def forward(self, a, b):
        out = [
            torch.stack([a, b], 1).sum(1),
            a - b,
            torch.div(a, b.abs() + 1),
            a @ b.t(),
            torch.einsum("bi,bj->bij", a, b).sum(-1),
            self.bil(a, b),
            F.bilinear(a, b, self.w),
            self.attn(a[:, None], b[:, None], b[:, None])[0].squeeze(1),
            torch.maximum(a, b),
        ]
        return out


def test_every_kind():
    inputs = (torch.randn(B, 4), torch.randn(B, 4))
    kinds = [f.kind for f in find_fusions(AllKinds(), inputs)]
    assert kinds == [
        "stack",
        "sub",
        "div",
        "matmul",
        "einsum",
        "bilinear",
        "bilinear",
        "attention",
        "other",
    ]


def test_fusion_after_fusion_is_not_reported():
    # conv_a + conv_b fuses; the later residual add of a fused tensor and 'a' does not
    gm = trace(AdditiveMaps())
    annotate_modalities(gm)
    fused = [n.name for n in gm.graph.nodes if n.meta["regbn_fusion"]]
    assert fused == ["add"]


def test_pair_names_are_prefixed_only_when_ambiguous():
    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

        def forward(self, x, y):
            a = self.a(x)  # node 'a'
            return a * self.b(y)

    (fusion,) = find_fusions(Clash(), (torch.randn(B, 3), torch.randn(B, 3)))
    assert fusion.pair == ("a", "b")  # module 'a' is node 'a': one tensor, no ambiguity


def test_build_graph_matches_fx():
    gm = trace(ThreeModal())
    graph = build_graph(gm)
    assert set(graph.nodes) == {n.name for n in gm.graph.nodes}
    assert nx.is_directed_acyclic_graph(graph)
    assert nx.ancestors(graph, "cat") >= {"a", "b", "c", "enc_a", "enc_b", "enc_c"}


@pytest.mark.parametrize("shapes", [None, "real"])
def test_find_fusions_accepts_traced_graph_module(shapes):
    gm = torch.fx.symbolic_trace(ThreeModal())
    inputs = (torch.randn(B, 5), torch.randn(B, 6), torch.randn(B, 7)) if shapes else None
    (fusion,) = find_fusions(gm, inputs)
    assert fusion.pair == ("enc_a", "enc_b")


def test_analysis_leaves_a_caller_graph_module_untouched():
    gm = torch.fx.symbolic_trace(ThreeModal())
    before = {n.name: dict(n.meta) for n in gm.graph.nodes}
    inputs = (torch.randn(B, 5), torch.randn(B, 6), torch.randn(B, 7))
    regbn.inspect(gm, inputs)
    (fusion,) = find_fusions(gm, inputs)
    assert fusion.name == "cat"
    assert {n.name: dict(n.meta) for n in gm.graph.nodes} == before
