"""A Perceiver-style model written with einops, traced with no options: einops' functions are
one call each (their Python reads shapes as integers, which tracing cannot), and shapes still
propagate through them, on real and on fake tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import regbn

from .conftest import HandEditable

einops = pytest.importorskip("einops")
from einops import rearrange, reduce  # noqa: E402

B = 6


class Perceiver(HandEditable):
    """Text queries cross-attend to image patches; heads split and merged with einops."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Linear(3 * 4 * 4, 16)
        self.embed = nn.Embedding(50, 16)
        self.to_q = nn.Linear(16, 16)
        self.to_kv = nn.Linear(16, 32)
        self.head = nn.Linear(16, 2)

    def forward(self, image, tokens):
        patches = rearrange(image, "b c (h p) (w q) -> b (h w) (c p q)", p=4, q=4)
        x = self.patch(patches)
        t = self.embed(tokens)
        q = rearrange(self.to_q(t), "b n (h d) -> b h n d", h=2)
        k, v = rearrange(self.to_kv(x), "b n (two h d) -> two b h n d", two=2, h=2)
        q, k = self._rb(0, q, k)
        sim = einops.einsum(q, k, "b h i d, b h j d -> b h i j") / 8**0.5
        out = einops.einsum(sim.softmax(-1), v, "b h i j, b h j d -> b h i d")
        return self.head(reduce(out, "b h n d -> b (h d)", "mean"))


def _inputs():
    return torch.randn(B, 3, 8, 8), torch.randint(0, 50, (B, 5))


def test_einops_model_traced_with_no_options():
    model = Perceiver()
    (fusion,) = regbn.find_fusions(model, _inputs())
    assert fusion.modalities == (frozenset({"tokens"}), frozenset({"image"}))
    assert fusion.shapes == ((B, 2, 5, 8), (B, 2, 4, 8))
    report = regbn.inspect(model, input_shapes=[(B, 3, 8, 8), ((B, 5), torch.int64)])
    assert report.failure is None and len(report.fusions) == 1  # fake tensors too
    patched = regbn.insert(model, "auto", _inputs())
    hand = copy.deepcopy(model)
    hand.hand = nn.ModuleList([copy.deepcopy(patched.regbn_0)])
    opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (patched, hand)]
    for _ in range(2):
        x = _inputs()
        outs = [m(*x) for m in (patched, hand)]
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        for opt, out in zip(opts, outs, strict=True):
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
    patched.eval()
    hand.eval()
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(patched(*x), hand(*x), rtol=0, atol=0)


class EinopsLayers(HandEditable):
    """einops' layers inside the branches and ``einops.pack`` at the fusion."""

    def __init__(self) -> None:
        super().__init__()
        from einops.layers.torch import Rearrange, Reduce

        self.a = nn.Sequential(Rearrange("b c h w -> b (c h w)"), nn.Linear(12, 4))
        self.b = nn.Sequential(nn.Linear(5, 4), Reduce("b n d -> b d", "mean"))
        self.head = nn.Linear(8, 2)

    def forward(self, x, y):
        fa, fb = self._rb(0, self.a(x), self.b(y))
        packed, _ = einops.pack([fa, fb], "b *")
        return self.head(packed)


def _layer_inputs():
    return torch.randn(B, 3, 2, 2), torch.randn(B, 6, 5)


def test_einops_layers_are_leaves_and_pack_is_a_fusion():
    model = EinopsLayers()
    (fusion,) = regbn.find_fusions(model, _layer_inputs())
    assert fusion.pair == ("a.1", "b.1") and fusion.shapes == ((B, 4), (B, 4))
    report = regbn.inspect(model, input_shapes=[(B, 3, 2, 2), (B, 6, 5)])
    assert report.failure is None
    assert {row.layer for row in report.rows} >= {"Rearrange", "Reduce"}
    patched = regbn.insert(model, "auto", _layer_inputs())
    hand = copy.deepcopy(model)
    hand.hand = nn.ModuleList([copy.deepcopy(patched.regbn_0)])
    for mode in ("train", "eval"):
        getattr(patched, mode)()
        getattr(hand, mode)()
        x = _layer_inputs()
        torch.testing.assert_close(patched(*x), hand(*x), rtol=0, atol=0)
