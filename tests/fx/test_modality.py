from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regbn
from regbn.fx import Fusion, annotate_modalities, build_graph, find_fusions, insert, trace
from regbn.fx.analysis import auto_pairs

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
    fusions = find_fusions(ThreeModal())  # three modalities at one cat: one record per pair
    assert [(f.name, f.kind) for f in fusions] == [("cat", "cat")] * 3
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
    fusions = find_fusions(
        ThreeModal(), (torch.randn(B, 5), torch.randn(B, 6), torch.randn(B, 7))
    )
    for fusion in fusions:  # one fusion, described once per pair
        assert fusion.operands == ("enc_a", "enc_b", "enc_c")
        assert fusion.modalities == (frozenset("a"), frozenset("b"), frozenset("c"))
        assert fusion.shapes == ((B, 4), (B, 4), (B, 4))
    # every earlier operand against every later one, in operand order
    assert [f.pair for f in fusions] == [("enc_a", "enc_b"), ("enc_a", "enc_c"), ("enc_b", "enc_c")]


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
        "similarity",  # a @ b.t() of two (B, 4) batches: every sample against every other
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
    fusion = find_fusions(gm, inputs)[0]
    assert fusion.pair == ("enc_a", "enc_b")


def test_analysis_leaves_a_caller_graph_module_untouched():
    gm = torch.fx.symbolic_trace(ThreeModal())
    before = {n.name: dict(n.meta) for n in gm.graph.nodes}
    inputs = (torch.randn(B, 5), torch.randn(B, 6), torch.randn(B, 7))
    regbn.inspect(gm, inputs)
    assert {f.name for f in find_fusions(gm, inputs)} == {"cat"}
    assert {n.name: dict(n.meta) for n in gm.graph.nodes} == before


# ------------------------------------------------------------------------- modalities as meant


class MiniEncoder(nn.Module):
    """An HF-style text encoder: token ids and an attention mask in, hidden states out."""

    def __init__(self, vocab: int = 50, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        q, k, v = self.qkv(h).chunk(3, -1)
        bias = (1.0 - attention_mask[:, None, :].to(h.dtype)) * -1e4
        a = (q @ k.transpose(-2, -1) / 8**0.5 + bias).softmax(-1)
        return h + self.out(a @ v)


class TextImage(nn.Module):
    """The text tower's mask is reused by the cross-attention (key_padding_mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.text = MiniEncoder()
        self.image = nn.Linear(12, 8)
        self.xattn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask, patches):
        t = self.text(input_ids, attention_mask)
        v = self.image(patches)
        x, _ = self.xattn(v, t, t, key_padding_mask=attention_mask == 0)
        return self.head(x.mean(1))


def _text_image_inputs():
    mask = torch.ones(B, 5, dtype=torch.long)
    mask[:, 3:] = 0
    return torch.randint(0, 50, (B, 5)), mask, torch.randn(B, 4, 12)


@pytest.mark.parametrize("leaf", [None, [MiniEncoder]], ids=["traced", "leaf"])
def test_ids_and_mask_are_one_modality_and_the_reused_mask_makes_no_fusion(leaf):
    model, inputs = TextImage(), _text_image_inputs()
    (fusion,) = find_fusions(model, inputs, leaf_modules=leaf)
    assert fusion.kind == "attention" and fusion.name == "xattn"
    assert fusion.modalities == (frozenset({"patches"}), frozenset({"input_ids"}))
    assert fusion.pair == ("image", "text")
    report = regbn.inspect(model, inputs, leaf_modules=leaf)
    assert [(i.name, i.modality) for i in report.inputs] == [
        ("input_ids", "input_ids"),
        ("attention_mask", None),
        ("patches", "patches"),
    ]
    assert report.pairs == [("image", "text")]
    patched = insert(model, "auto", inputs, leaf_modules=leaf)
    (call,) = [n for n in patched.graph.nodes if n.target == "regbn_0"]
    assert tuple(a.name for a in call.args) == fusion.pair_nodes
    assert patched(*inputs).shape == (B, 2)


def test_named_modalities_group_inputs_and_name_the_report():
    groups = {"text": ["input_ids", "attention_mask"], "image": ["patches"]}
    model, inputs = TextImage(), _text_image_inputs()
    (fusion,) = find_fusions(model, inputs, modalities=groups)
    assert fusion.modalities == (frozenset({"image"}), frozenset({"text"}))
    report = regbn.inspect(model, inputs, modalities=groups)
    assert [(i.name, i.modality) for i in report.inputs] == [
        ("input_ids", "text"),
        ("attention_mask", "text"),
        ("patches", "image"),
    ]
    assert report.modality_names == ["text", "image"]
    assert "modality text" in report.summary()
    assert "image (image) with respect to text (text), at xattn" in report.summary()
    assert {r.name: r.modalities for r in report.rows}["xattn"] == {"text", "image"}


@pytest.mark.parametrize(
    "groups, message",
    [
        ({"text": ["input_idz"]}, r"'input_idz' is not an input of this model; its inputs are "
         r"\['input_ids', 'attention_mask', 'patches'\]"),
        ({"a": ["patches"], "b": ["patches"]}, r"'patches' is listed under both 'a' and 'b'"),
    ],
)  # fmt: skip
def test_bad_modality_names(groups, message):
    with pytest.raises(ValueError, match=message):
        find_fusions(TextImage(), _text_image_inputs(), modalities=groups)


def test_modalities_of_dict_entries():
    groups = {"sound": ["batch['audio']"], "picture": ["batch['image']"]}
    (fusion,) = find_fusions(DictInput(), modalities=groups)
    assert fusion.modalities == (frozenset({"sound"}), frozenset({"picture"}))


class TwoVocabularies(nn.Module):
    """Text tokens and audio codes, each through its own embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.text = nn.Embedding(30, 8)
        self.audio = nn.Embedding(20, 8)
        self.head = nn.Linear(16, 2)

    def forward(self, text_ids, audio_codes, lengths):
        t = self.text(text_ids).sum(1) / lengths[:, None]
        return self.head(torch.cat([t, self.audio(audio_codes).mean(1)], 1))


def test_two_id_inputs_are_two_modalities_and_lengths_none():
    inputs = (torch.randint(0, 30, (B, 6)), torch.randint(0, 20, (B, 9)), torch.full((B,), 6))
    (fusion,) = find_fusions(TwoVocabularies(), inputs)
    assert fusion.kind == "cat"
    assert fusion.modalities == (frozenset({"text_ids"}), frozenset({"audio_codes"}))
    assert fusion.pair == ("t", "mean")  # t: the variable of forward


class IntegerGate(nn.Module):
    """A bool mask (not named as one) gates the text features: no modality of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.text = nn.Linear(4, 6)
        self.image = nn.Linear(5, 6)

    def forward(self, text, keep, image):
        t = self.text(text).masked_fill(~keep[:, :, None], 0.0).sum(1)
        return t * self.image(image)


def test_an_integer_input_not_read_as_ids_joins_what_it_gates():
    inputs = (torch.randn(B, 3, 4), torch.rand(B, 3) > 0.3, torch.randn(B, 5))
    (fusion,) = find_fusions(IntegerGate(), inputs)
    assert fusion.modalities == (frozenset({"text"}), frozenset({"image"}))
    report = regbn.inspect(IntegerGate(), inputs)
    assert [(i.name, i.modality) for i in report.inputs][1] == ("keep", None)


class ShapeReads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, 4))
        self.a = nn.Linear(4, 4)

    def forward(self, x, y):
        ones = y.new_ones(y.shape[0], 1)
        zeros = torch.zeros((x.size(0), 4), dtype=y.dtype, device=y.device)
        like = torch.ones_like(y)
        cls = self.cls.expand(y.shape[0], -1, -1)
        h = self.a(x).view(y.size(0), -1).type_as(y)
        return ones, zeros, like, cls, h


def test_shape_reads_carry_no_modality():
    gm = trace(ShapeReads())
    annotate_modalities(gm)
    mods = {n.name: n.meta["regbn_modalities"] for n in gm.graph.nodes}
    assert mods["new_ones"] == mods["zeros"] == mods["ones_like"] == mods["expand"] == set()
    assert mods["type_as"] == {"x"}
    assert find_fusions(ShapeReads(), (torch.randn(B, 4), torch.randn(B, 4))) == []


class Gather(nn.Module):
    """Ids of one modality gathered at another's argmax: an int64 tensor of both."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.fc = nn.Linear(3, 4)

    def forward(self, ids, x):
        chosen = torch.gather(ids, 1, self.fc(x).argmax(-1, keepdim=True))
        return self.embed(chosen).squeeze(1) * self.embed(ids).mean(1), self.fc(x)


@pytest.mark.parametrize(
    "make, inputs",
    [
        (TextImage, _text_image_inputs),
        (IntegerGate, lambda: (torch.randn(B, 3, 4), torch.rand(B, 3) > 0.3, torch.randn(B, 5))),
        (Gather, lambda: (torch.randint(0, 10, (B, 5)), torch.randn(B, 3))),
    ],
    ids=["text_image", "integer_gate", "gather"],
)
def test_pairs_never_name_integer_tensors_or_tensors_without_modality(make, inputs):
    report = regbn.inspect(make(), inputs())
    by_node = {r.name: r for r in report.rows}
    for fusion in report.fusions:
        for name in fusion.pair_nodes:
            assert by_node[name].dtype.is_floating_point and by_node[name].modalities
    assert "gather" not in {f.name for f in report.fusions}  # int64 operands are no features


# ------------------------------------------------------------------------- auto and big W


class TokenTowers(nn.Module):
    """Token-level cross-attention between two towers, plus a pooled concat."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.text = nn.Linear(6, d)
        self.image = nn.Linear(5, d)
        self.xattn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(2 * d, 2)

    def forward(self, tokens, pixels):
        t, v = self.text(tokens), self.image(pixels)
        x, _ = self.xattn(t, v, v)
        return self.head(torch.cat([x[:, 0], v.mean(1)], 1)) + self.head(
            torch.cat([t[:, 0], v[:, 0]], 1)
        )


def test_auto_pairs_skip_a_projection_past_the_limit_and_name_pooled_tensors():
    inputs = (torch.randn(B, 10, 6), torch.randn(B, 12, 5))
    fusions = find_fusions(TokenTowers(), inputs)
    xattn = next(f for f in fusions if f.name == "xattn")
    assert xattn.pair_shapes == ((B, 10, 16), (B, 12, 16))
    assert xattn.projection_bytes == 160 * 192 * 4
    pairs, skipped = auto_pairs(fusions)
    assert ("text", "image") in pairs and not skipped
    pairs, skipped = auto_pairs(fusions, max_projection_bytes=160 * 192 * 4 - 1)
    assert ("text", "image") not in pairs
    (message,) = skipped
    assert "skipped fusion 'xattn' [attention]" in message
    assert "160·192·4" in message and "max_projection_bytes=122879" in message
    assert "pairs=[('text[:, 0]', 'mean')]" in message  # CLS, pooled: as the code spells them
    assert "text[:, 0] =" not in message
    with pytest.raises(ValueError, match=r"every fusion was skipped.*skipped fusion 'xattn'"):
        auto_pairs(fusions[:1], max_projection_bytes=1000)
    with pytest.raises(ValueError, match=r"pairs='auto': found no fusion"):
        auto_pairs([])


def test_report_suggests_only_what_auto_would_insert():
    # W of the token-level cross-attention: (130·128)² floats = 1.1 GiB > the layer's 1 GiB.
    report = regbn.inspect(TokenTowers(d=128), input_shapes=[(2, 130, 6), (2, 130, 5)])
    assert [f.name for f in report.fusions] == ["xattn", "cat_1"]
    assert report.pairs == [report.fusions[1].pair]  # the CLS tokens' concat, not xattn
    (message,) = report.skipped
    assert "skipped fusion 'xattn'" in message and "max_projection_bytes=1073741824" in message
    assert "Left out of the suggested pairs" in report.summary()
    assert report.to_dict()["fusions"][0]["projection_bytes"] == (130 * 128) ** 2 * 4
    assert report.to_dict()["skipped"] == [message]


class MaskFirst(nn.Module):
    """The mask passed before the ids to a leaf tower; an image input whose name holds 'mask'."""

    def __init__(self) -> None:
        super().__init__()
        self.text = MiniEncoder()
        self.image = nn.Linear(12, 8)

    def forward(self, input_ids, attention_mask, masked_patches):
        t = self.text(attention_mask=attention_mask, input_ids=input_ids).mean(1)
        return t * self.image(masked_patches).mean(1)


def test_ids_after_a_mask_in_a_leaf_call_and_a_masked_image_are_modalities():
    ids, mask, patches = _text_image_inputs()
    (fusion,) = find_fusions(MaskFirst(), (ids, mask, patches), leaf_modules=[MiniEncoder])
    assert fusion.modalities == (frozenset({"input_ids"}), frozenset({"masked_patches"}))


class MaskImage(nn.Module):
    """A segmentation mask given as a float image, read by its own conv encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Conv2d(3, 4, 3)
        self.mask_enc = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(8, 2)

    def forward(self, image, x_mask):
        a = self.image(image).mean((2, 3))
        b = self.mask_enc(x_mask.float()).mean((2, 3))
        return self.head(torch.cat([a, b], 1))


class MaskGate(nn.Module):
    """A float mask that only gates: it joins what it gates."""

    def __init__(self) -> None:
        super().__init__()
        self.text = nn.Linear(4, 6)
        self.image = nn.Linear(5, 6)

    def forward(self, text, text_mask, image):
        t = (self.text(text) * text_mask[:, :, None]).sum(1)
        return torch.cat([t, self.image(image)], 1)


def test_a_float_mask_read_by_a_learned_layer_is_a_modality():
    inputs = (torch.randn(B, 3, 8, 8), torch.rand(B, 1, 8, 8))
    (fusion,) = find_fusions(MaskImage(), inputs)
    assert fusion.modalities == (frozenset({"image"}), frozenset({"x_mask"}))
    patched = insert(MaskImage(), "auto", inputs)
    assert isinstance(patched.regbn_0, regbn.RegBN)
    gated = (torch.randn(B, 3, 4), (torch.rand(B, 3) > 0.3).float(), torch.randn(B, 5))
    (fusion,) = find_fusions(MaskGate(), gated)
    assert fusion.modalities == (frozenset({"text"}), frozenset({"image"}))


class ClassConditioned(nn.Module):
    """Class labels enter as a one-hot, through a parameter table, or through nn.Embedding."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.enc = nn.Linear(5, 6)
        self.onehot = nn.Linear(10, 6)
        self.table = nn.Parameter(torch.randn(10, 6))
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(12, 2)

    def forward(self, feats, labels):
        if self.how == "one_hot":
            c = self.onehot(F.one_hot(labels, 10).float())
        elif self.how == "table":
            c = self.table[labels]
        else:
            c = self.emb(labels)
        return self.head(torch.cat([self.enc(feats), c], 1))


@pytest.mark.parametrize("how", ["one_hot", "table", "embedding"])
def test_class_labels_read_as_indices_are_a_modality(how):
    inputs = (torch.randn(B, 5), torch.randint(0, 10, (B,)))
    (fusion,) = find_fusions(ClassConditioned(how), inputs)
    assert fusion.modalities == (frozenset({"feats"}), frozenset({"labels"}))
    patched = insert(ClassConditioned(how), "auto", inputs)
    assert patched.regbn_0.f_shape == (6,) and patched.regbn_0.g_shape == (6,)
