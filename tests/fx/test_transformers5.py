"""transformers 5 models, whole, with no options: the dual encoders CLIP and SigLIP, FLAVA (its
multimodal encoder reads the concatenated text and image tokens), LXMERT (cross-attention
between language and vision layers), and a user's two-tower model with a BertModel tower, all
built from small configs (nothing is downloaded).

Each is found, inspected, patched, trained for two Adam steps, evaluated and removed again, and
its outputs keep their type. transformers 5 wraps every forward in ``(*args, **kwargs)``
decorators and has data-dependent code inside its encoders: regbn traces the forward with the
example's arguments (the others keep their defaults) and keeps every class it cannot trace as
one call, with a warning that names it.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import regbn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

B, T = 4, 7
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=20)  # fmt: skip
VISION = dict(image_size=30, patch_size=6, hidden_size=32, intermediate_size=37,
              num_hidden_layers=2, num_attention_heads=4)  # fmt: skip


def _clip():
    config = transformers.CLIPConfig(
        text_config={**TEXT, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        vision_config=VISION,
        projection_dim=16,
    )
    return transformers.CLIPModel(config)


def _siglip():
    config = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)
    return transformers.SiglipModel(config)


def _batch(mask: bool = True) -> dict[str, torch.Tensor]:
    out = {"input_ids": torch.randint(3, 99, (B, T)), "pixel_values": torch.randn(B, 3, 30, 30)}
    if mask:
        out["attention_mask"] = torch.ones(B, T, dtype=torch.long)
    return out


MODELS = {"clip": (_clip, True), "siglip": (_siglip, False)}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("name", list(MODELS))
def test_dual_encoder_whole_with_no_options(name):
    make, mask = MODELS[name]
    torch.manual_seed(0)
    model = make().train()
    batch = _batch(mask)
    with pytest.warns(UserWarning, match=r"cannot trace inside .*kept as one call"):
        fusions = regbn.find_fusions(model, batch)
    (fusion,) = [f for f in fusions if f.kind == "similarity"]  # the image-text logits
    assert fusion.modalities == (frozenset({"input_ids"}), frozenset({"pixel_values"}))
    # named as the model's forward names them: its normalised embeddings, not 'truediv_1'
    assert fusion.pair == ("text_embeds", "image_embeds")
    report = _quiet(regbn.inspect, model, batch)
    assert "text_embeds (input_ids) with respect to image_embeds (pixel_values)" in str(report)
    assert report.failure is None and len(report.pairs) == 1
    with torch.no_grad():
        model.eval()
        want = model(**batch)
        model.train()
    # auto does not insert at a similarity product, and says why
    with pytest.raises(ValueError, match=r"skipped the similarity product.*row by row"):
        _quiet(regbn.insert, model, "auto", batch)
    # the two towers' normalised embeddings, paired sample by sample, on request
    with pytest.warns(UserWarning, match=r"similarity product.*paired sample by sample"):
        patched = regbn.insert(model, [fusion.pair], batch)
    assert isinstance(patched, type(model)) and hasattr(patched, "regbn_0")
    assert patched.config is model.config
    opt = torch.optim.Adam(patched.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        out = patched(**_batch(mask))
        assert type(out) is type(want)
        out.logits_per_text.square().mean().backward()
        opt.step()
    patched.eval()
    with torch.no_grad():
        out = patched(**batch)
    assert type(out) is type(want)
    assert out.logits_per_image.shape == want.logits_per_image.shape
    # fields the model sets on a tower's output object (the projected pooler output) are kept
    assert out.text_model_output.pooler_output.shape == want.text_model_output.pooler_output.shape
    restored = regbn.remove(patched)
    assert type(restored) is type(model) and not hasattr(restored, "regbn_0")
    with torch.no_grad():
        again = restored(**batch)
        plain = model.eval()(**batch)
    torch.testing.assert_close(again.logits_per_text, plain.logits_per_text)


def _flava():
    config = transformers.FlavaConfig(
        text_config=TEXT,
        image_config=VISION,
        multimodal_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                               num_attention_heads=4),
        hidden_size=32,
        projection_dim=16,
    )  # fmt: skip
    return transformers.FlavaModel(config), _batch(), "cat", (
        lambda out: out.multimodal_embeddings
    )


def _lxmert():
    config = transformers.LxmertConfig(
        vocab_size=99, hidden_size=32, num_attention_heads=4, intermediate_size=37, l_layers=1,
        x_layers=1, r_layers=1, visual_feat_dim=20, visual_pos_dim=4,
    )  # fmt: skip
    batch = {
        "input_ids": torch.randint(3, 99, (B, T)),
        "visual_feats": torch.randn(B, 5, 20),
        "visual_pos": torch.rand(B, 5, 4),
        "attention_mask": torch.ones(B, T).long(),
    }
    return transformers.LxmertModel(config), batch, "attention", (
        lambda out: out.pooled_output
    )


@pytest.mark.parametrize("make", [_flava, _lxmert], ids=["flava", "lxmert"])
def test_fusion_inside_the_model(make):
    torch.manual_seed(0)
    model, batch, kind, read = make()
    fusions = _quiet(regbn.find_fusions, model, batch)
    assert kind in [f.kind for f in fusions]
    report = _quiet(regbn.inspect, model, batch)
    assert report.failure is None and report.pairs
    model.eval()
    with torch.no_grad():
        want = model(**batch)
    patched = _quiet(regbn.insert, model, "auto", batch)
    assert isinstance(patched, type(model)) and hasattr(patched, "regbn_0")
    patched.train()
    opt = torch.optim.Adam(patched.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        out = patched(**batch)
        assert type(out) is type(want)
        read(out).square().mean().backward()
        opt.step()
    patched.eval()
    with torch.no_grad():
        out = patched(**batch)
    assert type(out) is type(want) and read(out).shape == read(want).shape
    restored = regbn.remove(patched)
    assert type(restored) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(read(restored(**batch)), read(model(**batch)))


def test_a_fusion_inside_an_untraceable_module_is_named_not_hidden():
    # BLIP's text encoder cross-attends to the image inside BlipTextModel, whose masks torch.fx
    # cannot build: it becomes a leaf, and the warning says what it hides
    config = transformers.BlipConfig(
        text_config={**TEXT, "encoder_hidden_size": 32}, vision_config=VISION,
        projection_dim=16, image_text_hidden_size=16,
    )  # fmt: skip
    model = transformers.BlipForImageTextRetrieval(config)
    with pytest.warns(UserWarning, match=r"'text_encoder' \(BlipTextModel\) reads input_ids and "
                      r"pixel_values: the branches may fuse inside"):
        assert regbn.find_fusions(model, _batch()) == []
    with pytest.raises(ValueError, match=r"found no fusion"):
        _quiet(regbn.insert, model, "auto", _batch())


def test_named_pairs_as_module_paths():
    torch.manual_seed(0)
    model = _clip()
    batch = _batch()
    patched = _quiet(regbn.insert, model, [("text_projection", "visual_projection")], batch)
    assert patched.regbn_0.f_shape == (16,) and patched.regbn_0.g_shape == (16,)
    patched.train()
    patched(**batch).logits_per_text.sum().backward()


def test_checkpoint_reloads_in_a_fresh_model_and_round_trips_save_pretrained(tmp_path):
    torch.manual_seed(0)
    model = _clip()
    batch = _batch()
    patched = _quiet(regbn.insert, model, [("text_projection", "visual_projection")], batch)
    patched.train()
    patched(**batch)  # one training batch: the running W moves
    patched.eval()
    with torch.no_grad():
        want = patched(**batch).logits_per_text
    patched.save_pretrained(tmp_path)
    # a fresh process would do this: the model's class, insert with shapes only, the weights
    fresh = _quiet(transformers.CLIPModel.from_pretrained, tmp_path)
    shapes = {"input_ids": ((B, T), torch.int64), "pixel_values": (B, 3, 30, 30),
              "attention_mask": ((B, T), torch.int64)}  # fmt: skip
    again = _quiet(regbn.insert, fresh, [("text_projection", "visual_projection")],
                   input_shapes=shapes)
    again.load_state_dict(patched.state_dict())
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits_per_text, want, rtol=0, atol=0)


class TextImage(nn.Module):
    """A user's two-tower model: a transformers BertModel and a small CNN, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.text = transformers.BertModel(transformers.BertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=20))  # fmt: skip
        self.image = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                   nn.Flatten(), nn.Linear(4, 32))  # fmt: skip
        self.head = nn.Linear(64, 2)

    def forward(self, input_ids, attention_mask, pixel_values):
        text = self.text(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.head(torch.cat([text, self.image(pixel_values)], 1))


def test_user_two_tower_model_with_a_bert_tower():
    torch.manual_seed(0)
    model = TextImage()
    batch = _batch()
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
             "pixel_values": batch["pixel_values"]}  # fmt: skip
    (fusion,) = _quiet(regbn.find_fusions, model, batch)
    assert fusion.kind == "cat"
    # the pair as the model's code spells it, and accepted back by insert
    assert fusion.pair == ("text.pooler_output", "image.4")
    named = _quiet(regbn.insert, model, [("text.pooler_output", "image.4")], batch)
    assert named.regbn_0.f_shape == (32,)
    patched = _quiet(regbn.insert, model, "auto", batch)
    opt = torch.optim.Adam(patched.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        patched(**batch).square().mean().backward()
        opt.step()
    patched.eval()
    with torch.no_grad():
        assert patched(**batch).shape == (B, 2)
    assert type(regbn.remove(patched)) is TextImage
