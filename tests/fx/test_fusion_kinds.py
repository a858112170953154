"""Every common fusion is found, with the pair a user would name, and pairs="auto" equals a hand
edit at that pair.

Each model calls ``self._rb(0, f, g)`` where the hand edit goes (a no-op until ``hand`` is set;
see conftest). Its ``expected`` says the fusion kind, the operands' modalities and the pair.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regbn

from .conftest import B, HandEditable

ATOL = 1e-5


class CatFeatures(HandEditable):
    def __init__(self) -> None:
        super().__init__()
        self.enc_a, self.enc_b, self.head = nn.Linear(5, 4), nn.Linear(6, 3), nn.Linear(7, 2)

    def forward(self, a, b):
        fa, fb = self._rb(0, self.enc_a(a), self.enc_b(b))
        return self.head(torch.cat([fa, fb], 1))


class CatTokens(HandEditable):
    """Token sequences (B, N, D) joined along the token axis."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_a, self.proj_b, self.head = nn.Linear(6, 8), nn.Linear(5, 8), nn.Linear(8, 2)

    def forward(self, a, b):
        ta, tb = self._rb(0, self.proj_a(a), self.proj_b(b))
        return self.head(torch.cat([ta, tb], dim=1).mean(1))


class CatPositions(CatTokens):
    """A position embedding added to one branch's tokens: part of that branch, not the fusion."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 3, 8))

    def forward(self, a, b):
        ta, tb = self._rb(0, self.proj_a(a) + self.pos, self.proj_b(b))
        return self.head(torch.cat([ta, tb], dim=1).mean(1))


class Stack(CatFeatures):
    def __init__(self) -> None:
        super().__init__()
        self.enc_b, self.head = nn.Linear(6, 4), nn.Linear(4, 2)

    def forward(self, a, b):
        fa, fb = self._rb(0, self.enc_a(a), self.enc_b(b))
        return self.head(torch.stack([fa, fb], 1).sum(1))


class Add(Stack):
    def forward(self, a, b):
        fa, fb = self._rb(0, self.enc_a(a), self.enc_b(b))
        return self.head(fa + fb)


class Mul(Stack):
    def forward(self, a, b):
        fa, fb = self._rb(0, self.enc_a(a), self.enc_b(b))
        return self.head(fa * fb)


class Gate(Stack):
    """sigmoid(g) gates f: the pair is the gate's logits, not its sigmoid."""

    def forward(self, a, b):
        fa, gate = self._rb(0, self.enc_a(a), self.enc_b(b))
        return self.head(fa * torch.sigmoid(gate))


class FiLMChunk(HandEditable):
    """FiLM: γ and β from one projection of the condition, over another's feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.cond = nn.Linear(5, 6)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.film = nn.Linear(6, 8)
        self.head = nn.Linear(4, 2)

    def forward(self, a, b):
        cond, fmap = self._rb(0, torch.relu(self.cond(a)), self.conv(b))
        gamma, beta = self.film(cond).chunk(2, dim=1)
        out = gamma[:, :, None, None] * fmap + beta[:, :, None, None]
        return self.head(out.mean((2, 3)))


class FiLMTwo(FiLMChunk):
    """FiLM with separate γ and β projections, written as fmap * (1 + γ) + β."""

    def __init__(self) -> None:
        super().__init__()
        self.to_gamma, self.to_beta = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, a, b):
        cond, fmap = torch.relu(self.cond(a)), self.conv(b)
        fmap, cond = self._rb(0, fmap, cond)
        gamma, beta = self.to_gamma(cond), self.to_beta(cond)
        out = fmap * (1 + gamma.unsqueeze(-1).unsqueeze(-1)) + beta[..., None, None]
        return self.head(out.mean((2, 3)))


class MHA(HandEditable):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.kv_proj = nn.Linear(6, 8), nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, a, b):
        q, kv = self._rb(0, self.q_proj(a), self.kv_proj(b))
        out, _ = self.attn(q, kv, kv, need_weights=False)
        return self.head(out.mean(1))


class SDPA(HandEditable):
    """Head splits and transposes before F.scaled_dot_product_attention."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(5, 8), nn.Linear(5, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, a, b):
        q, k = self._rb(0, self.q(a), self.k(b))
        v = self.v(b)
        heads = [t.unflatten(-1, (2, 4)).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*heads)
        return self.head(out.transpose(1, 2).flatten(2).mean(1))


class Scores(SDPA):
    """softmax(q @ kᵀ / √d) @ v written out."""

    def forward(self, a, b):
        q, k = self._rb(0, self.q(a), self.k(b))
        attn = (q @ k.transpose(-2, -1) / 8**0.5).softmax(-1)
        return self.head((attn @ self.v(b)).mean(1))


class Einsum(Stack):
    def forward(self, a, b):
        fa, fb = self._rb(0, self.enc_a(a), self.enc_b(b))
        return self.head(torch.einsum("bi,bj->bij", fa, fb).sum(-1))


class Bmm(CatTokens):
    def forward(self, a, b):
        ta, tb = self._rb(0, self.proj_a(a), self.proj_b(b))
        return self.head(torch.bmm(ta, tb.transpose(1, 2)) @ tb).mean(1)


class MatrixTranspose(CatTokens):
    """The transpose as an attribute (``.mT``), walked back like ``.transpose(1, 2)``."""

    def forward(self, a, b):
        ta, tb = self._rb(0, self.proj_a(a), self.proj_b(b))
        return self.head((ta @ tb.mT) @ tb).mean(1)


class Outer(Stack):
    """A batched outer product by broadcasting."""

    def forward(self, a, b):
        fa, fb = self._rb(0, self.enc_a(a), self.enc_b(b))
        return self.head((fa.unsqueeze(2) * fb.unsqueeze(1)).sum(-1))


class BilinearFusion(Stack):
    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(4, 4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, a, b):
        fa, fb = self._rb(0, self.enc_a(a), self.enc_b(b))
        return self.head(self.bil(fa, fb))


class TensorFusion(Stack):
    """Tensor fusion network: each feature gets a column of ones, then their outer product.

    The ones take the batch size from the other modality (as the published code does): a shape
    read, so they carry no modality and the fusion is the einsum.
    """

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(25, 2)

    def forward(self, a, b):
        fa, fb = self._rb(0, self.enc_a(a), self.enc_b(b))
        za = torch.cat([fa, torch.ones_like(fb[:, :1])], 1)
        zb = torch.cat([fb, fa.new_ones(fa.size(0), 1)], 1)
        return self.head(torch.einsum("bi,bj->bij", za, zb).flatten(1))


class CLSToken(CatTokens):
    """A CLS token expanded to the other modality's batch size, then token-level einsum."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.head = nn.Linear(4, 2)

    def forward(self, a, b):
        ta, tb = self._rb(0, self.proj_a(a), self.proj_b(b))
        seq = torch.cat([self.cls.expand(tb.shape[0], -1, -1), ta], 1)
        return self.head(torch.einsum("bnd,bmd->bnm", seq, tb).mean(1))


@dataclass
class Kind:
    make: type[HandEditable]
    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    kind: str
    pair: tuple[str, str]
    modalities: tuple[str, ...] = ("a", "b")  # of the operands, in order


VEC = ((B, 5), (B, 6))
TOK = ((B, 3, 6), (B, 4, 5))
MAP = ((B, 5), (B, 2, 6, 6))

KINDS = {
    "cat_features": Kind(CatFeatures, VEC, "cat", ("enc_a", "enc_b")),
    "cat_tokens": Kind(CatTokens, TOK, "cat", ("proj_a", "proj_b")),
    "cat_tokens_with_positions": Kind(CatPositions, TOK, "cat", ("ta", "proj_b")),  # variable ta,
    "stack": Kind(Stack, VEC, "stack", ("enc_a", "enc_b")),
    "add": Kind(Add, VEC, "add", ("enc_a", "enc_b")),
    "mul": Kind(Mul, VEC, "mul", ("enc_a", "enc_b")),
    "gating": Kind(Gate, VEC, "mul", ("enc_a", "enc_b")),
    "film_chunk": Kind(FiLMChunk, MAP, "mul", ("relu", "conv")),
    "film_two_projections": Kind(FiLMTwo, MAP, "mul", ("conv", "relu"), ("b", "a")),
    "multihead_attention": Kind(MHA, TOK, "attention", ("q_proj", "kv_proj")),
    "scaled_dot_product": Kind(SDPA, TOK, "attention", ("q", "k"), ("a", "b", "b")),
    "q_at_k_transposed": Kind(Scores, TOK, "matmul", ("q", "k")),
    "einsum": Kind(Einsum, VEC, "einsum", ("enc_a", "enc_b")),
    "bmm": Kind(Bmm, TOK, "matmul", ("proj_a", "proj_b")),
    "matmul_with_mT": Kind(MatrixTranspose, TOK, "matmul", ("proj_a", "proj_b")),
    "outer_product": Kind(Outer, VEC, "mul", ("enc_a", "enc_b")),
    "bilinear": Kind(BilinearFusion, VEC, "bilinear", ("enc_a", "enc_b")),
    "tensor_fusion": Kind(TensorFusion, VEC, "einsum", ("enc_a", "enc_b")),
    "cls_token": Kind(CLSToken, TOK, "einsum", ("proj_a", "proj_b")),
}


def _inputs(kind: Kind) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(kind.shapes[0]), torch.randn(kind.shapes[1])


@pytest.fixture(params=list(KINDS.values()), ids=list(KINDS))
def kind(request) -> Kind:
    return request.param


def test_fusion_kind_operands_and_pair(kind: Kind):
    (fusion,) = regbn.find_fusions(kind.make(), _inputs(kind))
    assert fusion.kind == kind.kind
    assert fusion.modalities == tuple(frozenset({m}) for m in kind.modalities)
    assert fusion.pair == kind.pair
    # Structural analysis (no shapes) agrees.
    (bare,) = regbn.find_fusions(kind.make())
    assert (bare.kind, bare.pair) == (kind.kind, kind.pair)


def test_auto_equals_a_hand_edit_at_the_pair(kind: Kind):
    model = kind.make()
    patched = regbn.insert(model, pairs="auto", example_inputs=_inputs(kind))
    (call,) = [n for n in patched.graph.nodes if n.op == "call_module" and n.target == "regbn_0"]
    (fusion,) = regbn.find_fusions(model, _inputs(kind))
    assert fusion.pair == kind.pair
    assert tuple(a.name for a in call.args) == fusion.pair_nodes
    hand = copy.deepcopy(model)
    hand.hand = nn.ModuleList([copy.deepcopy(patched.regbn_0)])
    opt_p = torch.optim.SGD(patched.parameters(), lr=0.05)
    opt_h = torch.optim.SGD(hand.parameters(), lr=0.05)
    for _ in range(2):
        batch = _inputs(kind)
        out_p, out_h = patched(*batch), hand(*batch)
        torch.testing.assert_close(out_p, out_h, atol=ATOL, rtol=1e-4)
        for opt, out in ((opt_p, out_p), (opt_h, out_h)):
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
    assert patched.regbn_0.W.abs().sum() > 0
    torch.testing.assert_close(patched.regbn_0.W, hand.hand[0].W, atol=ATOL, rtol=1e-4)
    patched.eval()
    hand.eval()
    batch = _inputs(kind)
    with torch.no_grad():
        torch.testing.assert_close(patched(*batch), hand(*batch), atol=ATOL, rtol=1e-4)
