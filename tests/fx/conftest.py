"""Tiny multimodal models for the fx surgery tests.

Each model's forward calls ``self._rb(i, f, g)`` where a hand-written RegBN layer would go. With
``self.hand = None`` (the default) that is a Python-level no-op, so tracing sees the plain model.
Setting ``hand`` to copies of the layers `regbn.insert` made gives "the same model edited by
hand", to compare the patched GraphModule against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

B = 8


class HandEditable(nn.Module):
    hand: nn.ModuleList | None

    def __init__(self) -> None:
        super().__init__()
        self.hand = None

    def _rb(self, i: int, f, g):
        if self.hand is None:
            return f, g
        return self.hand[i](f, g)


class ConvBranch(nn.Module):
    def __init__(self, c_in: int, out: int = 16, size: int = 28) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * (size // 4) ** 2, out)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 4)
        return self.fc(h.flatten(1))


class PMR(HandEditable):
    """The official example's colored-digits model: RegBN on the raw inputs (early fusion)."""

    def __init__(self) -> None:
        super().__init__()
        self.gray_net = ConvBranch(1)
        self.colored_net = ConvBranch(3)
        self.head = nn.Linear(32, 10)

    def forward(self, gray, colored):
        gray, colored = self._rb(0, gray, colored)
        return self.head(torch.cat([self.gray_net(gray), self.colored_net(colored)], 1))


class LateConcat(HandEditable):
    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Linear(10, 6)
        self.enc_b = nn.Linear(12, 5)
        self.aux = nn.Linear(6, 3)
        self.head = nn.Linear(11, 3)

    def forward(self, a, b):
        fa = torch.relu(self.enc_a(a))
        # A use of f before g exists: insert moves it after the layer, as a hand edit would.
        aux = self.aux(fa) if self.hand is None else None
        fb = torch.relu(self.enc_b(b))
        fa, fb = self._rb(0, fa, fb)
        aux = self.aux(fa) if aux is None else aux
        return self.head(torch.cat([fa, fb], dim=1)) + aux


class AdditiveMaps(HandEditable):
    """Intermediate fusion: two feature maps added, then a shared trunk."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(2, 4, 3, padding=1)
        self.trunk = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, a, b):
        ha, hb = self.conv_a(a), self.conv_b(b)
        ha, hb = self._rb(0, ha, hb)
        h = F.relu(self.trunk(ha + hb)) + ha  # residual inside the fused stream: not a fusion
        return self.head(h.mean((2, 3)))


class AudioImage(HandEditable):
    """Different ranks: a 1D audio feature map against a 2D image feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_conv = nn.Conv1d(2, 3, 5, stride=2, padding=2)
        self.image_conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(7, 4)

    def forward(self, audio, image):
        fa = self.audio_conv(audio)
        fi = self.image_conv(image)
        fa, fi = self._rb(0, fa, fi)
        return self.head(torch.cat([fa.mean(-1), fi.mean((-2, -1))], 1))


class Tokens(HandEditable):
    """Token sequences (B, N, D) concatenated along the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.text_proj = nn.Linear(6, 8)
        self.image_proj = nn.Linear(10, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, text, patches):
        t = self.text_proj(text)
        p = self.image_proj(patches)
        t, p = self._rb(0, t, p)
        seq = torch.cat([t, p], dim=1)
        return self.head(F.gelu(self.mix(seq)).mean(1))


class VolumeTabular(HandEditable):
    def __init__(self) -> None:
        super().__init__()
        self.vol_conv = nn.Conv3d(1, 2, 3)
        self.tab_fc = nn.Linear(7, 8)
        self.head = nn.Linear(2 + 8, 2)

    def forward(self, volume, tabular):
        v = self.vol_conv(volume)
        t = F.relu(self.tab_fc(tabular))
        v, t = self._rb(0, v, t)
        return self.head(torch.cat([v.mean((2, 3, 4)), t], 1))


class Gating(HandEditable):
    """Multiplicative gating: one modality gates the other."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Linear(10, 6)
        self.gate = nn.Linear(9, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x, y):
        h = self.feat(x)
        gate = self.gate(y)
        h, gate = self._rb(0, h, gate)
        return self.head(h * torch.sigmoid(gate) * 1.0)


class ThreeModal(HandEditable):
    """Three modalities, two pairs sharing g: the second pair sees c already normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Linear(5, 4)
        self.enc_b = nn.Linear(6, 4)
        self.enc_c = nn.Linear(7, 4)
        self.head = nn.Linear(12, 2)

    def forward(self, a, b, c):
        fa, fb, fc = self.enc_a(a), self.enc_b(b), self.enc_c(c)
        fa, fc = self._rb(0, fa, fc)
        fb, fc = self._rb(1, fb, fc)
        return self.head(torch.cat([fa, fb, fc], 1))


class DictInput(HandEditable):
    """One argument holding a dict of modalities; RegBN on the raw dict entries."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_enc = nn.Linear(20, 6)
        self.image_enc = nn.Conv2d(3, 2, 3)
        self.head = nn.Linear(6 + 2, 3)

    def forward(self, batch):
        audio, image = self._rb(0, batch["audio"], batch["image"])
        fa = self.audio_enc(audio)
        fi = self.image_enc(image).mean((2, 3))
        return self.head(torch.cat([fa, fi], 1))


class SequentialBranches(HandEditable):
    """Branches are Sequentials, traced through: a module path names its last node."""

    def __init__(self) -> None:
        super().__init__()
        self.branch_a = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh())
        self.branch_b = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh())
        self.head = nn.Linear(5, 2)

    def forward(self, a, b):
        fa, fb = self.branch_a(a), self.branch_b(b)
        fa, fb = self._rb(0, fa, fb)
        return self.head(fa * fb + fa)


class CrossAttention(HandEditable):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(6, 8)
        self.kv_proj = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, text, image):
        q, kv = self.q_proj(text), self.kv_proj(image)
        q, kv = self._rb(0, q, kv)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        return self.head(out.mean(1))


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


@dataclass
class Case:
    name: str
    make: Callable[[], HandEditable]
    inputs: Callable[[], Any]  # fresh random example inputs (a tuple, or a dict of kwargs)
    pairs: list[tuple[str, str]]
    fusion_kinds: list[str] = field(default_factory=list)  # what find_fusions reports

    def call(self, model: nn.Module, inputs: Any):
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


CASES = [
    Case(
        "pmr_early",
        PMR,
        lambda: (_randn(B, 1, 28, 28), _randn(B, 3, 28, 28)),
        [("gray", "colored")],
        ["cat"],
    ),
    Case(
        "late_concat",
        LateConcat,
        lambda: (_randn(B, 10), _randn(B, 12)),
        [("relu", "relu_1")],
        ["cat"],
    ),
    Case(
        "additive_maps",
        AdditiveMaps,
        lambda: (_randn(B, 1, 6, 6), _randn(B, 2, 6, 6)),
        [("conv_a", "conv_b")],
        ["add"],
    ),
    Case(
        "audio_image_ranks",
        AudioImage,
        lambda: (_randn(B, 2, 16), _randn(B, 3, 8, 8)),
        [("audio_conv", "image_conv")],
        ["cat"],
    ),
    Case(
        "tokens",
        Tokens,
        lambda: (_randn(B, 3, 6), _randn(B, 4, 10)),
        [("text_proj", "image_proj")],
        ["cat"],
    ),
    Case(
        "volume_tabular",
        VolumeTabular,
        lambda: (_randn(B, 1, 5, 5, 5), _randn(B, 7)),
        [("vol_conv", "relu")],
        ["cat"],
    ),
    Case(
        "gating",
        Gating,
        lambda: (_randn(B, 10), _randn(B, 9)),
        [("feat", "gate")],
        ["mul"],
    ),
    Case(
        "three_modal",
        ThreeModal,
        lambda: (_randn(B, 5), _randn(B, 6), _randn(B, 7)),
        [("enc_a", "enc_c"), ("enc_b", "enc_c")],
        ["cat", "cat", "cat"],  # one record per pair of its three modalities
    ),
    Case(
        "dict_input",
        DictInput,
        lambda: {"batch": {"audio": _randn(B, 20), "image": _randn(B, 3, 5, 5)}},
        [("batch['audio']", "batch['image']")],
        ["cat"],
    ),
    Case(
        "sequential",
        SequentialBranches,
        lambda: (_randn(B, 8), _randn(B, 4)),
        [("branch_a", "branch_b")],
        ["mul"],
    ),
    Case(
        "cross_attention",
        CrossAttention,
        lambda: (_randn(B, 3, 6), _randn(B, 4, 5)),
        [("q_proj", "kv_proj")],
        ["attention"],
    ),
]

CASE_IDS = [c.name for c in CASES]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request) -> Case:
    torch.manual_seed(0)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class SentenceImage(HandEditable):
    """sentence-transformers' own SentenceTransformer, fed its features dict, and an image."""

    def __init__(self, sentence: nn.Module) -> None:
        super().__init__()
        self.text = sentence
        self.image = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(8, 384),
        )  # fmt: skip
        self.head = nn.Linear(768, 2)

    def forward(self, features, image):
        t = self.text(features)["sentence_embedding"]
        v = self.image(image)
        t, v = self._rb(0, t, v)
        return self.head(torch.cat([t, v], 1))
